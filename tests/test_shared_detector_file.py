"""Two scan files that link to one detector file, the way a copied .nxs arrives beside the original.

With the detector file in the old format (a version-0 superblock, as older writers leave it),
HDF5 corrupts its memory when one object of the dataset is refreshed while another is open: the
daemon used to fail both scans, then die with a segfault (exit 139, 3 runs of 3). Every reader in
the process now shares one object per dataset (`pipeline.common.shared_datasets`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.common.shared_datasets import datasets_open
from pipeline.config import FollowSettings
from pipeline.live.follow import ScanFollower
from pipeline.store import StoreReader, schema
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.i16 import I16Scan, write_detector_file, write_gda9
from pipeline.testing.stores import assert_stores_equal


def _copied_scan(directory: Path) -> tuple[I16Scan, Path]:
    """A GDA 9 scan whose detector file has a version-0 superblock, and a copy of its .nxs beside it."""
    scan = I16Scan(directory, "1001", "gda9", n_frames=6)
    write_gda9(scan)
    write_detector_file(scan, libver="earliest")
    with h5py.File(scan.detector_path, "r") as handle:
        assert handle.id.get_create_plist().get_version()[0] == 0  # the old superblock, really
    copy = directory / "1001_copy.nxs"
    shutil.copy(scan.nxs_path, copy)
    return scan, copy


def test_two_followers_of_one_old_detector_file_share_its_dataset(tmp_path: Path) -> None:
    scan, copy = _copied_scan(tmp_path)
    settings = FollowSettings(settle_s=0.0, idle_timeout_s=2.0)
    first, second = ScanFollower(scan.nxs_path, settings), ScanFollower(copy, settings)
    with first, second:
        first.open()
        second.open()
        assert datasets_open() == 1  # one object of the detector dataset for both
        seen: dict[str, list[np.ndarray]] = {"first": [], "second": []}
        for a, b in zip(first.frames(), second.frames()):  # interleaved: each poll refreshes the shared dataset
            seen["first"].append(a.data)
            seen["second"].append(b.data)
    assert datasets_open() == 0  # the last follower closed the file
    expected = scan.frames()
    assert len(seen["first"]) == len(seen["second"]) == scan.n_frames
    for index in range(scan.n_frames):
        np.testing.assert_array_equal(seen["first"][index], expected[index])
        np.testing.assert_array_equal(seen["second"][index], expected[index])


@pytest.mark.daemon
def test_the_daemon_processes_both_copies_and_the_next_scan(tmp_path: Path, untrained_weights) -> None:
    scan, copy = _copied_scan(tmp_path / "old")
    following = I16Scan(tmp_path / "next", "1002", "gda9", n_frames=4)  # an ordinary scan after them
    write_gda9(following)
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress",
                             str(scan.nxs_path), str(copy), str(following.nxs_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"  # was 139, a segfault
    stores = [scan.nxs_path.with_suffix(".zarr"), copy.with_suffix(".zarr"), following.nxs_path.with_suffix(".zarr")]
    for store, frames in zip(stores, (6, 6, 4)):
        reader = StoreReader(store)
        assert reader.status == schema.STATUS_COMPLETE, reader.attrs
        assert reader.done_frames().tolist() == list(range(frames))
    assert_stores_equal(stores[0], stores[1])  # the same frames, the same results
    with StoreReader(stores[1]).raw_frames() as dataset:  # what the pictures read: the detector file's own frames
        np.testing.assert_array_equal(dataset[2], scan.frames()[2])
