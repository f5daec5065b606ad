"""A worker sent a frame it cannot take gives its room back instead of losing it.

Frames wider than the wire carries (`wire.MAX_SIDE`) once reached workers (the follower now refuses them, see
test_bad_scans): each was dropped with a warning, its credit never came back, and a worker sent `credit` of them took
no more frames at all. Here a real worker process meets a daemon (a bare ROUTER socket) that sends such a frame.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.live import wire
from pipeline.testing.configs import MODELS_OFF, write_config

pytestmark = pytest.mark.daemon


def _next_message(sock: zmq.Socket, wanted: bytes, timeout_s: float) -> tuple[bytes, list[bytes]]:
    """The next message of kind `wanted` (heartbeats skipped): (the worker's identity, its parts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            identity, *parts = sock.recv_multipart()
            if parts[0] == wanted:
                return identity, parts
    raise AssertionError(f"no {wanted!r} message from the worker within {timeout_s} s")


def test_a_frame_the_wire_refuses_gives_its_credit_back_and_the_next_frame_is_served(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="wbf-"))  # a short path: a socket file's name must fit 107 bytes
    endpoint = f"ipc://{folder / 'workers'}"
    context = zmq.Context()
    daemon = context.socket(zmq.ROUTER)
    daemon.bind(endpoint)
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF)
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--connect", endpoint, "--config", str(config),
                               "--device", "cpu", "--threads", "1", "--name", "picky"], stderr=subprocess.PIPE, text=True)
    try:
        identity, hello = _next_message(daemon, wire.HELLO, 120)
        assert json.loads(hello[1])["n"] == 4  # the config's credit

        wide = np.ones((1, 10000), dtype=np.int32)  # a line detector's frame
        header = {"task": 1, "scan": "line.nxs", "frame": 0, "dtype": "int32", "shape": [1, 10000]}
        daemon.send_multipart([identity, wire.FRAME, json.dumps(header).encode(), wide.tobytes()])
        _, credit = _next_message(daemon, wire.CREDIT, 10)
        assert json.loads(credit[1]) == {"n": 1}

        good = wire.FrameTask(task=2, scan="area.nxs", frame=0, data=np.full((195, 487), 3, dtype=np.int32))
        daemon.send_multipart([identity, *(bytes(part) for part in wire.encode_frame(good))])
        _, result = _next_message(daemon, wire.RESULT, 30)
        decoded = wire.decode_result(result)
        assert (decoded.task, decoded.scan, decoded.frame, decoded.prediction.tlm_labels.shape) == (2, "area.nxs", 0, (195, 487))
    finally:
        worker.terminate()
        try:
            _, err = worker.communicate(timeout=30)
        finally:
            if worker.poll() is None:
                worker.kill()
        daemon.close(linger=0)
        context.term()
        shutil.rmtree(folder, ignore_errors=True)
    assert "ignored a bad message from the daemon: header field 'shape' must be two sides in 1..8192: [1, 10000]" in err
