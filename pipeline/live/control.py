"""The control socket: `pipeline status` asks a running daemon what it is doing.

The daemon side answers each request with its status as JSON; `query_status` is the client
that `pipeline status`, the soak and the tests use.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
POLL_MS = 200


def serve_status(endpoint: str, status: Callable[[], dict[str, Any]], stopping: threading.Event) -> None:
    """Answer status requests on `endpoint` until `stopping` is set (run on the daemon's control thread)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as error:
        log.warning("status socket %s not available (%s); `pipeline status` will not reach this daemon", endpoint, error)
        return
    try:
        while not stopping.is_set():
            if sock.poll(POLL_MS):
                sock.recv()
                sock.send(json.dumps(status()).encode())
    finally:
        sock.close()


def query_status(endpoint: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """A running daemon's status, or None when nothing answers at `endpoint` within `timeout_s`."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(b"status")
        if not sock.poll(int(timeout_s * 1000)):
            return None
        answer: dict[str, Any] = json.loads(sock.recv())
        return answer
    finally:
        sock.close()
