"""A worker ends at once when it is done, says goodbye first, and the daemon's stop does not start it again.

A worker with torch and torchvision loaded spent ~0.9 s in the interpreter's teardown after its last line,
and every stop of the daemon (the end of each `pipeline process` included) waited for it. It now ends
without that teardown (cli._end_worker_now), once ZeroMQ has delivered what it still owed. Ending that
quickly showed a race: a `supervise` of the daemon's scheduler still running at the stop saw the
workers gone, called it a crash and started new ones, which the stop then waited 10 s each for.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import WorkerSettings, load_config
from pipeline.live.dispatch import Dispatcher
from pipeline.live.local_workers import LocalWorkers
from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.testing.configs import write_config
from pipeline.testing.daemons import wait_until

pytestmark = pytest.mark.daemon


def test_a_worker_stopped_by_sigterm_says_goodbye_before_it_ends(tmp_path: Path, untrained_weights, caplog) -> None:
    """The goodbye is what makes the daemon hand the worker's frames on at once, not after `workers.timeout_s` of
    silence: it must leave the worker's socket before the process ends without its teardown."""
    caplog.set_level(logging.INFO, logger="pipeline.live.dispatch")
    dispatcher = Dispatcher(WorkerSettings(timeout_s=600.0), lambda dispatch, result, error: None).start()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models={"backend": "torch"})
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--connect", dispatcher.endpoint, "--config", str(config),
                               "--device", "cpu", "--threads", "1", "--name", "leaving"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: [w["name"] for w in dispatcher.stats()["workers"]] == ["leaving"], 120, "the worker joined")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        wait_until(lambda: not dispatcher.stats()["workers"], 10, "the worker left")  # far sooner than 600 s of silence
        assert "worker leaving left (said bye)" in caplog.text
    finally:
        if worker.poll() is None:
            worker.kill()
        dispatcher.stop()


def test_retired_local_workers_that_exit_are_not_started_again(tmp_path: Path) -> None:
    """Real processes that exit at once, as stopped workers now do: `supervise` replaces them until the daemon's
    stop has retired the pool, and not after."""
    config = load_config(write_config(tmp_path / "config.yaml", workers={"local": 2, "command": [sys.executable, "-c", "pass"]}))
    pool = LocalWorkers(config, endpoint="ipc:///nowhere", private_folder=tmp_path, joined=lambda pid: True)  # as if each had joined: its exit is a crash
    pool.start()
    try:
        first = [process.pid for process in pool.processes()]
        wait_until(lambda: all(process.poll() is not None for process in pool.processes()), 30, "the workers exited")
        pool.supervise()
        again = [process.pid for process in pool.processes()]
        assert len(again) == 2 and not set(again) & set(first)  # exited before the stop: replaced
        wait_until(lambda: all(process.poll() is not None for process in pool.processes()), 30, "the workers exited")
        pool.retire()
        pool.supervise()
        assert [process.pid for process in pool.processes()] == again  # exited at the stop: left alone
    finally:
        pool.stop()


def test_process_ends_without_restarting_its_workers(tmp_path: Path, untrained_weights) -> None:
    """`pipeline process` with two torch workers: both stop when the scan is done, and none is started again."""
    plan = ScanPlan(directory=tmp_path / "scans", name="ends", layout="nexus", n_frames=6, rate_hz=1000.0, seed=5)
    write_scan(plan)
    config = write_config(tmp_path / "config.yaml", untrained_weights, models={"backend": "torch"}, workers={"local": 2})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(plan.nxs_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ends.nxs: complete" in result.stdout, result.stdout
    assert result.stderr.count("joined (cpu") == 2, result.stderr[-3000:]
    assert "starting another" not in result.stderr and "failed to start" not in result.stderr, (
        f"{time.monotonic() - started:.0f} s: {result.stderr[-3000:]}")
