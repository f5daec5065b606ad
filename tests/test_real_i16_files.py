"""Real I16 scan files (tests/data/real_i16, from Diamond's hdfmap) through `pipeline process`.

The simulator writes files the way this project understood GDA; these two were written by GDA on I16 itself, with
everything a real scan carries (dozens of NXdata groups, positioners, a default plot whose axis does not move). Their
detector files are not published, so frames are written at the links' targets. The store must hold the layout, the
frame count and the scan axis the files' own metadata give, and that axis's positions frame by frame.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.store import open_live, read_attributes
from pipeline.testing.configs import MODELS_OFF, write_config

DATA = Path(__file__).parent / "data" / "real_i16"

pytestmark = pytest.mark.daemon

EXPECTED = {  # scan: (layout, frames, where the count came from, end reason, axis, how the axis was chosen)
    "1040323": ("gda9", 21, "entry/diamond_scan/scan_shape", "finished", "/entry/measurement/l",
                "scan command scannable (its step holds the default plot's axis /entry/measurement/h still)"),
    "1049598": ("gda8", 101, "entry1/scan_dimensions", "end_time", "/entry1/measurement/h",
                "NeXus default plot axis (/entry1/measurement@axes)"),
}


def test_real_i16_scan_files_are_read_by_their_own_metadata(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for name, (_, frames, *_rest) in EXPECTED.items():
        shutil.copy(DATA / f"{name}.nxs", scans)
        detector = scans / f"{name}-pilatus3_100k-files" / f"{name}.hdf"
        detector.parent.mkdir()
        counts = np.zeros((frames, 195, 487), np.int32)
        counts[:, 90:95, 200:205] = np.arange(1, frames + 1)[:, None, None]
        with h5py.File(detector, "w") as handle:
            handle.create_dataset("entry/instrument/detector/data", data=counts, chunks=(1, 195, 487), compression="gzip")
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF)
    done = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress",
                           *(str(scans / f"{name}.nxs") for name in EXPECTED)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (layout, frames, count_source, reason, axis, axis_source) in EXPECTED.items():
        store = scans / f"{name}.zarr"
        attrs = read_attributes(store)
        assert (attrs["status"], attrs["end_reason"], attrs["layout"]) == ("complete", reason, layout), attrs
        assert (attrs["frames_expected"], attrs["frames_expected_source"]) == (frames, count_source), attrs
        assert (attrs["axis_path"], attrs["axis_source"]) == (axis, axis_source), attrs
        with h5py.File(scans / f"{name}.nxs", "r") as handle:
            positions = handle[axis][()]
        group = open_live(store)
        assert group["frames/done"][:].tolist() == [1] * frames
        assert np.array_equal(group["frames/axis"][:], positions)  # frame by frame, the file's own positions
