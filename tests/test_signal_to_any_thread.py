"""A SIGTERM that the kernel hands to one of the daemon's other threads still stops it.

Linux delivers a signal sent to a process to any of its threads that does not block it (the main
thread when it can take it, but not always). CPython then runs the Python handler in the main thread
only once that thread runs again: a main thread blocked in an untimed `Event.wait()` never does, and
`pipeline run` ignored the SIGTERM for good (CI saw a daemon not stop within 60 s, with no "SIGTERM"
line in its log). Here the signal is sent to one such thread on purpose, with tgkill(2).
"""

from __future__ import annotations

import ctypes
import platform
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import poll, start_daemon, stop_daemon, wait_for_workers

pytestmark = pytest.mark.daemon

TGKILL = {"x86_64": 234, "aarch64": 131}  # the syscall's number: glibc has no wrapper older systems all carry


def _tgkill(pid: int, tid: int, signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(TGKILL[platform.machine()], pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {signum})")


def _threads_taking(pid: int, signum: int) -> list[int]:
    """The daemon's threads other than its main one that do not block `signum` (libzmq's own threads block all)."""
    taking = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        tid = int(task.name)
        blocked = next(int(line.split()[1], 16) for line in (task / "status").read_text().splitlines() if line.startswith("SigBlk:"))
        if tid != pid and not blocked & (1 << (signum - 1)):
            taking.append(tid)
    return taking


def _daemon_with_its_worker(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`pipeline run` (models off), once its worker joined: the process, its config, its log."""
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, scans, log)
    try:
        wait_for_workers(config, 1)
    except BaseException:
        daemon.kill()
        daemon.wait()
        raise
    return daemon, config, log


def test_a_sigterm_taken_by_another_thread_stops_the_daemon(tmp_path: Path) -> None:
    daemon, config, log = _daemon_with_its_worker(tmp_path)
    try:
        threads = _threads_taking(daemon.pid, signal.SIGTERM)
        assert threads, "no thread of the daemon but its main one takes SIGTERM: the test would prove nothing"
        _tgkill(daemon.pid, threads[-1], signal.SIGTERM)
        code = daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert "SIGTERM: draining frames in flight, then stopping" in text, text[-2000:]


def test_sigusr1_prints_every_threads_stack_and_the_daemon_goes_on(tmp_path: Path) -> None:
    """For a daemon that seems stuck: `kill -USR1 PID` puts each thread's stack in its log (the test kit does it to a
    daemon that does not stop, before killing it)."""
    daemon, config, log = _daemon_with_its_worker(tmp_path)
    try:
        daemon.send_signal(signal.SIGUSR1)
        assert poll(lambda: 'in _scheduler_loop' in log.read_text(), timeout=10), log.read_text()[-3000:]
        text = log.read_text()
        assert "Current thread" in text or "Thread 0x" in text
        assert 'File "' in text and "in wait" in text  # the main thread, waiting for a signal
        wait_for_workers(config, 1)  # still serving
    finally:
        stop_daemon(daemon)
    assert daemon.returncode == 0
