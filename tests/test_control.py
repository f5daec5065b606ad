"""The control socket against odd and hostile requests, and a control port that is already taken.

A real daemon answers `pipeline status` on `daemon.control`. A peer that sends a two-part request,
an empty one or garbage must get an answer or a refusal, and the next honest request must still be
answered; a second daemon started on a port that is already taken must stop at once with one line
naming the endpoint, rather than run with a `pipeline status` that talks to the other one.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from pipeline.live.control import query_status
from pipeline.testing.configs import MODELS_OFF, control_endpoint, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_workers, wait_until

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


def test_follow_takes_only_a_regular_scan_file_inside_the_watched_directories_and_says_why_in_one_line(tmp_path: Path) -> None:
    """`follow PATH` (the Zocalo service's request): anything but a regular file inside the watched directories whose name
    matches watch.patterns is refused with one line naming the path and the reason, at once (a FIFO is not opened); a
    scan file is queued once however often it is asked for; malformed requests get an error; status still answers."""
    from pipeline.live.control import ControlError, request_follow
    from pipeline.testing.files import nexus_file

    watched = tmp_path / "scans"
    watched.mkdir()
    # the daemon would not find anything by itself for 10 minutes; no worker: a followed scan stays `running`
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0},
                          watch={"mode": "polling", "poll_interval_s": 600.0, "rescan_interval_s": 600.0, "resume_existing": False},
                          output={"requested_roots": [str(watched / "processing"), str(watched / "notes.txt")]})
    endpoint = control_endpoint(config)
    outside = nexus_file(tmp_path / "outside.nxs", shape=(3, 4, 5), dtype="int32")
    scan = nexus_file(watched / "scan.nxs", shape=(3, 4, 5), dtype="int32")
    os.mkfifo(watched / "fifo.nxs")
    (watched / "folder.nxs").mkdir()
    (watched / "notes.txt").write_text("not a scan")
    (watched / "escape.nxs").symlink_to(outside)
    daemon = start_daemon(config, watched, tmp_path / "daemon.log")
    try:
        wait_for_workers(config, 0)
        roots = f"outside the watched directories ({watched}); nothing outside them is read"
        refusals = {
            str(outside): f"{outside}: {roots}",
            f"{watched}/../outside.nxs": f"{outside}: {roots}",  # `..` taken out before the check
            str(watched / "escape.nxs"): f"{watched / 'escape.nxs'}: {roots}",  # a link inside that leads outside
            str(watched / "missing.nxs"): f"{watched / 'missing.nxs'}: no such file",
            str(watched / "fifo.nxs"): f"{watched / 'fifo.nxs'}: a FIFO, not a regular file; only regular files are read",
            str(watched / "folder.nxs"): f"{watched / 'folder.nxs'}: a directory, not a regular file; only regular files are read",
            str(watched / "notes.txt"): f"{watched / 'notes.txt'}: the name matches no watch.patterns (*.nxs)",
            "scans/scan.nxs": "'scans/scan.nxs': not an absolute path; send the scan file's absolute path",
            f"{watched}/a\0b.nxs": f"'{watched}/a\\x00b.nxs': a NUL byte in the path",
        }
        for path, reason in refusals.items():
            started = time.monotonic()
            answer = request_follow(endpoint, path, timeout_s=5.0) if "\0" not in path else json.loads(
                (_ask(endpoint, [b"follow", path.encode()]) or [b"{}"])[0])
            assert answer == {"accepted": False, "reason": reason}, path
            assert time.monotonic() - started < 3.0, f"{path}: answered only after {time.monotonic() - started:.1f} s"
        for parts in ([b"follow"], [b"follow", str(scan).encode(), b"/out", b"more"], [b"follow", b""]):
            reply = _ask(endpoint, parts)
            assert reply is not None and ("error" in json.loads(reply[0]) or not json.loads(reply[0])["accepted"]), parts
        elsewhere, a_file = tmp_path / "out", watched / "notes.txt"
        root_refusals = {
            "more": "'more': not an absolute path; send the output root's absolute path",
            str(elsewhere): f"{scan}: output root {elsewhere} is not one of output.requested_roots ({watched / 'processing'}, "
                            f"{a_file}); no store is written elsewhere",
            str(watched / "processing" / ".."): f"{scan}: output root {watched} is not one of output.requested_roots "
                                                f"({watched / 'processing'}, {a_file}); no store is written elsewhere",
            str(a_file): f"{scan}: output root {a_file} is not a folder",
        }
        for root, reason in root_refusals.items():
            assert request_follow(endpoint, scan, timeout_s=5.0, output_root=root) == {"accepted": False, "reason": reason}, root
        assert not elsewhere.exists()

        store = str(scan.with_suffix(".zarr"))
        followed = {"accepted": True, "scan": str(scan), "store": store, "queued": True, "pid": daemon.pid}
        assert request_follow(endpoint, scan, timeout_s=5.0) == followed
        wait_until(lambda: [s["path"] for s in query_status(endpoint, timeout_s=3.0)["scans"]] == [str(scan)], 30, "the scan followed")
        for _ in range(2):  # asked again while it is followed: nothing more is queued
            assert request_follow(endpoint, scan, timeout_s=5.0) == followed
        # another output root asked for a scan followed already: it keeps its store, and the answer says where that is
        assert request_follow(endpoint, scan, timeout_s=5.0, output_root=watched / "processing") == followed
        status = query_status(endpoint, timeout_s=3.0)
        assert status is not None and status["waiting_scans"] == 0 and [s["path"] for s in status["scans"]] == [str(scan)], status
    finally:  # no worker: the scan's frames would never be done, so the second SIGTERM stops without waiting for them
        daemon.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    with pytest.raises(ControlError, match="no daemon answers at"):  # the daemon has stopped: nothing listens there now
        request_follow(endpoint, scan, timeout_s=1.0)


@pytest.mark.daemon
def test_a_store_under_a_requested_output_root_is_found_again_by_a_restarted_daemon(tmp_path: Path) -> None:
    """A follow request put a scan's store under the visit's processing folder. The next daemon, looking at every scan
    whose store is missing or not complete (watch.resume_existing), finds it there: it makes no second store beside the
    scan, and processes nothing again."""
    from pipeline.live.control import request_follow
    from pipeline.store import open_live, store_status
    from pipeline.testing.files import nexus_file

    watched = tmp_path / "scans"
    processing = watched / "processing"
    (watched / "sample").mkdir(parents=True)
    scan = watched / "sample" / "1234.nxs"  # written once the first daemon has looked (it polls every 10 minutes)
    config = write_config(tmp_path / "config.yaml", None, models=MODELS_OFF, output={"requested_roots": [str(processing)]},
                          watch={"mode": "polling", "poll_interval_s": 600.0, "rescan_interval_s": 600.0})
    endpoint = control_endpoint(config)
    store = processing / "sample" / "1234.zarr"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    for log in logs:
        daemon = start_daemon(config, watched, log)
        try:
            wait_for_workers(config, 1)
            if log == logs[0]:
                nexus_file(scan, shape=(3, 32, 32), dtype="int32")
                assert request_follow(endpoint, scan, timeout_s=5.0, output_root=processing)["store"] == str(store)
                wait_until(lambda: store_status(store) == "complete", 60, "the store complete under the output root")
                ended = open_live(store).attrs["end_time"]
            else:
                time.sleep(3.0)  # its first look at the watched directory, and any scan it would queue, done by now
                status = query_status(endpoint, timeout_s=3.0)
        finally:
            stop_daemon(daemon)
    assert not scan.with_suffix(".zarr").exists()
    assert status is not None and status["scans"] == [] and status["waiting_scans"] == 0, status
    assert open_live(store).attrs["end_time"] == ended and "following" not in logs[1].read_text()
