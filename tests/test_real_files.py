"""Scan files shaped like real I16 ones, read by NeXus rules, and scans whose end marker comes early.

The files are built the way GDA 9 and GDA 8 write them (`pipeline.testing.i16`): the scan axis is
named by the default NXdata's `@axes` beside constant datasets (`count_time`, `kmu`, ...), the
expected frame count sits in `diamond_scan/scan_shape` or `scan_dimensions`, the detector may
have another name. Each goes through `pipeline process` (the real daemon and a real worker), and
the store must record the file's own axis values, the expected count and where both came from.

Then the detector's writer lags the scan file's writer: the end marker (`scan_finished`,
`end_time`) is written 4 frames before the last frame is flushed, in each layout, while a real
`pipeline run` follows the files. Every store must end `complete` with every frame, equal frame by
frame to processing the finished file offline.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.common import nexus
from pipeline.simulator.writers import LAYOUTS, ScanPlan, ScanWriter
from pipeline.store import StoreReader, schema
from pipeline.store.schema import Attr
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers
from pipeline.testing.i16 import I16Scan, write_gda8, write_gda9
from pipeline.testing.stores import assert_stores_equal, process_offline


def test_points_of_scan_commands() -> None:
    assert nexus.scan_command_points("scan eta 10.0 10.08 0.02 pil3_100k 1") == 5
    assert nexus.scan_command_points("scan hkl [0, 0, 0.9] [0, 0, 1.1] [0, 0, 0.001] pil3_100k 1") == 201
    assert nexus.scan_command_points("scan hkl [1.0, 0, 2] [1.5, 0, 2] [0.05, 0, 0] pil3_100k 1") == 11
    assert nexus.scan_command_points("scancn eta 0.01 41 pil3_100k 1") == 41
    assert nexus.scan_command_points("pos eta 10") is None and nexus.scan_command_points(None) is None
    assert nexus.scan_command_scannables("scan hkl [0, 0, 0.9] [0, 0, 1.1] [0, 0, 0.001] pil3_100k 1") == ["hkl"]
    assert nexus.scan_command_moves("scan hkl [0, 0, 0.9] [0, 0, 1.1] [0, 0, 0.001] pil3_100k 1") == [nexus.ScanMove("hkl", (0.0, 0.0, 0.001))]


@pytest.mark.daemon
def test_real_file_metadata_gives_the_axis_the_expected_count_and_the_detector(tmp_path: Path, untrained_weights) -> None:
    scans = {
        "gda9": I16Scan(tmp_path, "1009", "gda9", n_frames=6),  # entry/pil3_100k @axes = [hkl_l, ., .]
        "gda8": I16Scan(tmp_path, "808", "gda8", n_frames=6, scanned="h"),  # entry1/measurement @axes = [h], scan_dimensions
        "renamed": I16Scan(tmp_path, "1010", "gda9", n_frames=5, detector="pilatus3_100k"),  # another of follow.detectors
        "nxdetector": I16Scan(tmp_path, "1011", "gda9", n_frames=5, detector="pilatus_merlin"),  # no listed name: its NXdetector
        "constant_axes": I16Scan(tmp_path, "809", "gda8", n_frames=5, scanned="l", gda8_axis="h"),  # @axes names a constant h
        # a real hkl scan: the diffractometer's h and k wander by ~4e-14 while l steps 0.001; @axes still names h
        "jittered": I16Scan(tmp_path, "810", "gda8", n_frames=5, scanned="l", jitter=4e-14, held=(1.0, 0.5, 0.0)),
        "eta_no_axes": I16Scan(tmp_path, "1012", "gda9", n_frames=5, scanned="eta", start=10.0, step=0.02, jitter=4e-14, axes=False),
    }
    for scan in scans.values():
        (write_gda9 if scan.layout == "gda9" else write_gda8)(scan)
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress",
                             *[str(s.nxs_path) for s in scans.values()]], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]

    expected_axis = {"gda9": ("hkl_l", "/entry/pil3_100k/hkl_l"), "gda8": ("h", "/entry1/measurement/h"),
                     "renamed": ("hkl_l", "/entry/pilatus3_100k/hkl_l"), "nxdetector": ("hkl_l", "/entry/pilatus_merlin/hkl_l"),
                     "constant_axes": ("l", "/entry1/measurement/l"), "jittered": ("l", "/entry1/measurement/l"),
                     "eta_no_axes": ("eta", "/entry/pil3_100k/eta")}
    for kind, scan in scans.items():
        store = StoreReader(scan.nxs_path.with_suffix(".zarr"))
        attrs = store.attrs
        assert attrs[Attr.STATUS] == schema.STATUS_COMPLETE, (kind, attrs[Attr.END_REASON])
        name, path = expected_axis[kind]
        axis = store.group[schema.FRAMES_AXIS]
        assert (attrs[Attr.AXIS_NAME], attrs[Attr.AXIS_PATH], axis.attrs[schema.AXIS_NAME_ATTR]) == (name, path, name), kind
        with h5py.File(scan.nxs_path, "r", locking=False) as handle:
            np.testing.assert_array_equal(axis[:], handle[path][()], err_msg=kind)  # exactly the file's values
        assert np.ptp(axis[:]) > 0, kind  # never a constant (count_time) again
        np.testing.assert_allclose(axis[:], scan.points(), err_msg=kind)  # the values the scan stepped through
        assert attrs[Attr.FRAMES_EXPECTED] == scan.n_frames, kind
        where = "entry/diamond_scan/scan_shape" if scan.layout == "gda9" else "entry1/scan_dimensions"
        assert attrs[Attr.FRAMES_EXPECTED_SOURCE] == where, kind
        entry = "entry" if scan.layout == "gda9" else "entry1"
        assert attrs[Attr.DETECTOR_PATH] == f"{entry}/instrument/{scan.detector}/data", kind
        assert store.done_frames().tolist() == list(range(scan.n_frames)), kind
    sources = {kind: StoreReader(s.nxs_path.with_suffix(".zarr")).attrs[Attr.AXIS_SOURCE] for kind, s in scans.items()}
    assert sources["gda9"].startswith("NeXus default plot axis") and sources["gda8"].startswith("NeXus default plot axis")
    assert all(sources[kind].startswith("scan command scannable") for kind in ("constant_axes", "jittered", "eta_no_axes")), sources


@pytest.mark.daemon
def test_an_end_marker_before_the_last_frames_waits_for_them_in_every_layout(tmp_path: Path, untrained_weights) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF, follow={"end_grace_s": 30.0})
    plans = [ScanPlan(directory=scans, name=f"lag-{layout}", layout=layout, n_frames=10, rate_hz=4.0, seed=20 + i, end_marker_lead=4)
             for i, layout in enumerate(LAYOUTS)]
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, scans, log)
    try:
        wait_for_workers(config, 1)
        writers = [ScanWriter(plan).start() for plan in plans]
        for writer in writers:
            writer.join(timeout=120)
        wait_for_status([p.nxs_path.with_suffix(".zarr") for p in plans], timeout=120)
    finally:
        stop_daemon(daemon)
    for plan in plans:
        store = StoreReader(plan.nxs_path.with_suffix(".zarr"))
        assert (store.status, store.attrs[Attr.END_REASON]) == (schema.STATUS_COMPLETE, "finished" if plan.layout == "gda9" else "end_time"), \
            (plan.name, store.attrs[Attr.END_REASON], log.read_text()[-3000:])
        assert store.done_frames().tolist() == list(range(plan.n_frames)), plan.name
        process_offline(config, plan.nxs_path, tmp_path / "offline")
        assert_stores_equal(store.path, tmp_path / "offline" / store.path.name)
