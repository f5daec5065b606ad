"""Real daemons for tests: `pipeline run` as a child process, and waiting for what it does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.live.control import query_status
from pipeline.store import schema, store_status
from pipeline.testing.configs import control_endpoint


def start_daemon(config: Path, watch: Path, log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """`pipeline run --config CONFIG --watch WATCH` (started in `cwd`, where the operator stood), its output in `log`."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watch)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd)


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a drained stop), then wait. One that does not stop within a minute is made to print its threads' stacks
    (SIGUSR1, see StopSignals.install), killed, and the end of its log raised: what it was stuck on."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        try:
            log = Path(os.readlink(f"/proc/{process.pid}/fd/1"))  # where start_daemon sent its output
        except OSError:
            log = None
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        process.kill()
        process.wait()
        tail = log.read_text(errors="replace")[-6000:] if log is not None and log.is_file() else "(no log found)"
        raise AssertionError(f"the daemon (pid {process.pid}) did not stop within 60 s of SIGTERM; the end of its log, "
                             f"its threads' stacks last:\n{tail}") from None


def wait_for_workers(config: Path, count: int, timeout: float = 120) -> None:
    """Block until the daemon behind `config` reports `count` workers (they import torch: seconds)."""
    endpoint = control_endpoint(config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = query_status(endpoint, timeout_s=1.0)
        if status is not None and len(status["dispatch"]["workers"]) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {count} worker(s) joined within {timeout} s")


def wait_for_status(stores: list[Path], timeout: float, wanted: Iterable[str] = schema.FINAL_STATUSES, poll_s: float = 0.2) -> None:
    """Block until every store records one of the `wanted` statuses; AssertionError naming the laggards otherwise."""
    wanted = tuple(wanted)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(store_status(s) in wanted for s in stores):
            return
        time.sleep(poll_s)
    raise AssertionError(f"stores not finished in {timeout} s: {[(s.name, store_status(s)) for s in stores]}")


def poll(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """True as soon as `predicate()` is true, False if it is still not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Like `poll`, but an AssertionError saying `what` did not happen."""
    if not poll(predicate, timeout, interval=0.1):
        raise AssertionError(f"not within {timeout} s: {what}")
