"""The instruments: percentiles, RSS and CPU per process and per thread, and when each frame was flushed."""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RSS_INTERVAL_S = 0.2
FLUSH_POLL_S = 0.002
MIB = 1024 * 1024


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms (linear interpolation, so p50 <= p95 <= p99); None when there is nothing."""
    if len(seconds) == 0:
        return {"p50": None, "p95": None, "p99": None}
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2)}


def mean_ms(seconds: Sequence[float]) -> float | None:
    return round(float(np.mean(seconds)) * 1000.0, 3) if len(seconds) else None


class MemorySampler(threading.Thread):
    """Samples the RSS of the daemon (this process) and of each worker process every `interval_s`.

    Workers are the daemon's own local worker processes (the ones `Daemon.workers` holds,
    re-read at every sample so a restarted worker is followed too); the scan writer's processes,
    also children of this process, are left out.
    """

    def __init__(self, worker_pids: Callable[[], list[int]], frames_done: Callable[[], int],
                 interval_s: float = RSS_INTERVAL_S, writer_pids: Callable[[], list[int]] = list,
                 reader_pids: Callable[[], list[int]] = list) -> None:
        super().__init__(name="bench-rss", daemon=True)
        import psutil

        self._psutil = psutil
        self.worker_pids = worker_pids
        self.writer_pids = writer_pids  # the simulated detector's processes: their CPU is counted, not their memory
        self.reader_pids = reader_pids  # the daemon's reader processes (HDF5 runs there): part of the daemon's cost
        self.frames_done = frames_done
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, str, int, float]] = []  # (time_s, frames_done, process, pid, rss_mib)
        self.cpu_s: dict[int, tuple[str, float, float]] = {}  # pid -> (role, CPU seconds at its first sample, at its last)
        self.started_at = time.time()
        self._halt = threading.Event()
        self._processes: dict[int, Any] = {}
        self._cpu_frozen = False
        self.threads_at_start: dict[int, tuple[str, float]] = {}
        self.threads_at_end: dict[int, tuple[str, float]] = {}  # each thread as last seen: threads that ended still count

    def start(self) -> None:
        self.threads_at_start = thread_cpu_s()
        super().start()

    def daemon_threads_ms_per_frame(self, frames: int) -> dict[str, float]:
        """The daemon's CPU per frame by thread (see `thread_cpu_s`), between `start` and `freeze_cpu`."""
        if not frames or not self.threads_at_end:
            return {}
        stages: dict[str, float] = {}
        for tid, (stage, spent) in self.threads_at_end.items():
            before = self.threads_at_start.get(tid, (stage, 0.0))[1]
            stages[stage] = stages.get(stage, 0.0) + (spent - before) * 1000.0 / frames
        return {stage: round(ms, 3) for stage, ms in sorted(stages.items(), key=lambda item: -item[1]) if ms >= 0.005}

    def _process(self, pid: int) -> Any:
        return self._processes.setdefault(pid, self._psutil.Process(pid))

    def _rss_mib(self, pid: int) -> float | None:
        try:
            return self._process(pid).memory_info().rss / MIB
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
            return None

    def freeze_cpu(self) -> None:
        """Count CPU up to now only: called when the last frame is done, before the quick look and shut-down."""
        self.sample()
        self._cpu_frozen = True
        self.threads_at_end.update(thread_cpu_s())

    def _note_cpu(self, role: str, pid: int) -> None:
        if self._cpu_frozen:
            return
        try:
            times = self._process(pid).cpu_times()
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
            return
        spent = times.user + times.system
        self.cpu_s[pid] = (role, self.cpu_s.get(pid, (role, spent, spent))[1], spent)

    def sample(self) -> None:
        now, done = time.time() - self.started_at, self.frames_done()
        targets = ([("daemon", os.getpid())] + [(f"worker-{i}", pid) for i, pid in enumerate(self.worker_pids())]
                   + [(f"reader-{pid}", pid) for pid in self.reader_pids()])
        for role, pid in targets:
            rss = self._rss_mib(pid)
            if rss is not None:
                self.samples.append((round(now, 3), done, role, pid, round(rss, 2)))
            self._note_cpu(role if role == "daemon" else role.split("-")[0] + "s", pid)
        if not self._cpu_frozen:
            self.threads_at_end.update(thread_cpu_s())
        for pid in self.writer_pids():
            self._note_cpu("writer", pid)

    def cpu_ms_per_frame(self, frames: int) -> dict[str, float | None]:
        """CPU time (user + system) spent while the run was sampled, per frame done, by role: the daemon (this process:
        follower, dispatcher, sink), its reader processes, all workers together, the simulated detector's processes."""
        spent: dict[str, float] = {"daemon": 0.0, "readers": 0.0, "workers": 0.0, "writer": 0.0}
        for role, first, last in self.cpu_s.values():
            spent[role] += last - first
        return {role: round(seconds * 1000.0 / frames, 3) if frames else None for role, seconds in spent.items()}

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sample()  # one last sample, after the end

    def peaks(self) -> dict[str, dict[str, Any]]:
        """Per process: its pid and peak RSS (MiB)."""
        peaks: dict[str, dict[str, Any]] = {}
        for _, _, role, pid, rss in self.samples:
            entry = peaks.setdefault(role, {"pid": pid, "peak_rss_mib": 0.0})
            entry["peak_rss_mib"] = max(entry["peak_rss_mib"], rss)
            entry["pid"] = pid
        return peaks

    def daemon_rss_at(self, frames: int) -> float | None:
        """The daemon's RSS at the first sample taken once `frames` frames were done."""
        for _, done, role, _, rss in self.samples:
            if role == "daemon" and done >= frames:
                return rss
        return None

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["time_s", "frames_done", "process", "pid", "rss_mib"])
            writer.writerows(self.samples)


THREAD_STAGES = (("scan-", "follow (read frames)"), ("dispatch", "dispatch (ZeroMQ, results)"), ("sink", "sink (link, write)"),
                 ("ZMQbg", "ZeroMQ I/O threads"), ("quicklook", "quick-look pictures"), ("bench-", "the bench's own threads"),
                 ("MainThread", "the bench's own threads"))


def thread_cpu_s() -> dict[int, tuple[str, float]]:
    """Thread id -> (stage, CPU seconds so far, user + system) of this process's threads: Python threads by their names
    (pipeline.live names each), the others by the name the system gives them (ZeroMQ's I/O threads; tensorstore's and
    zarr's pools, which write and read chunks)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate() if thread.native_id is not None}
    ticks = os.sysconf("SC_CLK_TCK")
    spent: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        tid = int(task.name)
        name = names.get(tid, comm)
        stage = next((label for prefix, label in THREAD_STAGES if name.startswith(prefix)),
                     f"{name.split('_')[0]} (Python)" if tid in names else "native pools (tensorstore, zarr, HDF5)")
        spent[tid] = (stage, (int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
    return spent


class FlushClock(threading.Thread):
    """When each frame was flushed: the time this process saw the writer's frame counter pass it."""

    def __init__(self, frames_written: Callable[[], int], n_frames: int) -> None:
        super().__init__(name="bench-flush", daemon=True)
        self.frames_written = frames_written
        self.flushed_at: list[float | None] = [None] * n_frames
        self._seen = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set() and self._seen < len(self.flushed_at):
            written = min(self.frames_written(), len(self.flushed_at))
            if written > self._seen:
                now = time.time()
                for index in range(self._seen, written):
                    self.flushed_at[index] = now
                self._seen = written
            time.sleep(FLUSH_POLL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
