"""`pipeline demo`: the whole product on a fresh machine with no arguments.

A simulated beamline writes one scan in each I16 layout, live; the daemon watches the directory,
processes the frames while they are written, and the demo prints what it found against the truth.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from pipeline.common.argtypes import positive_float, positive_int
from pipeline.config import load_config
from pipeline.errors import UserError

log = logging.getLogger(__name__)

DEMO_MARKER = ".pipeline-demo"  # in a folder the demo wrote: the next demo may empty it


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="simulated scans written live and processed live, with a summary",
                                   description="Write simulated scans (one per I16 layout) frame by frame, process them live "
                                               "with the daemon and local workers, and print each scan's status and its "
                                               "masks against the simulation's ground truth: a first run with no beamline.")
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="where scans and stores go (default ./demo-output): a new or empty folder, or one an earlier demo "
                             "wrote, which is emptied first; any other folder is refused, never emptied")
    parser.add_argument("--frames", type=positive_int, default=40, help="frames per scan (default 40)")
    parser.add_argument("--rate", type=positive_float, default=5.0, help="frames per second the detector writes (default 5)")
    parser.add_argument("--workers", type=positive_int, default=2, help="local worker processes (default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=7, help="the simulation's random seed (default 7)")
    parser.add_argument("--config", type=Path, help="start from this config instead of the packaged defaults")
    parser.set_defaults(func=run_demo)


def _empty_demo_folder(out: Path) -> None:
    """Make `out` an empty folder marked as the demo's; only a folder that is empty or that a demo marked is emptied
    (`--out .` or `--out ~/data` must never cost a user their files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not _written_by_a_demo(out):
            raise UserError(f"--out {out}: holds files that no demo wrote (no {DEMO_MARKER} in it); the demo empties its folder "
                            "first, so give a new or empty one")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `pipeline demo`, which empties this folder at its next run\n")


def _written_by_a_demo(out: Path) -> bool:
    """Marked by a demo, or as demos before the mark left their folder: only `scans/` with only `demo-*` in it."""
    if (out / DEMO_MARKER).is_file():
        return True
    scans = out / "scans"
    return [entry.name for entry in out.iterdir()] == ["scans"] and scans.is_dir() and all(
        entry.name.startswith("demo-") for entry in scans.iterdir())


def run_demo(args: argparse.Namespace) -> int:
    from pipeline.live.daemon import Daemon
    from pipeline.logs import setup_logging
    from pipeline.simulator.writers import LAYOUTS, ScanPlan, ScanWriter
    from pipeline.store import StoreReader, schema, store_path_for, store_status
    from pipeline.tools.truth import compare_store_to_truth

    out = args.out.resolve()
    _empty_demo_folder(out)
    scans_dir = out / "scans"
    scans_dir.mkdir(parents=True)
    config = load_config(args.config).with_overrides({
        "watch.dirs": [str(scans_dir)],
        "workers.local": args.workers,
        "workers.device": args.device,
        "follow.idle_timeout_s": 15.0,
        "daemon.control": "tcp://127.0.0.1:0",
        "daemon.log_level": "WARNING",
    })
    setup_logging("WARNING")
    print(f"demo: {len(LAYOUTS)} simulated scans of {args.frames} frames at {args.rate:g} Hz in {scans_dir}")
    daemon = Daemon(config).start()
    started = time.monotonic()
    plans = [ScanPlan(directory=scans_dir, name=f"demo-{layout}", layout=layout, n_frames=args.frames, rate_hz=args.rate,
                      seed=args.seed + i, link_delay_s=1.0 if layout == "gda9" else 0.0) for i, layout in enumerate(LAYOUTS)]
    writers = [ScanWriter(plan).start() for plan in plans]
    try:
        for writer in writers:
            writer.join()
        written = time.monotonic()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if all(store_status(store_path_for(p.nxs_path, None)) in schema.FINAL_STATUSES for p in plans):
                break
            time.sleep(0.2)
        finished = time.monotonic()
    finally:
        daemon.shutdown(drain=True, timeout=30)
    total_frames = len(plans) * args.frames
    print(f"\n{'scan':<14}{'layout':<8}{'status':<12}{'frames':>8}{'peaks':>7}{'truth':>7}{'found':>7}{'frame IoU':>11}")
    ok = True
    for plan in plans:
        store_path = store_path_for(plan.nxs_path, None)
        status = store_status(store_path)
        done = StoreReader(store_path).done_frames().size if status else 0
        comparison = compare_store_to_truth(store_path, plan.truth_path)
        ok &= status == schema.STATUS_COMPLETE and done == args.frames
        print(f"{plan.name:<14}{plan.layout:<8}{status or 'missing':<12}{done:>5}/{args.frames:<3}{comparison.found_peaks:>6}"
              f"{comparison.truth_peaks:>7}{comparison.matched:>7}{comparison.mean_frame_iou:>11.2f}")
    print(f"\n{total_frames} frames written in {written - started:.1f} s; all processed {finished - written:.1f} s after the last frame; "
          f"{total_frames / (finished - started):.1f} frames/s end to end with {args.workers} worker(s)")
    print("'found' = true 3D peaks matched by a stored 3D peak with IoU >= 0.5")
    print(f"outputs: {scans_dir}/<scan>.zarr (masks, 3D labels, peaks table) beside <scan>.nxs and <scan>.truth.h5")
    return 0 if ok else 1
