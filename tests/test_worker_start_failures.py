"""A worker that cannot start is not restarted for ever: back-off, a reason, and `pipeline process` gives up.

`pipeline process --device cuda` on a machine without CUDA: every local worker exits at once with
one line ("device 'cuda' asked for, but CUDA is not available here"). The daemon must restart it
with growing waits (not hundreds of times), keep the reason, and `pipeline process` must exit
non-zero with one line saying why no worker can run, instead of spinning until killed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.testing.configs import write_config

pytestmark = pytest.mark.daemon


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA (the GPU machine has it)")
def test_workers_that_cannot_start_back_off_and_process_exits_with_the_reason(tmp_path: Path, untrained_weights) -> None:
    plan = ScanPlan(directory=tmp_path / "scans", name="nocuda", layout="nexus", n_frames=3, rate_hz=1000.0, seed=2)
    write_scan(plan)
    config = write_config(tmp_path / "config.yaml", untrained_weights, workers={"local": 1})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--device", "cuda", "--no-progress",
                             str(plan.nxs_path)], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("pipeline process:")]
    assert len(lines) == 1 and "no local worker can start" in lines[0] and "CUDA is not available" in lines[0], result.stderr[-3000:]
    starts = result.stderr.count("failed to start")
    assert 3 <= starts <= 4, f"{starts} failed starts logged in {elapsed:.0f} s"


def test_a_worker_that_crashes_after_joining_is_called_a_crash_and_replaced(tmp_path: Path) -> None:
    """A local worker that died mid-scan was logged as one that 'failed to start' (its exit came soon after its start),
    which sends a person looking at the device or the install. It joined: it crashed, and another one takes its place."""
    import os

    from pipeline.testing.configs import MODELS_OFF
    from pipeline.testing.slow_worker import CRASH_ENV

    plan = ScanPlan(directory=tmp_path / "scans", name="crashes", layout="nexus", n_frames=6, rate_hz=1000.0, seed=3)
    write_scan(plan)
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF,
                          workers={"local": 1, "batch_size": 1, "credit": 1,
                                   "command": [sys.executable, "-m", "pipeline.testing.slow_worker"]})
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(plan.nxs_path)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, CRASH_ENV: "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "crashes: complete" in result.stdout or "crashes.nxs: complete" in result.stdout, result.stdout
    crashes = [line for line in result.stderr.splitlines() if "after joining" in line]
    assert crashes and all("exited with 3 after joining" in line for line in crashes), result.stderr[-3000:]
    assert "failed to start" not in result.stderr


def test_local_workers_start_under_a_daemon_whose_web_view_has_a_token(tmp_path: Path) -> None:
    """The workers' config file was the daemon's config dumped as JSON, its web token as `**********`: too short to
    load, so with a token set no local worker could start."""
    from pipeline.testing.configs import MODELS_OFF

    plan = ScanPlan(directory=tmp_path / "scans", name="token", layout="nexus", n_frames=4, rate_hz=1000.0, seed=4)
    write_scan(plan)
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF, web={"token": "a-long-enough-token-for-the-web-view-1234"})
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(plan.nxs_path)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "token.nxs: complete" in result.stdout or "token: complete" in result.stdout, result.stdout
    assert "failed to start" not in result.stderr and "too short" not in result.stderr
