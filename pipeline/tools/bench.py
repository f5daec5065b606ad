"""`pipeline bench`: speed and scale, measured, with DiPID's way of running the models beside ours.

One run writes a simulated scan live (`ScanWriter`, other processes, real SWMR files) and measures:

- **baseline**: DiPID's joint predictor way, one frame at a time in this one process: open the
  file (h5py, SWMR read), read the frame, fix dead pixels with DiPID's per-pixel loop, run each
  model on the one frame with the TLM at torchvision's default resize (shorter side 800, longer
  at most 1333), save the result with `np.savez`. Run on the finished scan, after the live part,
  so that it neither competes with the pipeline for the CPU nor inflates the daemon's memory.
- **pipeline**: the real `Daemon` in this process, watching a temporary directory, with local
  worker processes, following the scan while it is written. Each frame's timings come from the
  daemon's `on_frame_done` hook. A frame's flush time is when this process saw the writer's
  shared frame counter pass it (polled every 2 ms, so a few ms late at worst).
- **scaling**: the pipeline part again with other worker counts.

This process stays free of torch until the baseline runs (after every pipeline run): the torch
facts come from a short child process and the weights are checked from their headers, so the
daemon's RSS in the table is the daemon's, not a daemon plus a loaded torch.

Figures are printed as a table; `--json` keeps all of them (and every frame's timings) and
`--memory-trace` the RSS samples that show whether the daemon's memory stays flat.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.common.argtypes import non_negative_int, one_line_errors, positive_float, positive_int, run_standalone

if TYPE_CHECKING:
    from pipeline.live.timings import FrameTimings

DEFAULT_FRAMES = 100
DEFAULT_RATE_HZ = 1000.0  # as fast as the writer can: measures the pipeline, not the detector
DEFAULT_BASELINE_FRAMES = 20
MODEL_MODES = ("config", "none")
FAST_WRITER_FRAMES = 64  # --models none: distinct frames the writer cycles through (a writer at ~1,000 Hz, not ~100)
DIPID_MIN_SIZE, DIPID_MAX_SIZE = 800, 1333  # torchvision's default detection resize, which DiPID ran at
RSS_INTERVAL_S = 0.2
FLUSH_POLL_S = 0.002
WORKERS_JOIN_TIMEOUT_S = 180.0
STALL_TIMEOUT_S = 180.0  # no frame done for this long: the run is given up
MIB = 1024 * 1024


class BenchError(Exception):
    """A problem the user can fix (arguments, config, weights); printed as one line, exit code 2."""


# --------------------------------------------------------------------------- the command line


def worker_counts(text: str) -> list[int]:
    """`--scale 1,2,4` -> [1, 2, 4]: worker counts, each >= 1, in the order given, without repeats."""
    counts: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"expected worker counts like 1,2,4, got {text!r}")
        if int(part) not in counts:
            counts.append(int(part))
    return counts


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `bench` sub-command; its argument errors are one line and exit code 2."""
    from pipeline.simulator.writers import LAYOUTS

    parser = subparsers.add_parser(
        "bench", help="measure throughput, latency, stage times and memory against DiPID's way",
        description="Write a simulated scan live and measure, with the same weights: DiPID's way (one frame at a "
                    "time, per-pixel dead-pixel loop, TLM at shorter side 800) and the real daemon with local "
                    "workers following the scan (frames/s, latency from a frame's flush to its frames/done, "
                    "time per stage, peak RSS per process), optionally for several worker counts.")
    parser.add_argument("--config", type=Path, help="YAML config for weights and settings (default: the built-in defaults)")
    parser.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES, metavar="N",
                        help=f"frames in the simulated scan (default {DEFAULT_FRAMES})")
    parser.add_argument("--rate", type=positive_float, default=DEFAULT_RATE_HZ, metavar="HZ",
                        help=f"frames per second the writer writes (default {DEFAULT_RATE_HZ:g}: as fast as it can, "
                             "to measure throughput; e.g. 10 or 100 for latency at a detector's rate)")
    parser.add_argument("--layout", choices=LAYOUTS, default="gda9", help="file layout of the scan (default gda9)")
    parser.add_argument("--models", choices=MODEL_MODES, default="config",
                        help="config: the config's models (default); none: workers answer every frame at once with an empty "
                             "prediction, through the real sockets, so the daemon's own path (read, dispatch, result, link, "
                             "write, done) is measured on any machine, live and on a finished file")
    parser.add_argument("--distinct-frames", type=positive_int, default=None, metavar="K",
                        help="the simulated detector synthesises K frames and writes them over and over, so it can write "
                             f"faster than its synthesis (~7 ms a frame) (default: {FAST_WRITER_FRAMES} with --models none, "
                             "where the writer must outrun the daemon; otherwise every frame synthesised)")
    parser.add_argument("--workers", type=positive_int, default=2, metavar="N", help="local worker processes (default 2)")
    parser.add_argument("--scale", type=worker_counts, default=None, metavar="N,N,...",
                        help="also run the pipeline with each of these worker counts and compare frames/s")
    parser.add_argument("--baseline-frames", type=non_negative_int, default=None, metavar="N",
                        help=f"frames for DiPID's way (default min(frames, {DEFAULT_BASELINE_FRAMES}); 0 skips it)")
    parser.add_argument("--device", default=None, metavar="DEV", help="auto | cpu | cuda | cuda:N (default: workers.device)")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                        help="models.precision for the pipeline's workers (default: the config's, auto); the baseline "
                        "always runs in float32, as DiPID did")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the simulated scan (default 0)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also save every figure here as JSON")
    parser.add_argument("--memory-trace", type=Path, default=None, metavar="FILE",
                        help="write the RSS samples of the main run (CSV: time_s, frames_done, process, pid, rss_mib)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write scans and stores here and keep them (default: a temporary directory, removed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_bench)

    one_line_errors(parser)


def run_bench(args: argparse.Namespace) -> int:
    """`pipeline bench ...`: returns 0, or 2 with one line on stderr for a problem the user can fix."""
    try:
        report = bench(args)
    except BenchError as error:
        print(f"pipeline bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline bench: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"figures saved in {args.json}")
    if args.memory_trace is not None:
        print(f"RSS samples saved in {args.memory_trace}")
    return 0


# --------------------------------------------------------------------------- set-up


def _load_bench_config(args: argparse.Namespace) -> Any:
    """The config as the bench runs it: the user's models and settings, our directories and quiet logs."""
    from pipeline.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        overrides: dict[str, Any] = {"daemon.control": "tcp://127.0.0.1:0", "daemon.log_level": "WARNING",
                                     "output.root": None, "watch.resume_existing": True}
        if args.device is not None:
            overrides["workers.device"] = args.device
        if args.precision is not None:
            overrides["models.precision"] = args.precision
        if args.models == "none":
            overrides.update({"models.tlm.enabled": False, "models.sslm.enabled": False})
        config = config.with_overrides(overrides)
    except ConfigError as error:
        raise BenchError(str(error)) from None
    return config


_TORCH_PROBE = """
import json, sys, torch
from pipeline.common.devices import resolve_precision
device, precision = sys.argv[1], sys.argv[2]
resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(), "resolved_device": resolved,
                  "resolved_precision": resolve_precision(precision, torch.device(resolved)),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch_threads": torch.get_num_threads()}))
"""


def torch_facts(device: str, precision: str = "auto") -> dict[str, Any]:
    """torch version, GPU and the device `device` resolves to, asked of a child process (see the module docstring)."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", _TORCH_PROBE, device, precision], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise BenchError(f"cannot import torch: {lines[-1] if lines else 'exit code ' + str(result.returncode)}")
    facts = json.loads(result.stdout)
    if device.startswith("cuda") and not facts["cuda"]:
        raise BenchError(f"device {device!r} asked for, but CUDA is not available here")
    return facts


def _check_weights(config: Any) -> dict[str, Any]:
    """Fail early, in one line, when a weights file is missing or unreadable (workers would only log it).

    Safetensors files are checked from their header (no torch here, see the module docstring);
    a torch checkpoint can only be checked by loading it, which the workers do.
    """
    from pipeline.models.card import WeightsError
    from pipeline.store.provenance import describe_models, missing_weights

    missing = missing_weights(config.models)
    if missing is not None:
        raise BenchError(missing)
    try:
        models = describe_models(config.models)
    except (WeightsError, OSError) as error:
        raise BenchError(str(error)) from None
    described: dict[str, Any] = {}
    for name in ("tlm", "sslm"):
        entry = models[name]
        if not entry["enabled"]:
            described[name] = {"enabled": False}
            continue
        card = entry.get("card")
        described[name] = {"enabled": True, "weights": entry["weights"], "sha256": entry["sha256"],
                           "card_min_size": None if card is None else card["min_size"]}
    return described


def machine_description(torch: dict[str, Any]) -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, memory, load, GPU, niceness (`torch`: `torch_facts`)."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "nice": os.nice(0) if hasattr(os, "nice") else None,
        "gpu": torch["gpu"], "torch": torch["torch"], "torch_threads": torch["torch_threads"],
        "python": platform.python_version(), "platform": platform.platform(),
    }


def _progress(total: int, description: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or a stand-in that does nothing."""
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit="frame", file=sys.stderr, leave=False)

    class _Silent:
        n = 0

        def update(self, count: int = 1) -> None:
            self.n += count

        def close(self) -> None:
            pass

    return _Silent()


# --------------------------------------------------------------------------- measuring helpers


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
                 interval_s: float = RSS_INTERVAL_S, writer_pids: Callable[[], list[int]] = list) -> None:
        super().__init__(name="bench-rss", daemon=True)
        import psutil

        self._psutil = psutil
        self.worker_pids = worker_pids
        self.writer_pids = writer_pids  # the simulated detector's processes: their CPU is counted, not their memory
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
        targets = [("daemon", os.getpid())] + [(f"worker-{i}", pid) for i, pid in enumerate(self.worker_pids())]
        for role, pid in targets:
            rss = self._rss_mib(pid)
            if rss is not None:
                self.samples.append((round(now, 3), done, role, pid, round(rss, 2)))
            self._note_cpu("daemon" if role == "daemon" else "workers", pid)
        if not self._cpu_frozen:
            self.threads_at_end.update(thread_cpu_s())
        for pid in self.writer_pids():
            self._note_cpu("writer", pid)

    def cpu_ms_per_frame(self, frames: int) -> dict[str, float | None]:
        """CPU time (user + system) spent while the run was sampled, per frame done, by role: the daemon (this process:
        follower, dispatcher, sink), all workers together, the simulated detector's processes."""
        spent: dict[str, float] = {"daemon": 0.0, "workers": 0.0, "writer": 0.0}
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


