"""The pipeline's part: the real daemon with local workers following a simulated scan, and what it measured."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tools.bench.errors import BenchError
from pipeline.tools.bench.measure import FlushClock, MemorySampler, mean_ms, percentiles_ms
from pipeline.tools.bench.progress import progress_bar

if TYPE_CHECKING:
    from pipeline.live.timings import FrameTimings

WORKERS_JOIN_TIMEOUT_S = 180.0
STALL_TIMEOUT_S = 180.0  # no frame done for this long: the run is given up


@dataclass
class PipelineRun:
    """The raw measurements of one pipeline run; `summary` turns them into figures."""

    workers: int
    scan: Path  # the scan file the run followed
    frames_written: int = 0
    frames: dict[int, dict[str, float]] = field(default_factory=dict)  # frame -> timings from the hook
    flushed_at: list[float | None] = field(default_factory=list)
    read_s: list[float] = field(default_factory=list)
    memory: MemorySampler | None = None

    def summary(self) -> dict[str, Any]:
        indices = sorted(self.frames)
        timings = [self.frames[i] for i in indices]
        first_queued = min(t["queued_at"] for t in timings) if timings else 0.0
        last_done = max(t["done_at"] for t in timings) if timings else 0.0
        elapsed = last_done - first_queued
        from_flush = [self.frames[i]["done_at"] - flushed for i in indices
                      if i < len(self.flushed_at) and (flushed := self.flushed_at[i]) is not None]
        from_queued = [t["done_at"] - t["queued_at"] for t in timings]
        flush_times = [at for at in self.flushed_at if at is not None]
        writer_s = flush_times[-1] - flush_times[0] if len(flush_times) > 1 else 0.0

        def stage(key: str) -> list[float]:
            return [t[key] for t in timings if key in t]

        transfer = [t["received_at"] - t["sent_at"] - t["worker_total"] for t in timings if "worker_total" in t]
        stages = {
            "read": mean_ms(self.read_s),
            "queue_in_daemon": mean_ms([t["sent_at"] - t["queued_at"] for t in timings]),
            "preprocess": mean_ms(stage("preprocess")),
            "transfer": mean_ms(transfer),
            "tlm": mean_ms(stage("tlm")),
            "sslm": mean_ms(stage("sslm")),
            "volume_linking": mean_ms(stage("link_s")),
            "write": mean_ms(stage("write_s")),
        }
        memory: dict[str, Any] = {}
        if self.memory is not None:
            peaks = self.memory.peaks()
            memory = {
                "daemon_peak_rss_mib": peaks.get("daemon", {}).get("peak_rss_mib"),
                "workers": [{"process": role, **entry} for role, entry in sorted(peaks.items()) if role.startswith("worker-")],
                "readers": [{"process": role, **entry} for role, entry in sorted(peaks.items()) if role.startswith("reader-")],
                "daemon_rss_at_10pct_mib": self.memory.daemon_rss_at(max(1, round(0.1 * self.frames_written))),
                "daemon_rss_at_100pct_mib": self.memory.daemon_rss_at(self.frames_written),
                "samples": len(self.memory.samples),
            }
        cpu = self.memory.cpu_ms_per_frame(len(self.frames)) if self.memory is not None else {}
        daemon_threads = self.memory.daemon_threads_ms_per_frame(len(self.frames)) if self.memory is not None else {}
        return {
            "workers": self.workers,
            "frames_written": self.frames_written,
            "frames_done": len(self.frames),
            "elapsed_s": round(elapsed, 3),
            "fps": round(len(self.frames) / elapsed, 3) if elapsed > 0 else None,
            "writer_fps": round((len(flush_times) - 1) / writer_s, 1) if writer_s > 0 else None,  # how fast the scan was written
            "latency_ms": {"flush_to_done": percentiles_ms(from_flush), "queued_to_done": percentiles_ms(from_queued)},
            "stages_ms": stages,
            "cpu_ms_per_frame": cpu,
            "daemon_cpu_ms_per_frame_by_thread": daemon_threads,
            "memory": memory,
            "scan": str(self.scan),
        }

    def per_frame(self) -> list[dict[str, float | int | None]]:
        """Every frame's timings (wall-clock times and stage seconds), for the JSON file."""
        rows: list[dict[str, float | int | None]] = []
        for index in sorted(self.frames):
            flushed = self.flushed_at[index] if index < len(self.flushed_at) else None
            rows.append({"frame": index, "flushed_at": flushed, **{k: round(v, 6) for k, v in self.frames[index].items()}})
        return rows


