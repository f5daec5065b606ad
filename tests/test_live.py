"""The product's spine, for real: a writer process writes scans while `pipeline run` follows them.

Each store is reopened and compared frame by frame with what `pipeline process` gives for the
finished file; every frame is done exactly once.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from pipeline.simulator.writers import LAYOUTS, ScanPlan, ScanWriter
from pipeline.store import open_live
from pipeline.testing.configs import write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers
from pipeline.testing.stores import assert_stores_equal

pytestmark = pytest.mark.daemon


def test_live_scans_in_all_three_layouts_equal_offline_processing(tmp_path, untrained_weights):
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights)
    daemon = start_daemon(config, scans, tmp_path / "daemon.log")
    n_frames = 12
    plans = [ScanPlan(directory=scans, name=f"live-{layout}", layout=layout, n_frames=n_frames, rate_hz=1.0, seed=5 + i,
                      link_delay_s=2.0 if layout == "gda9" else 0.0) for i, layout in enumerate(LAYOUTS)]
    try:
        wait_for_workers(config, 1)  # the daemon is watching and able to work before the first file appears
        writers = [ScanWriter(plan).start() for plan in plans]
        first_done_while_writing = {}
        deadline = time.monotonic() + 120
        while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
            for plan, writer in zip(plans, writers):
                store = plan.nxs_path.with_suffix(".zarr")
                if writer.is_alive() and plan.name not in first_done_while_writing and (store / "frames" / "done").exists():
                    done = open_live(store)["frames/done"][:]
                    if done.any():
                        first_done_while_writing[plan.name] = int(done.sum())
            time.sleep(0.1)
        for writer in writers:
            writer.join(timeout=30)
        stores = [plan.nxs_path.with_suffix(".zarr") for plan in plans]
        wait_for_status(stores, timeout=120)
    finally:
        stop_daemon(daemon)
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]
    # the masks were there while the detector was still writing
    assert set(first_done_while_writing) == {p.name for p in plans}, (first_done_while_writing, log[-3000:])

    offline_root = tmp_path / "offline"
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--output-root", str(offline_root),
                             *[str(p.nxs_path) for p in plans]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for plan in plans:
        live = plan.nxs_path.with_suffix(".zarr")
        group = open_live(live)
        assert group.attrs["status"] == "complete", (plan.layout, dict(group.attrs))
        assert group.attrs["layout"] == plan.layout
        assert group["frames/done"][:].tolist() == [1] * n_frames
        assert group["tlm/labels"].metadata.dimension_names == ("frame", "y", "x")
        assert np.isfinite(group["frames/axis"][:]).all()
        assert group.attrs["models"]["tlm"]["sha256"] and group.attrs["source_file"]
        assert_stores_equal(live, offline_root / live.name)
        # a finished store has consolidated metadata that matches the live view
        consolidated = zarr.open_group(live, mode="r")
        assert consolidated["frames/done"].shape == (n_frames,)


def test_late_link_target_and_abandoned_scan(tmp_path, untrained_weights):
    from pipeline.config import load_config
    from pipeline.live.daemon import Daemon

    scans = tmp_path / "scans"
    scans.mkdir()
    config = load_config(write_config(tmp_path / "config.yaml", untrained_weights,
                                      follow={"idle_timeout_s": 3.0}, watch={"dirs": [str(scans)]}))
    daemon = Daemon(config).start()
    try:
        late = ScanPlan(directory=scans, name="late-link", layout="gda9", n_frames=6, rate_hz=10.0, seed=1, link_delay_s=4.0)
        abandoned = ScanPlan(directory=scans, name="abandoned", layout="gda8", n_frames=10, rate_hz=10.0, seed=2, abandon_after=4)
        writers = [ScanWriter(late).start(), ScanWriter(abandoned).start()]
        for writer in writers:
            writer.join(timeout=60)
        stores = [late.nxs_path.with_suffix(".zarr"), abandoned.nxs_path.with_suffix(".zarr")]
        wait_for_status(stores, timeout=90)
    finally:
        daemon.shutdown()
    late_store, abandoned_store = (open_live(s) for s in stores)
    assert late_store.attrs["status"] == "complete"
    assert late_store["frames/done"][:].tolist() == [1] * 6
    assert abandoned_store.attrs["status"] == "incomplete"
    assert abandoned_store.attrs["end_reason"] == "idle_timeout"
    assert abandoned_store["frames/done"][:].tolist() == [1] * 4
