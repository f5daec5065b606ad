"""`pipeline worker --leave-after S`: a worker whose daemon is gone ends, so that a batch job does not hold its node
(and its GPU) until its time limit; one whose daemon is there, busy or idle, stays.

Without it a worker waits for its daemon for ever, to rejoin it after a restart: a SLURM job of a daemon killed with
kill -9 sat on its node until its time limit (hours), with nobody to cancel it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.testing.configs import MODELS_OFF, free_port, write_config
from pipeline.testing.daemons import start_daemon, wait_for_workers

pytestmark = pytest.mark.daemon


def _worker(config: Path, endpoint: str, log: Path, *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--connect", endpoint, "--config", str(config), "--name", "leaver",
                             *options], stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_a_worker_that_never_reaches_a_daemon_leaves_after_the_time_given_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF)
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    worker = _worker(config, endpoint, tmp_path / "worker.log", "--leave-after", "2")
    assert worker.wait(timeout=60) == 3
    log = (tmp_path / "worker.log").read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(f"no daemon reachable at {endpoint} for 2 s (--leave-after): this worker ends, "
                                                   "0 frame(s) it held unanswered (the daemon sends them to other workers)"), log
    assert time.monotonic() - started < 30 and "Traceback" not in log


@pytest.mark.parametrize("gone", ["killed", "silent"])
def test_a_worker_stays_with_an_idle_daemon_and_leaves_once_it_is_gone(tmp_path: Path, gone: str) -> None:
    """Killed: the connection closes at once. Silent (stopped, as a host that lost power: no FIN, no RST): the worker's
    ZMTP heartbeats go unanswered for workers.timeout_s (5 s), then the link counts as lost."""
    scans = tmp_path / "scans"
    scans.mkdir()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF, workers={"local": 0, "bind": endpoint, "heartbeat_s": 0.5,
                                                                                "timeout_s": 5.0})
    daemon = start_daemon(config, scans, tmp_path / "daemon.log")
    worker = _worker(config, endpoint, tmp_path / "worker.log", "--leave-after", "2")
    try:
        wait_for_workers(config, 1, timeout=60)
        time.sleep(4.0)  # twice --leave-after with nothing to do: an idle daemon is no absent one
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        # no goodbye, no stop message: the daemon is simply gone
        daemon.send_signal(signal.SIGKILL if gone == "killed" else signal.SIGSTOP)
        left = time.monotonic()
        assert worker.wait(timeout=60) == 3
        took = time.monotonic() - left
    finally:
        for process in (daemon, worker):
            if process.poll() is None:
                process.kill()  # a stopped process too
                process.wait()
    log = (tmp_path / "worker.log").read_text()
    assert f"lost the daemon at {endpoint}; this worker ends if it is not back within 2 s" in log, log
    assert f"no daemon reachable at {endpoint} for 2 s (--leave-after)" in log, log
    assert (2.0 if gone == "killed" else 7.0) <= took < 25, took  # --leave-after, after the heartbeats' 5 s when silent
