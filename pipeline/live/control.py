"""The control socket: `pipeline status` asks a running daemon what it is doing, and a trigger (the Zocalo service,
GDA) asks it to follow a scan now.

The daemon binds it when it starts, so a port that another process holds is an error then (one
line naming the endpoint), not a `pipeline status` that talks to someone else. Each request is
read whole (every part); anything but a one-part `status` or a `follow` + absolute scan path
(+ optionally an absolute output root) gets a JSON refusal, so no message shape can leave the socket in a state where it stops answering.
`query_status` is the client that `pipeline status`, the soak and the tests use; `request_follow`
the one that `pipeline.cluster.zocalo_service` uses. Whether the daemon takes a scan to follow (a
regular file inside its watched directories) is the daemon's to decide: this module only carries
the path.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from pipeline.common.endpoints import check_endpoint
from pipeline.errors import PipelineError, one_line
from pipeline.live.wire import HANDSHAKE_MS

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096  # per part: a path as long as Linux allows (PATH_MAX, 4096 bytes with its NUL) still fits
POLL_MS = 200
STATUS_REQUEST = b"status"
FOLLOW_REQUEST = b"follow"


class ControlError(PipelineError):
    """The control socket cannot be had (its port is taken, the address is wrong)."""


class ControlServer:
    """A REP socket bound at construction; `serve` answers on the calling thread until `stopping` is set."""

    def __init__(self, endpoint: str, status: Callable[[], dict[str, Any]],
                 follow: Callable[[Path, Path | None], dict[str, Any]] | None = None) -> None:
        endpoint = expand(endpoint)
        if endpoint.startswith("ipc://"):
            _private_directory(Path(endpoint.removeprefix("ipc://")).parent, endpoint)
            if query_status(endpoint, timeout_s=0.5) is not None:  # binding would take the socket file from a running daemon
                raise ControlError(f"daemon.control {endpoint}: address in use (another daemon answers there; give this one "
                               "its own with --control or daemon.control)")
        self.endpoint = endpoint
        self.status = status
        self.follow = follow  # None: follow requests are refused (this daemon takes scans from its watcher only)
        self.refused = 0
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self._sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)  # idle connections are dropped, not kept until EMFILE
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as error:
            self._sock.close()
            why = ("address in use (is another daemon running with this config? give this one its own with --control or "
                   "daemon.control)") if error.errno == zmq.EADDRINUSE else one_line(error)
            raise ControlError(f"daemon.control {endpoint}: {why}") from None

    def serve(self, stopping: threading.Event) -> None:
        try:
            while not stopping.is_set():
                if self._sock.poll(POLL_MS):
                    self._answer(self._sock.recv_multipart())
        finally:
            self._sock.close()

    def _answer(self, request: list[bytes]) -> None:
        what = "status"
        try:
            if request == [STATUS_REQUEST]:
                reply = json.dumps(self.status())
            elif len(request) in (2, 3) and request[0] == FOLLOW_REQUEST:
                what = "follow"
                reply = json.dumps(self._follow(*request[1:]))
            else:
                self.refused += 1
                reply = json.dumps({"error": f"unknown request of {len(request)} part(s); send one part: {STATUS_REQUEST.decode()}, "
                                             f"or two or three: {FOLLOW_REQUEST.decode()}, an absolute scan path and optionally "
                                             "an absolute output root"})
        except Exception as error:  # a status that cannot be made must not end the control thread
            log.exception("%s request failed", what)
            reply = json.dumps({"error": f"{what} failed ({type(error).__name__})"})
        self._sock.send(reply.encode())

    def _follow(self, raw: bytes, raw_output_root: bytes | None = None) -> dict[str, Any]:
        """The daemon's answer to `follow PATH [OUTPUT_ROOT]`, or a refusal of a path no file system can hold."""
        if self.follow is None:
            self.refused += 1
            return {"accepted": False, "reason": "this daemon takes no follow requests"}
        paths = [os.fsdecode(part) for part in (raw, raw_output_root) if part is not None]  # any bytes a name can hold
        for path, what in zip(paths, ("the scan file's", "the output root's")):
            if "\0" in path or not os.path.isabs(path):
                self.refused += 1
                why = "a NUL byte in the path" if "\0" in path else f"not an absolute path; send {what} absolute path"
                return {"accepted": False, "reason": f"{path!r}: {why}"}
        return self.follow(Path(paths[0]), Path(paths[1]) if len(paths) == 2 else None)