# --------------------------------------------------------------------------- the pipeline part


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
                "workers": [{"process": role, **entry} for role, entry in sorted(peaks.items()) if role != "daemon"],
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
                           writer_pids=lambda: writer.pids if writer is not None and writer.frames_written else [])  # from its first frame, not its start-up
    bar = _progress(n_frames, f"pipeline, {workers} worker{'s' if workers > 1 else ''}", show_progress)
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


# --------------------------------------------------------------------------- DiPID's way


def run_baseline(config: Any, scan: Path, n_frames: int, out: Path, show_progress: bool) -> dict[str, Any]:
    """DiPID's way, one frame at a time in this process, with the same weights; frames/s and stage times.

    Per frame: open the file (SWMR read), read the frame, fix dead pixels with the per-pixel loop,
    normalise, TLM on the one frame at shorter side 800 (longer at most 1333), SSLM on the one
    frame (on the input its card asks for), and save labels, clusters and mask with `np.savez`.
    The models run as they are built, without the pipeline's inference speed-ups.
    """
    import torch

    from pipeline.common.devices import resolve_device
    from pipeline.live.follow import ScanFollower, open_hdf5
    from pipeline.models import sslm as sslm_module
    from pipeline.models import tlm as tlm_module
    from pipeline.models.joint import load_sslm, load_tlm
    from pipeline.models.preprocess import fix_dead_pixels_slow, to_model_input, to_significance

    device = resolve_device(config.workers.device)
    tlm = sslm = None
    tlm_card = None
    if config.models.tlm.enabled:
        tlm_settings = config.models.tlm.model_copy(update={"min_size": DIPID_MIN_SIZE, "max_size": DIPID_MAX_SIZE})
        tlm, loaded = load_tlm(tlm_settings)
        tlm, tlm_card = tlm.to(device).eval(), loaded.card
    peak_channels: list[int] = []
    sslm_significance = False
    if config.models.sslm.enabled:
        sslm, loaded = load_sslm(config.models.sslm)
        sslm, peak_channels = sslm.to(device).eval(), list(loaded.card.peak_channels or [])
        sslm_significance = loaded.card.input_transform == "significance"
    with ScanFollower(scan, config.follow) as follower:
        info = follower.open()
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, list[float]] = {"read": [], "preprocess": [], "tlm": [], "sslm": [], "write": []}
    bar = _progress(n_frames, "baseline (DiPID's way)", show_progress)
    started_all = time.perf_counter()
    try:
        for index in range(n_frames):
            started = time.perf_counter()
            with open_hdf5(info.source_file) as handle:
                raw = np.asarray(handle[info.dataset][index])
            read = time.perf_counter()
            fixed = fix_dead_pixels_slow(raw)
            image = torch.from_numpy(to_model_input(fixed)).to(device)
            sslm_image = torch.from_numpy(to_significance(fixed)).to(device) if sslm_significance else image
            prepared = time.perf_counter()
            labels = np.zeros(raw.shape, dtype=np.uint16)
            if tlm is not None:
                with torch.inference_mode():
                    output = tlm(tlm_module.to_images(image[None]))[0]
                labels, _ = tlm_module.paint_instances(output, raw.shape)
            tlm_done = time.perf_counter()
            clusters = mask = np.zeros(raw.shape, dtype=np.uint8)
            if sslm is not None:
                with torch.inference_mode():
                    response = sslm(sslm_image[None, None])
                batch_clusters, batch_mask = sslm_module.clusters_and_mask(response, peak_channels)
                clusters, mask = batch_clusters[0], batch_mask[0]
            sslm_done = time.perf_counter()
            np.savez(out / f"frame-{index:05d}.npz", tlm_labels=labels, ssl_clusters=clusters, ssl_mask=mask)
            written = time.perf_counter()
            for name, begin, end in (("read", started, read), ("preprocess", read, prepared), ("tlm", prepared, tlm_done),
                                     ("sslm", tlm_done, sslm_done), ("write", sslm_done, written)):
                stages[name].append(end - begin)
            bar.update()
    finally:
        bar.close()
    elapsed = time.perf_counter() - started_all
    return {
        "frames": n_frames,
        "elapsed_s": round(elapsed, 3),
        "fps": round(n_frames / elapsed, 3) if elapsed > 0 else None,
        "tlm_min_size": DIPID_MIN_SIZE, "tlm_max_size": DIPID_MAX_SIZE,
        "tlm_backbone": None if tlm_card is None else tlm_card.backbone,
        "stages_ms": {name: mean_ms(values) for name, values in stages.items()},
        "device": str(device),
    }


