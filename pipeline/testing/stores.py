"""Checks on stores: the same frames and tables, how many frames are done, an offline run to compare with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.store import open_live, schema
from pipeline.store.reader import TABLE_ATOL, TABLE_RTOL

ARRAYS = (schema.TLM_LABELS, schema.SSL_CLUSTERS, schema.SSL_MASK, schema.VOLUME_LABELS, schema.FRAMES_DONE)


def assert_stores_equal(live: Path, offline: Path) -> None:
    """Every per-frame array equal frame by frame, every table column equal (to float rounding)."""
    a, b = open_live(live), open_live(offline)
    for name in ARRAYS:
        assert a[name].shape == b[name].shape, name
        for index in range(a[name].shape[0]):
            np.testing.assert_array_equal(a[name][index], b[name][index], err_msg=f"{name} frame {index}")
    for table in schema.TABLES:
        assert sorted(a[table].array_keys()) == sorted(b[table].array_keys())
        for column in a[table].array_keys():
            np.testing.assert_allclose(a[table][column][:], b[table][column][:], rtol=TABLE_RTOL, atol=TABLE_ATOL, err_msg=f"{table}/{column}")


def done_count(store: Path) -> int:
    """Frames marked done in a store (0 while there is no readable store)."""
    try:
        return int(open_live(store)[schema.FRAMES_DONE][:].sum())
    except Exception:
        return 0


def process_offline(config: Path, nexus_path: Path, output_root: Path) -> None:
    """`pipeline process` of a finished scan into `output_root`, asserting that it succeeds."""
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--output-root", str(output_root),
                             str(nexus_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def put_truth_labels(store: Path, truth: Path) -> None:
    """Overwrite a finished store's TLM and 3D labels with the simulator's ground truth (`<scan>.truth.h5`),
    so that what a store says is known exactly (for exporting labels, pictures, tables)."""
    import h5py
    import zarr

    with h5py.File(truth, "r", locking=False) as handle:
        labels = handle["labels"][()].astype(np.uint32)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group[schema.VOLUME_LABELS][:] = labels
    group[schema.TLM_LABELS][:] = labels.astype(np.uint16)