def _wait_for_workers(daemon: Any, count: int) -> None:
    """Block until `count` workers said hello: they import torch and load the models, which takes seconds."""
    deadline = time.monotonic() + WORKERS_JOIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if len(daemon.dispatcher.stats()["workers"]) >= count:
            return
        time.sleep(0.1)
    raise BenchError(f"{count} worker(s) did not join within {WORKERS_JOIN_TIMEOUT_S:g} s (see the log above)")


def run_pipeline(config: Any, directory: Path, workers: int, n_frames: int, rate_hz: float, layout: str, seed: int,
                 show_progress: bool, finished: bool = False, distinct_frames: int | None = None) -> PipelineRun:
    """The real daemon with `workers` local workers following a scan written live (or, with `finished`, a scan
    written in full before the daemon starts: every frame ready at once, the writer out of the way); every frame's timings."""
    from pipeline.live.daemon import Daemon
    from pipeline.live.follow import ScanFollower
    from pipeline.simulator.writers import ScanPlan, ScanWriter

    directory.mkdir(parents=True, exist_ok=True)
    plan = ScanPlan(directory=directory, name=f"bench-{layout}-w{workers}{'-finished' if finished else ''}", layout=layout,
                    n_frames=n_frames, rate_hz=rate_hz, seed=seed, distinct_frames=distinct_frames)
    if finished:
        ScanWriter(plan).start().join()
    run = PipelineRun(workers=workers, scan=plan.nxs_path)
    config = config.with_overrides({"watch.dirs": [str(directory)], "workers.local": workers})
    lock = threading.Lock()

    def on_frame_done(scan: str, index: int, timings: FrameTimings) -> None:
        if Path(scan).name == plan.nxs_path.name:
            with lock:
                run.frames[index] = timings.as_dict()

    daemon = Daemon(config, watch=not finished, on_frame_done=on_frame_done).start()  # a finished scan is handed over once workers are in
    memory = MemorySampler(lambda: [p.pid for p in daemon.workers], lambda: len(run.frames),
                           writer_pids=lambda: writer.pids if writer is not None and writer.frames_written else [],
                           reader_pids=lambda: list(daemon.readers.status()["pids"]))  # from its first frame, not its start-up
    bar = progress_bar(n_frames, f"pipeline, {workers} worker{'s' if workers > 1 else ''}", show_progress)
    writer: ScanWriter | None = None
    flush = None
    try:
        _wait_for_workers(daemon, workers)
        memory.start()
        if finished:
            daemon.add_scan(plan.nxs_path)
        else:
            writer = ScanWriter(plan).start()
            flush = FlushClock(lambda: writer.frames_written, n_frames)
            flush.start()
        last_count, last_change = 0, time.monotonic()
        while True:
            count = len(run.frames)
            if count > last_count:
                bar.update(count - last_count)
                last_count, last_change = count, time.monotonic()
            if count >= n_frames:
                memory.freeze_cpu()
                break
            if time.monotonic() - last_change > STALL_TIMEOUT_S:
                raise BenchError(f"pipeline run with {workers} worker(s) stalled: {count}/{n_frames} frames done "
                                 f"and none for {STALL_TIMEOUT_S:g} s")
            time.sleep(0.05)
        if writer is not None:
            writer.join(timeout=60)
        run.frames_written = writer.frames_written if writer is not None else n_frames
    finally:
        bar.close()
        if flush is not None:
            flush.stop()
        if writer is not None and writer.is_alive():
            writer.kill()
        daemon.shutdown(drain=True, timeout=60)
        memory.stop()
    run.memory = memory
    run.flushed_at = flush.flushed_at if flush is not None else []
    with ScanFollower(plan.nxs_path, config.follow) as follower:  # the follower's frame read, timed on the finished file
        follower.open()
        for index in range(run.frames_written):
            started = time.perf_counter()
            follower.read_frame(index)
            run.read_s.append(time.perf_counter() - started)
    return run
