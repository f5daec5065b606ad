"""The command line: `pipeline bench`'s arguments, its config, and every part run in order into one report."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.common.argtypes import non_negative_int, one_line_errors, positive_float, positive_int, run_standalone
from pipeline.tools.bench.baseline import run_baseline
from pipeline.tools.bench.errors import BenchError
from pipeline.tools.bench.machine import check_weights, machine_description, torch_facts
from pipeline.tools.bench.pipeline_run import PipelineRun, run_pipeline
from pipeline.tools.bench.report import format_report

DEFAULT_FRAMES = 100
DEFAULT_RATE_HZ = 1000.0  # as fast as the writer can: measures the pipeline, not the detector
DEFAULT_BASELINE_FRAMES = 20
MODEL_MODES = ("config", "none", "threshold")
MODELS_OFF = ("none", "threshold")  # modes whose workers run no model
FAST_WRITER_FRAMES = 64  # --models none: distinct frames the writer cycles through (a writer at ~1,000 Hz, not ~100)


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
                             "write, done) is measured on any machine, live and on a finished file; threshold: the same, "
                             "but the masks are the pixels above 20 counts (as many as a frame's peaks), so the daemon's "
                             "path is measured with masks that hold something (pipeline.tools.bench.stand_in_worker)")
    parser.add_argument("--distinct-frames", type=positive_int, default=None, metavar="K",
                        help="the simulated detector synthesises K frames and writes them over and over, so it can write "
                             f"faster than its synthesis (~7 ms a frame) (default: {FAST_WRITER_FRAMES} with --models none or threshold, "
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
        if args.models in MODELS_OFF:
            overrides.update({"models.tlm.enabled": False, "models.sslm.enabled": False})
        if args.models == "threshold":
            overrides["workers.command"] = [sys.executable, "-m", "pipeline.tools.bench.stand_in_worker"]
        config = config.with_overrides(overrides)
    except ConfigError as error:
        raise BenchError(str(error)) from None
    return config


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
    models = check_weights(config)
    facts = torch_facts(config.workers.device, config.models.precision)

    show_progress = not args.no_progress
    distinct = args.distinct_frames if args.distinct_frames is not None else (FAST_WRITER_FRAMES if args.models in MODELS_OFF else None)
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
        if args.models in MODELS_OFF:  # the daemon's ceiling with the writer out of the way: a finished scan, every frame ready
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


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.tools.bench ...` works without the rest of the CLI."""
    return run_standalone("bench", add_parser, argv)
