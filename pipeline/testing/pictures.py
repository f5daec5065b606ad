"""A small scan run through the real pipeline, a copy of its store with the truth's labels, and picture checks.

The pipeline runs on untrained weights in tests, so its own masks are not peaks; the copy of its
store gets the simulator's ground-truth labels instead, so that peaks, footprints and rocking
curves are known and pictures and tables can be checked against a direct numpy computation.
Both are built once per test session and reused (see tests/conftest.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import zarr
from PIL import Image
from scipy import ndimage

from pipeline.common.volume import VolumeLinker
from pipeline.pictures.quicklook import DPI
from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store import schema, store_status
from pipeline.testing.configs import write_config

N_FRAMES = 8
SCAN = "ql-scan"


@dataclass(frozen=True)
class BuiltScan:
    nxs: Path
    store: Path  # the real pipeline's store, beside the scan
    truth: Path  # the simulator's <scan>.truth.h5
    config: Path


def build_processed_scan(directory: Path, weights: dict[str, Path]) -> BuiltScan:
    """A simulated gda9 scan (2 peaks) run through `pipeline process`; reused if an earlier test already built it."""
    plan = ScanPlan(directory=directory / "scans", name=SCAN, layout="gda9", n_frames=N_FRAMES, rate_hz=100.0, seed=4, n_peaks=2)
    built = BuiltScan(plan.nxs_path, plan.nxs_path.with_suffix(".zarr"), plan.truth_path, directory / "config.yaml")
    if store_status(built.store) == schema.STATUS_COMPLETE:
        return built
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    write_config(built.config, weights)
    write_scan(plan)
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(built.config), str(built.nxs)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert store_status(built.store) == schema.STATUS_COMPLETE
    return built


def read_raw(store: Path) -> np.ndarray:
    """All raw frames of the (small) test scan, straight from the source file the store names."""
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    with h5py.File(str(group.attrs[schema.Attr.SOURCE_FILE]), "r", locking=False) as handle:
        raw: np.ndarray = handle[str(group.attrs[schema.Attr.SOURCE_DATASET])][()]
        return raw


def read_truth(truth: Path) -> np.ndarray:
    with h5py.File(truth, "r", locking=False) as handle:
        labels: np.ndarray = handle["labels"][()].astype(np.uint32)
        return labels


def make_truth_store(built: BuiltScan, directory: Path) -> Path:
    """A copy of the pipeline's store whose masks, detections and peaks table come from the ground truth."""
    store = directory / f"{SCAN}.zarr"
    if store_status(store) == schema.STATUS_COMPLETE and (directory / "ready").exists():
        return store
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shutil.copytree(built.store, store)
    truth = read_truth(built.truth)
    raw = read_raw(store)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group[schema.VOLUME_LABELS][:] = truth
    group[schema.TLM_LABELS][:] = truth.astype(np.uint16)
    group[schema.SSL_MASK][:] = np.stack([ndimage.binary_dilation(t > 0, iterations=2) for t in truth]).astype(np.uint8)
    rows = [(frame, window[1].start, window[0].start, window[1].stop, window[0].stop, 0.5 + 0.1 * k, k + 1)
            for frame in range(N_FRAMES)
            for k, window in enumerate(ndimage.find_objects(truth[frame].astype(np.int64))) if window is not None]
    table = np.array(rows, dtype=np.float64).reshape(-1, len(schema.DETECTION_COLUMNS))
    detections = group[schema.TLM_DETECTIONS]
    for index, (name, dtype) in enumerate(schema.DETECTION_COLUMNS.items()):
        detections.create_array(name, data=table[:, index].astype(dtype), dimension_names=schema.ROW_DIMS, overwrite=True)
    linker = VolumeLinker()  # the pipeline's own peaks table for these labels: an independent sum to compare with
    axis = group[schema.FRAMES_AXIS][:]
    for frame in range(N_FRAMES):
        linker.record(frame, truth[frame], raw[frame], float(axis[frame]))
    peaks = group[schema.PEAKS]
    for name, values in linker.table().items():
        peaks.create_array(name, data=values, dimension_names=schema.ROW_DIMS, overwrite=True)
    with warnings.catch_warnings():  # zarr warns that consolidated metadata is not in the v3 spec (yet)
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store)
    (directory / "ready").touch()
    return store


def copy_store(store: Path, directory: Path) -> Path:
    """A private copy for a test that changes it."""
    copy = directory / store.name
    shutil.copytree(store, copy)
    return copy


def png_size(figsize: tuple[float, float]) -> tuple[int, int]:
    return round(figsize[0] * DPI), round(figsize[1] * DPI)


def assert_picture(path: Path, size: tuple[int, int]) -> None:
    """A real PNG of the expected size, with something drawn on it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    assert grey.std() > 20, f"{path.name} looks blank (std {grey.std():.1f})"
