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
from pipeline.store import open_live, read_attributes, schema
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


def _secret_file(path: Path) -> Path:
    """Another visit's file: frames at /data and in an NXdetector group /grp, with a NaN at pixel (0, 0) of each, so a
    store's `bad_frames` would show that its pixels were read."""
    frames = np.full((3, *FRAME_SHAPE), 7.0, dtype=np.float32)
    frames[:, 0, 0] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", data=frames)
        group = handle.create_group("grp")
        group.attrs["NX_class"] = "NXdetector"
        group.create_dataset("data", data=frames)
    return path


def _scan_with(path: Path, make_detector: object) -> Path:
    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w", libver="latest") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1"
            entry["start_time"] = f"2024-01-01T00:00:{time.time_ns() % 60:02d}"
            entry["end_time"] = "2024-01-01T00:01:00"
            make_detector(entry)  # type: ignore[operator]
    return appear(path, write)


def _relative_virtual(entry: h5py.Group) -> None:
    layout = h5py.VirtualLayout(shape=(3, *FRAME_SHAPE), dtype=np.float32)
    layout[:] = h5py.VirtualSource("secret.h5", "data", shape=(3, *FRAME_SHAPE))
    group = entry.create_group("pil3_100k")
    group.attrs["NX_class"] = "NXdetector"
    group.create_virtual_dataset("data", layout, fillvalue=0)


def test_links_hdf5_would_resolve_in_the_working_directory_or_from_the_detector_file_read_no_pixel_of_them(
        tmp_path: Path) -> None:
    """Audit R2: HDF5 looks for a relative link's or virtual source's file beside the file that names it, then in the
    process's working directory, and for an absolute one that does not exist, under its bare name in both. The check
    looked only beside the scan: a daemon started in another visit's folder (where an operator stood) read its pixels
    (stores `complete`, with the secret's NaN pixels in bad_frames). And the detector file's own links were never checked.
    Now the reader works in a removed folder, so HDF5 finds nothing there, and the detector file's links are checked."""
    watched, other_visit, operator_stood = tmp_path / "visit-a", tmp_path / "visit-b", tmp_path / "visit-c"
    watched.mkdir()
    _secret_file(operator_stood / "secret.h5")  # found only through the daemon's working directory
    far_secret = _secret_file(other_visit / "secret.h5")

    def detector_file_linking(name: str, target: str) -> Path:
        path = watched / f"{name}-files" / f"{name}.hdf"
        path.parent.mkdir()
        with h5py.File(path, "w") as handle:
            handle["/entry/instrument/detector/data"] = h5py.ExternalLink(target, "/data")
        return path

    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF, follow={"link_timeout_s": 2.0, "idle_timeout_s": 3.0})
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, watched, log, cwd=operator_stood)
    try:
        wait_for_workers(config, 1)
        detector_abs = detector_file_linking("detector_abs", str(far_secret))
        detector_rel = detector_file_linking("detector_rel", "secret.h5")
        scans = {
            _scan_with(watched / "vds_rel.nxs", _relative_virtual): None,
            _linking_scan(watched / "detector_abs.nxs", str(detector_abs.relative_to(watched))):
                f"external link to {far_secret}:/data leads outside the allowed roots",
            _linking_scan(watched / "detector_rel.nxs", str(detector_rel.relative_to(watched))):
                "no dataset /entry/instrument/detector/data",
        }
        skipped = [  # the detector group an external link: with nothing found, not a detector scan
            _scan_with(watched / "group_rel.nxs", lambda entry: entry.__setitem__("pil3_100k", h5py.ExternalLink("secret.h5", "/grp"))),
            _scan_with(watched / "group_abs.nxs", lambda entry: entry.__setitem__(
                "pil3_100k", h5py.ExternalLink("/dls/i16/data/2026/cm00000-1/secret.h5", "/grp"))),
        ]
        wait_for_status([path.with_suffix(".zarr") for path in scans], timeout=120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and log.read_text().count("not a detector scan") < 2:
            time.sleep(0.2)
    finally:
        stop_daemon(daemon)
    text = log.read_text()
    for scan, reason in scans.items():
        attrs = read_attributes(scan.with_suffix(".zarr"))
        assert "nan" not in attrs.get("bad_frames", {}), (scan.name, attrs)  # no pixel of the secret was read
        if reason is not None:
            assert attrs[schema.Attr.STATUS] == schema.STATUS_FAILED and reason in attrs[schema.Attr.END_REASON], (scan.name, attrs)
            assert not (scan.with_suffix(".zarr") / "frames").exists()
        else:  # a virtual source HDF5 cannot find: its rows hold nothing, so none is done (pipeline.live.written_rows)
            assert attrs[schema.Attr.STATUS] == schema.STATUS_INCOMPLETE, (scan.name, attrs)
            assert open_live(scan.with_suffix(".zarr"))["frames/done"][:].sum() == 0
    for scan in skipped:
        assert not scan.with_suffix(".zarr").exists()
        assert [line for line in text.splitlines() if scan.name in line and "not a detector scan" in line], text[-3000:]


def test_the_link_check_follows_hdf5s_search_into_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """Where the check runs in a process with a working directory (a web view, an in-process follower), a file HDF5
    would find there is judged like any other: outside the roots, refused."""
    from pipeline.live.confinement import dataset_outside, links_outside

    watched, operator_stood = tmp_path / "visit-a", tmp_path / "visit-c"
    watched.mkdir()
    _secret_file(operator_stood / "secret.h5")
    group_rel = _scan_with(watched / "group_rel.nxs", lambda entry: entry.__setitem__("pil3_100k", h5py.ExternalLink("secret.h5", "/grp")))
    group_abs = _scan_with(watched / "group_abs.nxs", lambda entry: entry.__setitem__(
        "pil3_100k", h5py.ExternalLink("/dls/i16/data/2026/cm00000-1/secret.h5", "/grp")))
    vds_rel = _scan_with(watched / "vds_rel.nxs", _relative_virtual)
    roots = [watched]
    for scan in (group_rel, group_abs):
        with h5py.File(scan, "r") as handle:
            assert links_outside(handle, scan, roots) is None  # from a folder holding no secret.h5: nothing found
    with h5py.File(vds_rel, "r") as handle:
        assert dataset_outside(handle["entry1/pil3_100k/data"], vds_rel, roots) is None
    monkeypatch.chdir(operator_stood)
    for scan in (group_rel, group_abs):
        with h5py.File(scan, "r") as handle:
            problem = links_outside(handle, scan, roots)
        assert problem is not None and f"found as {operator_stood / 'secret.h5'}, outside the allowed roots" in problem, problem
    with h5py.File(vds_rel, "r") as handle:
        problem = dataset_outside(handle["entry1/pil3_100k/data"], vds_rel, roots)
    assert problem is not None and f"found as {operator_stood / 'secret.h5'}, outside the allowed roots" in problem, problem
