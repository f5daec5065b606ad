"""Scans of other detectors end to end: a Pilatus 300K (619 x 487) and an Eiger 1M-shaped (1065 x 1030) scan of
real thaumatin frames (dials/data-files, CC-BY 4.0; tests/data/real_frames/README) through `pipeline process` with
the shipped models.

Issue 26: frames other than the 100K's 195 x 487 were refused. Each scan here holds the real frame and the same
frame shifted (a second point of the rocking curve); the store must be complete with arrays of the scan's own
frame shape, and the TLM must find spots on the real frame (as tests/test_real_frames.py finds on the frame alone).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.models.real_frames import load_frames
from pipeline.store import StoreReader
from pipeline.testing.configs import write_config
from pipeline.testing.files import nexus_file

DATA = Path(__file__).parent / "data" / "real_frames"


@pytest.mark.daemon
def test_a_pilatus_300k_and_an_eiger_1m_shaped_scan_are_processed_at_their_own_shape(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    paths = {}
    for name in ("pilatus_300k", "eiger_1m_shape"):
        frame = load_frames(DATA / f"{name}.npz")[0][0]
        paths[name] = nexus_file(scans / f"{name}.nxs", np.stack([frame, np.roll(frame, 3, axis=1)]))
    config = write_config(tmp_path / "config.yaml", models={"precision": "float32"})
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress",
                             *map(str, paths.values())], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for name, shape in (("pilatus_300k", (619, 487)), ("eiger_1m_shape", (1065, 1030))):
        reader = StoreReader(paths[name].with_suffix(".zarr"))
        assert reader.status == "complete", (name, dict(reader.attrs))
        assert reader.done_frames().tolist() == [0, 1]
        for array in ("tlm/labels", "ssl/mask", "volume/labels"):
            assert reader.group[array].shape == (2, *shape), (name, array)
        instances = [int(np.unique(reader.group["tlm/labels"][index]).size - 1) for index in (0, 1)]
        assert min(instances) >= 10, (name, instances)  # crowded real frames: tens of spots found on each
        assert reader.table_rows("peaks") >= 10


@pytest.mark.daemon
def test_an_eigers_module_gaps_are_dead_pixels_not_two_billion_counts(tmp_path: Path) -> None:
    """A Dectris Eiger writes 4294967295 (uint32) in the gaps between its modules and on masked pixels. Taken as counts,
    each gap was a line two billion counts bright across the frame. They are dead pixels now, as the Pilatus' -2 are:
    nothing is found on them, and the frame's real spots still are."""
    scans = tmp_path / "scans"
    scans.mkdir()
    frame = load_frames(DATA / "eiger_1m_shape.npz")[0][0].astype(np.int64)
    eiger = np.clip(frame, 0, None).astype(np.uint32)
    gap_rows, gap_columns = slice(514, 551), slice(1028, 1030)  # an Eiger 1M's horizontal gap, and its right edge
    eiger[:, gap_columns] = np.iinfo(np.uint32).max
    eiger[gap_rows] = np.iinfo(np.uint32).max
    scan = nexus_file(scans / "eiger_gaps.nxs", np.stack([eiger, np.roll(eiger, 3, axis=1)]))
    config = write_config(tmp_path / "config.yaml", models={"precision": "float32"})
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(scan)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    reader = StoreReader(scan.with_suffix(".zarr"))
    assert reader.status == "complete" and reader.attrs.get("bad_frames", {}) == {}, dict(reader.attrs)
    gap_pixels = 37 * 1030
    for array in ("tlm/labels", "ssl/mask"):  # as counts, the SSLM's mask covered 97 % of the gap
        on_gap = int(np.count_nonzero(reader.group[array][0][gap_rows]))
        assert on_gap < 0.01 * gap_pixels, (array, on_gap)  # at most a spot's edge reaching into it
    assert int(np.unique(reader.group["tlm/labels"][0]).size - 1) >= 10  # the real spots still found
