"""What one scan costs the daemon's own process, apart from its frames: set-up, bookkeeping, end.

Why: issue 23 asks for <= 50 ms per scan in the daemon (a backlog of 200 small finished scans took
~1 s each before readers and the painter moved out). This writes N finished scans of F frames
(models off), starts `pipeline run` on them, waits until every store is complete, and prints the
daemon process's own CPU time (user + system, its threads only, not its readers, workers or painter)
per scan, for F frames and for 2F frames: the difference is the frames' share, the rest per-scan cost.

It also prints how long each daemon took to stop after SIGTERM (a drained stop: the quick-look
pictures still queued are drawn first), which must stay well under `stop_daemon`'s minute.

Usage: python scripts/scan_setup_bench.py [--scans 40] [--frames 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store import store_status
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_workers

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime of the process itself (not its children)


def measure(base: Path, scans: int, frames: int) -> tuple[float, float, float]:
    """(daemon CPU seconds per scan, wall seconds for all, seconds the stop took) for `scans` finished scans of
    `frames` frames."""
    incoming = base / f"{frames}-frames"
    staged = base / f"{frames}-staged"
    incoming.mkdir()
    staged.mkdir()
    for index in range(scans):
        write_scan(ScanPlan(directory=staged, name=f"s{index:03d}", layout="gda9", n_frames=frames, rate_hz=1000.0, seed=index))
    config = write_config(base / f"config-{frames}.yaml", models=MODELS_OFF, daemon={"max_active_scans": 4},
                          follow={"idle_timeout_s": 5.0})
    daemon = start_daemon(config, incoming, base / f"daemon-{frames}.log")
    try:
        wait_for_workers(config, 1)
        before, started = _cpu_s(daemon.pid), time.monotonic()
        for item in staged.iterdir():
            os.rename(item, incoming / item.name)
        stores = [incoming / f"s{index:03d}.zarr" for index in range(scans)]
        deadline = time.monotonic() + 600
        while any(store_status(store) != "complete" for store in stores):
            if time.monotonic() > deadline:
                raise SystemExit(f"not all complete within 600 s; see {base}/daemon-{frames}.log")
            time.sleep(0.2)
        cpu, wall = (_cpu_s(daemon.pid) - before) / scans, time.monotonic() - started
    except BaseException:
        stop_daemon(daemon)
        raise
    stopping = time.monotonic()
    stop_daemon(daemon)
    return cpu, wall, time.monotonic() - stopping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=40, help="finished scans dropped at once (default 40)")
    parser.add_argument("--frames", type=int, default=3, help="frames per scan in the first run; the second has twice as many")
    parser.add_argument("--keep", type=Path, help="write the scans, stores and daemon logs here (a new directory) and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scan-setup-") as directory:
        base = Path(directory) if args.keep is None else args.keep
        base.mkdir(parents=True, exist_ok=args.keep is None)
        small, small_wall, small_stop = measure(base, args.scans, args.frames)
        large, large_wall, large_stop = measure(base, args.scans, 2 * args.frames)
    per_frame = (large - small) / args.frames
    print(f"daemon CPU per scan, {args.scans} finished scans (models off, 1 worker):")
    print(f"  {args.frames} frames each: {small * 1000:.1f} ms ({small_wall:.1f} s wall for all; stopped in {small_stop:.1f} s)")
    print(f"  {2 * args.frames} frames each: {large * 1000:.1f} ms ({large_wall:.1f} s wall for all; stopped in {large_stop:.1f} s)")
    print(f"  per frame {per_frame * 1000:.2f} ms; per scan without its frames {(small - args.frames * per_frame) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
