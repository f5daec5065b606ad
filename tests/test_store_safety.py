"""Stores that someone else planted or that cannot be opened: never written through, never deleted.

A `<scan>.zarr` symbolic link planted by another user, pointing at another scan's complete store,
must not be written through: that store stays exactly as it was (its files and its `complete`
status), and the scan fails with one line naming the link. A store whose metadata is damaged is
moved aside with its contents (`<scan>.zarr.unreadable-<time>`), not deleted, and the scan is
processed into a fresh store. A store has one writer: `pipeline process` of a scan the daemon is
writing gets one line naming the daemon's pid, and the daemon's store completes untouched.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.simulator.writers import ScanPlan, ScanWriter, write_scan
from pipeline.store import read_attributes, schema
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers

pytestmark = pytest.mark.daemon


def _fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def _process(config: Path, *scans: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", *map(str, scans)],
                          capture_output=True, text=True, timeout=300)


def test_a_planted_symlink_is_not_written_through_and_a_damaged_store_is_moved_aside(tmp_path: Path, untrained_weights) -> None:
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)  # stores, not models, are tested
    victim = ScanPlan(directory=tmp_path / "visit-a", name="victim", layout="nexus", n_frames=3, rate_hz=1000.0, seed=1)
    planted = ScanPlan(directory=tmp_path / "visit-b", name="planted", layout="nexus", n_frames=3, rate_hz=1000.0, seed=2)
    damaged = ScanPlan(directory=tmp_path / "visit-b", name="damaged", layout="nexus", n_frames=3, rate_hz=1000.0, seed=3)
    for plan in (victim, planted, damaged):
        write_scan(plan)
    assert _process(config, victim.nxs_path, damaged.nxs_path).returncode == 0
    victim_store = victim.nxs_path.with_suffix(".zarr")
    before = _fingerprint(victim_store)
    assert read_attributes(victim_store)[schema.Attr.STATUS] == schema.STATUS_COMPLETE

    link = planted.nxs_path.with_suffix(".zarr")
    link.symlink_to(victim_store)  # planted by someone else, before the scan's own store was made
    damaged_store = damaged.nxs_path.with_suffix(".zarr")
    (damaged_store / "zarr.json").write_text("{not json")  # a store whose metadata cannot be read
    result = _process(config, planted.nxs_path, damaged.nxs_path)

    assert _fingerprint(victim_store) == before, "the other scan's store was written through the link"
    assert link.is_symlink() and link.resolve() == victim_store.resolve()
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "planted" in line and "symlink" in line]
    assert lines, result.stdout + result.stderr[-3000:]
    aside = sorted(damaged_store.parent.glob("damaged.zarr.unreadable-*"))
    assert len(aside) == 1 and (aside[0] / "zarr.json").read_text() == "{not json"  # kept, with what it held
    assert read_attributes(damaged_store)[schema.Attr.STATUS] == schema.STATUS_COMPLETE


def test_one_writer_per_store_a_second_gets_one_line(tmp_path: Path, untrained_weights) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF, follow={"idle_timeout_s": 10.0})
    plan = ScanPlan(directory=scans, name="shared", layout="nexus", n_frames=20, rate_hz=1.0, seed=4)
    store = plan.nxs_path.with_suffix(".zarr")
    daemon = start_daemon(config, scans, tmp_path / "daemon.log")
    try:
        wait_for_workers(config, 1)
        writer = ScanWriter(plan).start()
        deadline = time.monotonic() + 60
        while not (store / "zarr.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.is_alive()  # the daemon cannot have finished the scan: its last frame is not written yet
        second = _process(config, plan.nxs_path)  # the same store, while the daemon writes it
        writer.join(timeout=60)
        wait_for_status([store], timeout=120)
    finally:
        stop_daemon(daemon)
    assert second.returncode != 0
    lines = [line for line in (second.stdout + second.stderr).splitlines() if "being written by another process" in line]
    assert lines and f"pid {daemon.pid}" in lines[0], second.stdout + second.stderr[-3000:]
    attrs = read_attributes(store)
    assert attrs[schema.Attr.STATUS] == schema.STATUS_COMPLETE and attrs[schema.Attr.FRAMES_DONE] == plan.n_frames
