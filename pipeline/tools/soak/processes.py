"""The processes a soak runs: the daemon (`pipeline run`, one `Incarnation` per start) and the remote workers
(`pipeline worker --connect`, restarted when they exit, as systemd would)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tools.soak.settings import STOP_TIMEOUT_S, WORKERS_EXIT_S

if TYPE_CHECKING:
    import psutil


def _reap(children: list[psutil.Process]) -> list[int]:
    """Workers still alive once their daemon is gone: killed, and their pids returned as a defect to report."""
    import psutil

    _, alive = psutil.wait_procs(children, timeout=WORKERS_EXIT_S)
    survivors = []
    for child in alive:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                survivors.append(child.pid)
                child.kill()
        except psutil.Error:
            pass
    return survivors


# --------------------------------------------------------------------------- the daemon as a subprocess


@dataclass
class Incarnation:
    """One `pipeline run` process from start to end."""

    number: int
    pid: int
    log: Path
    started: float
    ready_at: float | None = None
    ended: float | None = None
    how_ended: str | None = None  # killed (by the soak) | exited N (on its own) | stopped (SIGTERM) | ...
    rejected: int = 0
    received: int = 0  # messages of any kind its dispatcher read
    hostile_sent: int = 0
    last_hostile_at: float | None = None
    status_at: float = 0.0  # when its status (with the rejected count) was last read
    peak_rss_mib: float = 0.0
    first_rss_mib: float | None = None
    last_rss_mib: float | None = None
    worker_pids: set[int] = field(default_factory=set)


class DaemonProcess:
    def __init__(self, config_path: Path, watch: Path, logs: Path, endpoint: str) -> None:
        self.config_path, self.watch, self.logs, self.endpoint = config_path, watch, logs, endpoint
        self.process: subprocess.Popen[bytes] | None = None
        self.incarnations: list[Incarnation] = []

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations and self.incarnations[-1].ended is None else None

    def start(self) -> Incarnation:
        number = len(self.incarnations) + 1
        log = self.logs / f"daemon-{number}.log"
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "--config", str(self.config_path), "--watch", str(self.watch)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        incarnation = Incarnation(number, self.process.pid, log, time.time())
        self.incarnations.append(incarnation)
        return incarnation

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError("the soak's daemon was never started")
        return self.process

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self, timeout_s: float = 1.0) -> dict[str, Any] | None:
        from pipeline.live.control import query_status

        if not self.alive():
            return None
        try:
            status = query_status(self.endpoint, timeout_s=timeout_s)
        except Exception:  # a half-written reply from a daemon being killed
            return None
        if status is not None and self.current is not None and status.get("pid") != self.current.pid:
            return None  # an earlier daemon still answering on the port: not ours any more
        return status

    def workers(self) -> list[psutil.Process]:
        """The daemon's local worker processes (psutil), found as its children."""
        import psutil

        if not self.alive():
            return []
        try:
            children = psutil.Process(self._started().pid).children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for child in children:
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            if "worker" in command and any("pipeline" in part for part in command):
                found.append(child)
        return found

    def _children(self) -> list[psutil.Process]:
        import psutil

        try:
            return psutil.Process(self._started().pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> list[int]:
        """kill -9 the daemon; returns the pids of children that outlived it by WORKERS_EXIT_S (then killed)."""
        children = self._children()
        process = self._started()
        process.kill()
        process.wait()
        self._ended("killed")
        return _reap(children)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> tuple[str, list[int]]:
        """SIGTERM (drain), wait; returns how it ended and the pids of children left behind (then killed)."""
        if not self.alive():
            return "not running", []
        children = self._children()
        process = self._started()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=timeout_s)
            how = "stopped" if code == 0 else f"stopped with exit code {code}"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            how = f"did not stop within {timeout_s:g} s of SIGTERM (killed)"
        self._ended(how)
        return how, _reap(children)

    def check_exit(self) -> str | None:
        """If the daemon died on its own since the last look: how (and the incarnation is closed)."""
        if self.process is None or self.current is None or self.process.poll() is None:
            return None
        how = f"exited on its own with code {self.process.returncode}"
        self._ended(how)
        return how

    def _ended(self, how: str) -> None:
        incarnation = self.current
        if incarnation is not None:
            incarnation.ended, incarnation.how_ended = time.time(), how


# --------------------------------------------------------------------------- remote workers


class RemoteWorkers:
    """`count` `pipeline worker --connect ENDPOINT` processes, as on other hosts: they outlive daemon restarts.

    `event(what, **detail)` records their starts and exits in the soak's events.
    """

    def __init__(self, count: int, endpoint: str, config_path: Path, logs: Path, event: Callable[..., None]) -> None:
        self.count, self.endpoint, self.config_path, self.logs, self.event = count, endpoint, config_path, logs, event
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for index in range(self.count):
            self.processes.append(self._spawn(index))

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        log = self.logs / f"remote-{index}-{int(time.time() * 1000)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "worker", "--connect", self.endpoint, "--config", str(self.config_path),
                 "--name", f"remote-{index}", "--threads", "1"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.event("remote_worker_start", index=index, pid=process.pid)
        return process

    def supervise(self) -> None:
        """A remote worker that exits is started again, as systemd would (it leaves when a daemon tells it to stop)."""
        for index, process in enumerate(self.processes):
            if process.poll() is not None:
                self.event("remote_worker_exit", index=index, pid=process.pid, code=process.returncode)
                self.processes[index] = self._spawn(index)

    def running(self) -> list[psutil.Process]:
        """The remote workers alive now (psutil)."""
        import psutil

        found = []
        for process in self.processes:
            if process.poll() is None:
                try:
                    found.append(psutil.Process(process.pid))
                except psutil.Error:
                    pass
        return found

    def stop(self) -> None:
        """SIGTERM, then kill -9 of any still there after 15 s."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
