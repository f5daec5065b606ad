"""The product's spine, for real: a writer process writes scans while `pipeline run` follows them.

Each store is reopened and compared frame by frame with what `pipeline process` gives for the
finished file; every frame is done exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from pipeline.simulator.writers import LAYOUTS, ScanPlan, ScanWriter
from pipeline.store import open_live
from tests.conftest import write_config

ARRAYS = ("tlm/labels", "ssl/clusters", "ssl/mask", "volume/labels", "frames/done")


def _status(store: Path) -> str | None:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"].get("status")
    except (OSError, ValueError, KeyError):
        return None


def _wait_for_status(stores: list[Path], timeout: float, wanted=("complete", "incomplete", "failed")) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_status(s) in wanted for s in stores):
            return
        time.sleep(0.2)
    raise AssertionError(f"stores not finished in {timeout} s: {[(s.name, _status(s)) for s in stores]}")


def _daemon(config: Path, watch: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watch)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_workers(config: Path, count: int, timeout: float = 120) -> None:
    """Block until the daemon behind `config` reports `count` workers (they import torch: seconds)."""
    import yaml

    from pipeline.live.control import query_status

    endpoint = yaml.safe_load(config.read_text())["daemon"]["control"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = query_status(endpoint, timeout_s=1.0)
        if status is not None and len(status["dispatch"]["workers"]) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {count} worker(s) joined within {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def assert_stores_equal(live: Path, offline: Path) -> None:
    a, b = open_live(live), open_live(offline)
    for name in ARRAYS:
        assert a[name].shape == b[name].shape, name
        for index in range(a[name].shape[0]):
            np.testing.assert_array_equal(a[name][index], b[name][index], err_msg=f"{name} frame {index}")
    for table in ("peaks", "tlm/detections"):
        assert sorted(a[table].array_keys()) == sorted(b[table].array_keys())
        for column in a[table].array_keys():
            np.testing.assert_allclose(a[table][column][:], b[table][column][:], rtol=1e-6, err_msg=f"{table}/{column}")


def test_live_scans_in_all_three_layouts_equal_offline_processing(tmp_path, untrained_weights):
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights)
    daemon = _daemon(config, scans, tmp_path / "daemon.log")
    n_frames = 12
    plans = [ScanPlan(directory=scans, name=f"live-{layout}", layout=layout, n_frames=n_frames, rate_hz=2.0, seed=5 + i,
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
        _wait_for_status(stores, timeout=120)
    finally:
        _stop(daemon)
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
        _wait_for_status(stores, timeout=90)
    finally:
        daemon.shutdown()
    late_store, abandoned_store = (open_live(s) for s in stores)
    assert late_store.attrs["status"] == "complete"
    assert late_store["frames/done"][:].tolist() == [1] * 6
    assert abandoned_store.attrs["status"] == "incomplete"
    assert abandoned_store.attrs["end_reason"] == "idle_timeout"
    assert abandoned_store["frames/done"][:].tolist() == [1] * 4
