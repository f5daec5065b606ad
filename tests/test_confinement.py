"""Data outside the allowed roots is never read: links, virtual datasets and external raw storage.

Each scan below sits in the watched directory and looks like a normal DiPID-era or GDA 8 scan, but
its frames come from elsewhere: an external link to a file in another "visit" (absolute, and
relative with `../`), a virtual dataset over that file, and a dataset whose raw storage is an
external flat file (`/etc/passwd`). A real daemon must fail each scan with one line naming the
link and where it leads, and write no pixel of it; a scan linking inside the allowed roots (a
second directory named in `follow.allowed_roots`) still completes.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.common.detector import FRAME_SHAPE
from pipeline.store import read_attributes, schema
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers
from pipeline.testing.files import appear

pytestmark = pytest.mark.daemon


def _frames(n: int = 3) -> np.ndarray:
    return np.random.default_rng(5).poisson(3.0, (n, *FRAME_SHAPE)).astype(np.int32)


def _detector_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("/entry/instrument/detector/data", data=_frames(), chunks=(1, *FRAME_SHAPE))
    return path


def _linking_scan(path: Path, target: str) -> Path:
    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1"
            entry["start_time"] = f"2024-01-01T00:00:{time.time_ns() % 60:02d}"
            entry["end_time"] = "2024-01-01T00:01:00"
            entry.create_group("instrument/pil3_100k")["data"] = h5py.ExternalLink(target, "/entry/instrument/detector/data")
    return appear(path, write)


def _virtual_scan(path: Path, source: Path) -> Path:
    def write(temporary: Path) -> None:
        layout = h5py.VirtualLayout(shape=(3, *FRAME_SHAPE), dtype="int32")
        layout[:] = h5py.VirtualSource(str(source), "/entry/instrument/detector/data", shape=(3, *FRAME_SHAPE))
        with h5py.File(temporary, "w", libver="latest") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:01:00"
            entry.create_group("pil3_100k").create_virtual_dataset("data", layout)
    return appear(path, write)


def _external_storage_scan(path: Path, flat_file: Path) -> Path:
    size = flat_file.stat().st_size
    frames = max(1, size // (4 * FRAME_SHAPE[0] * FRAME_SHAPE[1]))

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10 1 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:01:00"
            entry.create_group("pil3_100k").create_dataset("data", shape=(frames, *FRAME_SHAPE), dtype="uint8",
                                                            external=[(str(flat_file), 0, h5py.h5f.UNLIMITED)])
    return appear(path, write)


def test_links_virtual_datasets_and_external_storage_outside_the_roots_fail_in_one_line(tmp_path: Path, untrained_weights) -> None:
    watched, other_visit, allowed = tmp_path / "visit-a", tmp_path / "visit-b", tmp_path / "shared-detector"
    watched.mkdir()
    secret = _detector_file(other_visit / "secret.hdf")
    shared = _detector_file(allowed / "shared.hdf")
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF, follow={"allowed_roots": [str(allowed)]})
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, watched, log)
    try:
        wait_for_workers(config, 1)
        hostile = {
            _linking_scan(watched / "absolute.nxs", str(secret)): "external link to",
            _linking_scan(watched / "relative.nxs", "../visit-b/secret.hdf"): "external link to",
            _virtual_scan(watched / "virtual.nxs", secret): "virtual dataset over",
            _external_storage_scan(watched / "passwd.nxs", Path("/etc/passwd")): "external file /etc/passwd",
        }
        allowed_scan = _linking_scan(watched / "allowed.nxs", str(shared))
        stores = [path.with_suffix(".zarr") for path in [*hostile, allowed_scan]]
        wait_for_status(stores, timeout=120)
    finally:
        stop_daemon(daemon)
    text = log.read_text()
    for scan, words in hostile.items():
        attrs = read_attributes(scan.with_suffix(".zarr"))
        assert attrs[schema.Attr.STATUS] == schema.STATUS_FAILED, (scan.name, attrs)
        reason = attrs[schema.Attr.END_REASON]
        assert words in reason and "outside the allowed roots" in reason, reason
        assert not (scan.with_suffix(".zarr") / "frames").exists()  # no pixel of it was written
        assert sum(1 for line in text.splitlines() if scan.name in line and "outside the allowed roots" in line) >= 1
    attrs = read_attributes(allowed_scan.with_suffix(".zarr"))
    assert attrs[schema.Attr.STATUS] == schema.STATUS_COMPLETE and attrs[schema.Attr.SOURCE_FILE] == str(shared)