def expand(endpoint: str) -> str:
    """`ipc://~/...` with the user's home directory put in (ZeroMQ does not expand `~`)."""
    return "ipc://" + os.path.expanduser(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else endpoint


def _private_directory(directory: Path, endpoint: str) -> None:
    """The socket file's directory, made if need be, must be this user's alone (mode 0700): only they reach the socket."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ControlError(f"daemon.control {endpoint}: {directory} must belong to this user and be closed to others (chmod 700)")


def _refused(endpoint: str) -> bool:
    """True when a plain connect shows nothing listens at `endpoint` (a socket file that is not there or was left by a
    daemon that died, a closed local port): said at once, not after the whole timeout. ZeroMQ drops such a bare
    connection as it drops any peer that never greets."""
    if endpoint.startswith("ipc://@"):
        return False  # Linux's abstract socket names: left to ZeroMQ
    address: str | tuple[str, int]
    if endpoint.startswith("ipc://"):
        family, address = socket.AF_UNIX, endpoint.removeprefix("ipc://")
    elif endpoint.startswith("tcp://") and ":" in endpoint[6:]:
        host, _, port = endpoint[6:].rpartition(":")
        if not port.isdigit() or host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            return False  # a remote host (or a ZeroMQ form this does not read) is left to ZeroMQ and its timeout
        family, address = (socket.AF_INET6, (host.strip("[]"), int(port))) if ":" in host else (socket.AF_INET, (host, int(port)))
    else:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except OSError:
            return False
    return False


def _ask(endpoint: str, parts: list[bytes], timeout_s: float) -> dict[str, Any] | None:
    """One request and its JSON answer, or None when nothing answers at `endpoint` within `timeout_s`."""
    endpoint = expand(endpoint)
    try:
        check_endpoint(endpoint)
    except ValueError as error:
        raise ControlError(f"{endpoint}: {error}") from None
    if _refused(endpoint):
        return None  # nothing listens: ZeroMQ would retry until the timeout
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(parts)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        answer = json.loads(sock.recv())
        return answer if isinstance(answer, dict) else {"error": f"an answer that is no JSON object ({type(answer).__name__})"}
    finally:
        sock.close()


def query_status(endpoint: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """A running daemon's status, or None when nothing answers at `endpoint` within `timeout_s`."""
    answer = _ask(endpoint, [STATUS_REQUEST], timeout_s)
    return None if answer is None or "error" in answer else answer


def request_follow(endpoint: str, path: Path | str, timeout_s: float = 5.0, output_root: Path | str | None = None) -> dict[str, Any]:
    """Ask the daemon at `endpoint` to follow the scan file `path` now (GDA's trigger, without waiting for the watcher),
    its store under `output_root` if given (a folder the daemon may write in: inside its watched directories or
    `output.root`), else where the daemon puts stores.

    Its answer: `{"accepted": true, "store": ..., "queued": ...}` (`queued` false when the store is already final for
    this very file: nothing more will be written), or `{"accepted": false, "reason": "<one line>"}`. ControlError when
    nothing answers within `timeout_s` (no daemon there, or one too busy): the caller may ask again later."""
    parts = [os.fsencode(part) for part in (path, output_root) if part is not None]
    if sum(map(len, parts)) > MAX_REQUEST_BYTES:
        return {"accepted": False, "reason": f"{str(path)[:80]}...: a path longer than {MAX_REQUEST_BYTES} bytes"}
    answer = _ask(endpoint, [FOLLOW_REQUEST, *parts], timeout_s)
    if answer is None:
        raise ControlError(f"no daemon answers at {expand(endpoint)} within {timeout_s:g} s")
    if "error" in answer:  # a daemon of a version without follow, or one whose follow failed
        return {"accepted": False, "reason": f"the daemon at {expand(endpoint)} refused: {answer['error']}"}
    return answer
