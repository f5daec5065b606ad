"""`pipeline status` against a real daemon following a scan written live, and with no daemon at all.

Everything runs as the user would: the daemon is `python -m pipeline run`, and status is asked
with `python -m pipeline status` in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.testing.configs import write_config
from pipeline.testing.daemons import stop_daemon

pytestmark = pytest.mark.daemon

N_FRAMES = 8


def pipeline_status(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "status", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=60)


def status_json(config: Path) -> dict[str, Any] | None:
    """The daemon's status, or None while no daemon answers."""
    result = pipeline_status(config, "--json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def poll_status(config: Path, until: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = status_json(config)
        if status is not None and until(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout} s; last status: {status}")


def scan_entry(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((scan for scan in status["scans"] if scan["scan"] == name), None)


def test_status_follows_a_live_scan(tmp_path, untrained_weights):
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights)
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(scans)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    plan = ScanPlan(directory=scans, name="status-scan", layout="gda9", n_frames=N_FRAMES, rate_hz=4.0, seed=7)
    name = plan.nxs_path.name
    try:
        ready = poll_status(config, lambda s: len(s["dispatch"]["workers"]) == 1, timeout=180, what="one worker")
        assert ready["scans"] == [] and ready["uptime_s"] > 0
        writer = ScanWriter(plan).start()
        seen_running = poll_status(config, lambda s: scan_entry(s, name) is not None, timeout=120, what=f"{name} in status")
        finished = poll_status(config, lambda s: (scan_entry(s, name) or {}).get("status") == "complete", timeout=180,
                               what=f"{name} complete")
        writer.join(timeout=30)
        time.sleep(2.0)
        later = status_json(config)
        text = pipeline_status(config)
    finally:
        stop_daemon(daemon)
    daemon_log = log.read_text()
    assert daemon.returncode == 0, daemon_log[-3000:]

    assert scan_entry(seen_running, name)["status"] in ("opening", "running", "complete")
    scan = scan_entry(finished, name)
    assert scan["frames_done"] == N_FRAMES and scan["frames_read"] == N_FRAMES, scan
    assert scan["store"] == str(plan.nxs_path.with_suffix(".zarr")) and scan["reason"] == "finished"
    assert scan["fps"] > 0
    # the rate of a scan that has ended stops there (it fell for ever: frames over the time since the scan began)
    assert later is not None and scan_entry(later, name)["fps"] == scan["fps"], (scan, later)
    assert finished["uptime_s"] > ready["uptime_s"]
    assert finished["pid"] == daemon.pid
    [worker] = finished["dispatch"]["workers"]
    assert worker["device"] == "cpu" and worker["frames_done"] == N_FRAMES and worker["in_flight"] == 0
    assert finished["dispatch"]["results"] == N_FRAMES and finished["dispatch"]["in_flight"] == 0

    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"daemon pid {daemon.pid}, up ")
    assert any(line.strip().startswith("worker ") and " on cpu: " in line for line in lines), text.stdout
    assert any(line.strip().startswith(f"{name}: complete (finished), {N_FRAMES}/{N_FRAMES} frames done, ") for line in lines), text.stdout


def test_status_without_a_daemon_is_one_line_and_exit_1(tmp_path):
    config = write_config(tmp_path / "config.yaml")  # a free port nobody listens on
    endpoint = yaml.safe_load(config.read_text())["daemon"]["control"]
    for extra in ((), ("--json",)):
        result = pipeline_status(config, *extra)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == (f"no daemon answers at {endpoint} (daemon.control in {config}); is `pipeline run` running with this "
                                 "config? (--endpoint or --config names another daemon)\n")


def test_a_resumed_scan_s_rate_is_this_run_s_frames_over_this_run_s_time():
    """A run resumed at frame 28 that did the last 12 in 6 s: 2 frames/s, not 40 over 6 s, and no lower a minute later."""
    from pipeline.live.session import SessionState

    state = SessionState(frames_read=40, frames_done=40, started=1000.0, done_before=28, ended=1006.0)
    assert state.frames_per_second(now=1066.0) == 2.0
    assert SessionState(frames_done=10, started=1000.0).frames_per_second(now=1004.0) == 2.5  # still running
