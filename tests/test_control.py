"""The control socket against odd and hostile requests, and a control port that is already taken.

A real daemon answers `pipeline status` on `daemon.control`. A peer that sends a two-part request,
an empty one or garbage must get an answer or a refusal, and the next honest request must still be
answered; a second daemon started on a port that is already taken must stop at once with one line
naming the endpoint, rather than run with a `pipeline status` that talks to the other one.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from pipeline.live.control import query_status
from pipeline.testing.configs import control_endpoint, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_workers

pytestmark = pytest.mark.daemon


def _ask(endpoint: str, parts: list[bytes], timeout_ms: int = 3000) -> list[bytes] | None:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(parts)
        return sock.recv_multipart() if sock.poll(timeout_ms) else None
    finally:
        sock.close()


def test_odd_requests_are_answered_or_refused_and_the_control_socket_keeps_serving(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    endpoint = control_endpoint(config)
    watched = tmp_path / "scans"
    watched.mkdir()
    daemon = start_daemon(config, watched, tmp_path / "daemon.log")
    try:
        wait_for_workers(config, 0)
        answered = 0
        for parts in ([b"status", b"and more"], [b""], [b"\xff\xfe garbage"], [b"status"] * 5, [b"x" * 4000]):
            reply = _ask(endpoint, parts)
            assert reply is not None, f"no answer to {parts[:2]!r}"
            body = json.loads(reply[0])
            assert ("error" in body) != (parts == [b"status"])
            answered += 1
        status = query_status(endpoint, timeout_s=3.0)
        assert status is not None and status["pid"] == daemon.pid, "the control socket stopped answering"
        assert answered == 5
    finally:
        stop_daemon(daemon)
    assert daemon.returncode == 0


def test_a_control_port_already_taken_stops_the_second_daemon_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    watched = tmp_path / "scans"
    watched.mkdir()
    first = start_daemon(config, watched, tmp_path / "first.log")
    try:
        wait_for_workers(config, 0)
        second = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watched)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        lines = [line for line in second.stderr.splitlines() if line.startswith("pipeline run:")]
        assert len(lines) == 1 and control_endpoint(config) in lines[0] and "in use" in lines[0], second.stderr[-2000:]
        status = query_status(control_endpoint(config), timeout_s=3.0)
        assert status is not None and status["pid"] == first.pid  # the first daemon still answers its own socket
    finally:
        stop_daemon(first)


OTHER_USER_STATUS = """
import os, sys
from pipeline.live.control import query_status  # imported first: the other user cannot read this Python's files
os.setgid(65534); os.setuid(65534)
try:
    print("answered" if query_status(sys.argv[1], timeout_s=2.0) is not None else "no answer")
except Exception as error:
    print("refused:", type(error).__name__)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_the_default_control_socket_answers_only_its_own_user(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/run/control"
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0}, daemon={"control": endpoint})
    tmp_path.chmod(0o755)  # others may look into the test's directory, as into a home directory
    watched = tmp_path / "scans"
    watched.mkdir()
    daemon = start_daemon(config, watched, tmp_path / "daemon.log")
    try:
        wait_for_workers(config, 0)
        assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
        other = subprocess.run([sys.executable, "-c", OTHER_USER_STATUS, endpoint], capture_output=True, text=True, timeout=60, cwd="/",
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert "answered" not in other.stdout and other.stdout.strip(), other.stdout + other.stderr[-2000:]
        status = query_status(endpoint, timeout_s=3.0)
        assert status is not None and status["pid"] == daemon.pid
    finally:
        stop_daemon(daemon)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    config = write_config(tmp_path / "open.yaml", None, workers={"local": 0}, daemon={"control": f"ipc://{open_dir}/control"})
    refused = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watched)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "closed to others" in refused.stderr, refused.stderr[-2000:]
