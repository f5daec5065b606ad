"""Local workers use a channel other local users cannot reach; a bind beyond loopback needs CurveZMQ.

By default the dispatcher opens no TCP port: its endpoint is a socket file in a directory only the
daemon's user can open. A process of another user (uid 65534, nobody) that connects there and says
hello is never a worker and is sent nothing, while a peer of the daemon's own user joins. A config
that binds the worker port on all interfaces without CurveZMQ is refused in one line.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.config import ConfigError, WorkerSettings, load_config
from pipeline.live import wire
from pipeline.live.dispatch import Dispatcher

OTHER_USER = """
import os, sys, zmq
os.setgid(65534); os.setuid(65534)
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
sock.send_multipart([b"hello", b'{"name": "intruder", "n": 4}'])
print("got a frame" if sock.poll(3000) else "got nothing")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_local_user_cannot_join_the_private_worker_socket(tmp_path: Path) -> None:
    dispatcher = Dispatcher(WorkerSettings(credit=2), lambda d, r, e: None).start()
    try:
        assert dispatcher.endpoint.startswith("ipc://") and dispatcher.endpoint == dispatcher.local_endpoint
        directory = Path(dispatcher.endpoint.removeprefix("ipc://")).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        dispatcher.submit("scan", 0, np.zeros((4, 5), np.int32))
        other = subprocess.run([sys.executable, "-c", OTHER_USER, dispatcher.endpoint], capture_output=True, text=True, timeout=60,
                               cwd="/")
        assert "got nothing" in other.stdout, other.stdout + other.stderr[-2000:]
        assert dispatcher.stats()["workers"] == []
        own = zmq.Context.instance().socket(zmq.DEALER)
        own.connect(dispatcher.endpoint)
        own.send_multipart(wire.encode_control(wire.HELLO, {"name": "own", "n": 2}))
        assert own.poll(5000) and wire.decode_frame(own.recv_multipart()).frame == 0
        assert [w["name"] for w in dispatcher.stats()["workers"]] == ["own"]
        own.close(linger=0)
    finally:
        dispatcher.stop()


def test_a_bind_beyond_loopback_without_curve_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "open.yaml"
    path.write_text("workers:\n  bind: tcp://0.0.0.0:5555\n")
    with pytest.raises(ConfigError, match="beyond this host without CurveZMQ"):
        load_config(path)
    path.write_text("workers:\n  bind: tcp://0.0.0.0:5555\n  insecure: true\n")
    assert load_config(path).workers.bind == "tcp://0.0.0.0:5555"
    path.write_text("workers:\n  bind: tcp://127.0.0.1:5555\n")
    assert load_config(path).workers.bind == "tcp://127.0.0.1:5555"