# --------------------------------------------------------------------------- the whole bench


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every part the arguments ask for and return all figures (JSON-serialisable)."""
    baseline_frames = min(args.frames, DEFAULT_BASELINE_FRAMES) if args.baseline_frames is None else args.baseline_frames
    if baseline_frames > args.frames:
        raise BenchError(f"--baseline-frames {baseline_frames} is more than --frames {args.frames}")
    for target in (args.json, args.memory_trace):
        if target is not None and not target.parent.is_dir():
            raise BenchError(f"cannot write {target}: no directory {target.parent}")
    config = _load_bench_config(args)
    models = _check_weights(config)
    facts = torch_facts(config.workers.device, config.models.precision)

    show_progress = not args.no_progress
    distinct = args.distinct_frames if args.distinct_frames is not None else (FAST_WRITER_FRAMES if args.models == "none" else None)
    if not logging.getLogger().handlers:  # a host that set up logging (a test, the CLI) keeps its own
        from pipeline.logs import setup_logging

        setup_logging("WARNING")
    report: dict[str, Any] = {
        "machine": machine_description(facts),
        "settings": {"frames": args.frames, "rate_hz": args.rate, "layout": args.layout, "workers": args.workers, "models_mode": args.models,
                     "distinct_frames": distinct,
                     "scale": args.scale, "baseline_frames": baseline_frames, "device": config.workers.device,
                     "resolved_device": facts["resolved_device"],
                     "config": None if args.config is None else str(args.config), "seed": args.seed,
                     "batch_size": config.workers.batch_size, "credit": config.workers.credit,
                     "precision": facts["resolved_precision"],
                     "torch_threads_per_worker": config.workers.threads or None, "models": models},
    }
    root = Path(tempfile.mkdtemp(prefix="pipeline-bench-")) if args.keep is None else args.keep.resolve()
    try:
        runs: dict[int, PipelineRun] = {}
        main = run_pipeline(config, root / f"pipeline-w{args.workers}", args.workers, args.frames, args.rate,
                            args.layout, args.seed, show_progress, distinct_frames=distinct)
        runs[args.workers] = main
        if args.memory_trace is not None and main.memory is not None:
            main.memory.write_csv(args.memory_trace)
        for count in args.scale or []:
            if count not in runs:
                runs[count] = run_pipeline(config, root / f"pipeline-w{count}", count, args.frames, args.rate,
                                           args.layout, args.seed, show_progress, distinct_frames=distinct)
        report["pipeline"] = main.summary()
        report["pipeline"]["per_frame"] = main.per_frame()
        if args.models == "none":  # the daemon's ceiling with the writer out of the way: a finished scan, every frame ready
            ready = run_pipeline(config, root / f"finished-w{args.workers}", args.workers, args.frames, args.rate, args.layout,
                                 args.seed, show_progress, finished=True, distinct_frames=distinct)
            report["finished_file"] = {k: v for k, v in ready.summary().items() if k != "memory"}
        else:
            report["finished_file"] = None
        report["scaling"] = [{"workers": count, **{k: runs[count].summary()[k] for k in ("fps", "frames_done", "elapsed_s")}}
                             for count in (args.scale or [args.workers])]
        if baseline_frames:
            report["baseline"] = run_baseline(config, main.scan, baseline_frames, root / "baseline", show_progress)
        else:
            report["baseline"] = None
        baseline_fps = report["baseline"]["fps"] if report["baseline"] else None
        pipeline_fps = report["pipeline"]["fps"]
        report["ratio"] = round(pipeline_fps / baseline_fps, 3) if baseline_fps and pipeline_fps else None
        report["outputs"] = str(root) if args.keep is not None else None
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return report


# --------------------------------------------------------------------------- the table


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The figures as a readable table."""
    machine, settings, pipeline = report["machine"], report["settings"], report["pipeline"]
    baseline = report.get("baseline")
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"GPU: {machine['gpu'] or 'none'}, torch {machine['torch']}, nice {machine['nice']}, "
        f"load {machine['load_average_1m']} at start",
        f"scan: {settings['layout']}, {settings['frames']} frames written live at {settings['rate_hz']:g} Hz"
        f"{'' if not settings.get('distinct_frames') else ' (' + str(settings['distinct_frames']) + ' distinct frames, repeated)'}; "
        f"device {settings['device']} ({settings['resolved_device']}), batch {settings['batch_size']}, credit {settings['credit']}, "
        f"precision {settings.get('precision', 'float32')}",
    ]
    for name in ("tlm", "sslm"):
        model = settings["models"][name]
        lines.append(f"{name}: {model['weights']} (sha256 {model['sha256'][:12]})" if model.get("enabled") else f"{name}: disabled")
    lines += ["", f"{'throughput':<44}{'frames/s':>10}"]
    if baseline:
        what = "TLM at 800" if settings["models"]["tlm"].get("enabled") else "no models: read, dead pixels, savez"
        lines.append(f"  {'baseline, DiPID way (' + str(baseline['frames']) + ' frames, ' + what + ')':<42}{_cell(baseline['fps'], 2):>10}")
    workers = f"{pipeline['workers']} worker{'s' if pipeline['workers'] > 1 else ''}"
    done = f"{pipeline['frames_done']}/{pipeline['frames_written']} frames done"
    lines.append(f"  {'pipeline (' + workers + ', ' + done + ')':<42}{_cell(pipeline['fps'], 2):>10}")
    if pipeline.get("writer_fps") is not None:
        lines.append(f"  {'  (the writer wrote at)':<42}{_cell(pipeline['writer_fps'], 1):>10}")
    finished = report.get("finished_file")
    if finished:
        lines.append(f"  {'pipeline, finished file (every frame ready)':<42}{_cell(finished['fps'], 2):>10}")
    if report.get("ratio") is not None:
        lines.append(f"  {'ratio pipeline / baseline':<42}{report['ratio']:>9.1f}x")
    lines += ["", f"{'latency (ms)':<34}{'p50':>10}{'p95':>10}{'p99':>10}"]
    for key, label in (("flush_to_done", "frame flushed -> frames/done"), ("queued_to_done", "frame read -> frames/done")):
        figures = pipeline["latency_ms"][key]
        lines.append(f"  {label:<32}{_cell(figures['p50']):>10}{_cell(figures['p95']):>10}{_cell(figures['p99']):>10}")
    lines += ["", f"{'time per frame (ms, mean)':<34}{'baseline':>10}{'pipeline':>10}"]
    base_stages = baseline["stages_ms"] if baseline else {}
    rows = (("read", "read", "read"), ("queue_in_daemon", None, "queue in daemon (read -> sent)"),
            ("preprocess", "preprocess", "dead pixels + normalise"),
            ("transfer", None, "transfer (+ wait in worker)"), ("tlm", "tlm", "TLM"), ("sslm", "sslm", "SSLM"),
            ("volume_linking", None, "3D volume linking"), ("write", "write", "write"))
    for key, base_key, label in rows:
        base = base_stages.get(base_key) if base_key else None
        lines.append(f"  {label:<32}{_cell(base, 2):>10}{_cell(pipeline['stages_ms'][key], 2):>10}")
    lines.append("  (pipeline: worker stages are per frame of a batch; workers run side by side)")
    cpu = pipeline.get("cpu_ms_per_frame") or {}
    finished_cpu = (finished or {}).get("cpu_ms_per_frame") or {}
    if cpu:
        lines += ["", f"{'CPU per frame (ms, user + system)':<34}{'live':>10}{'finished':>10}"]
        for role, label in (("daemon", "daemon (follow, dispatch, sink)"), ("workers", "workers, all together"),
                            ("writer", "the simulated detector")):
            lines.append(f"  {label:<32}{_cell(cpu.get(role), 2):>10}{_cell(finished_cpu.get(role), 2):>10}")
        threads = pipeline.get("daemon_cpu_ms_per_frame_by_thread") or {}
        finished_threads = (finished or {}).get("daemon_cpu_ms_per_frame_by_thread") or {}
        for stage in dict.fromkeys([*threads, *finished_threads]):
            lines.append(f"    {stage:<30}{_cell(threads.get(stage), 2):>10}{_cell(finished_threads.get(stage), 2):>10}")
    memory = pipeline.get("memory") or {}
    if memory:
        lines += ["", f"{'peak memory (RSS, MiB)':<34}{'peak':>10}"]
        lines.append(f"  {'daemon (this process)':<32}{_cell(memory['daemon_peak_rss_mib'], 0):>10}"
                     f"   at 10% of frames {_cell(memory['daemon_rss_at_10pct_mib'], 0)}, "
                     f"at 100% {_cell(memory['daemon_rss_at_100pct_mib'], 0)}")
        for worker in memory["workers"]:
            lines.append(f"  {worker['process'] + ' (pid ' + str(worker['pid']) + ')':<32}{_cell(worker['peak_rss_mib'], 0):>10}")
    lines += ["", f"{'scaling':<34}{'frames/s':>10}"]
    for entry in report["scaling"]:
        label = f"{entry['workers']} worker{'s' if entry['workers'] > 1 else ''}"
        lines.append(f"  {label:<32}{_cell(entry['fps'], 2):>10}")
    lines += ["", "latency counts from when this process saw the writer's frame counter pass the frame (polled every "
                  f"{FLUSH_POLL_S * 1000:g} ms); at a writer rate above the pipeline's, frames wait in the file and latency grows."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.tools.bench ...` works without the rest of the CLI."""
    return run_standalone("bench", add_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
