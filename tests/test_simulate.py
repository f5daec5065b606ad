"""Tests of the beamline stand-in: real writer processes, real SWMR files, read while being written."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.simulator.synth import FRAME_SHAPE, RockingScan
from pipeline.simulator.writers import LAYOUTS, ScanPlan, ScanWriter, add_parser, run_simulate, write_scan

TIMEOUT_S = 40.0


def _open_when_ready(path: Path, deadline: float) -> h5py.File:
    """A follower's open: the file may not exist, or not be in SWMR mode yet."""
    while True:
        try:
            return h5py.File(path, "r", swmr=True, locking=False)
        except (OSError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _text(dataset: h5py.Dataset) -> str:
    value = dataset[()]
    return value.decode() if isinstance(value, bytes) else str(value)


def _assert_truth_file(plan: ScanPlan, frames: int) -> None:
    scan = plan.rocking_scan()
    with h5py.File(plan.truth_path, "r") as truth:
        assert truth.attrs["seed"] == plan.seed and truth.attrs["layout"] == plan.layout
        assert truth.attrs["n_frames"] == plan.n_frames
        labels = truth["labels"]
        assert labels.dtype == np.uint16 and labels.shape == (plan.n_frames, *FRAME_SHAPE)
        assert labels.chunks == (1, *FRAME_SHAPE) and labels.compression == "gzip"
        for index in range(frames):
            np.testing.assert_array_equal(labels[index], scan.frame(index)[1])
        np.testing.assert_array_equal(truth["peaks/id"][()], [p.id for p in scan.peaks])
        np.testing.assert_array_equal(truth["peaks/first_frame"][()], [p.first_frame for p in scan.peaks])
        np.testing.assert_array_equal(truth["peaks/last_frame"][()], [p.last_frame for p in scan.peaks])
        np.testing.assert_array_equal(truth["peaks/centre_frame"][()], [p.centre_frame for p in scan.peaks])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_final_file_content_matches_the_generator(tmp_path: Path, layout: str) -> None:
    plan = ScanPlan(directory=tmp_path, name=f"scan-{layout}", layout=layout, n_frames=5, rate_hz=100.0,
                    seed=3, n_peaks=3)
    assert write_scan(plan) == plan.nxs_path
    scan = plan.rocking_scan()
    entry = "entry" if layout == "gda9" else "entry1"
    with h5py.File(plan.nxs_path, "r") as handle:
        assert handle[entry].attrs["NX_class"] == "NXentry"
        assert handle[f"{entry}/pil3_100k"].attrs["NX_class"] == "NXdata"
        assert handle[f"{entry}/pil3_100k"].attrs["signal"] == "data"
        data = handle[f"{entry}/pil3_100k/data"]
        assert data.dtype == np.int32 and data.shape == (5, *FRAME_SHAPE)
        assert data.maxshape == (None, *FRAME_SHAPE) and data.chunks == (1, *FRAME_SHAPE)
        for index in range(5):
            np.testing.assert_array_equal(data[index], scan.frame(index)[0])
        assert _text(handle[f"{entry}/start_time"])
        assert _text(handle[f"{entry}/end_time"]).strip("\x00")
        if layout == "nexus":
            assert handle.get(f"{entry}/pil3_100k/data", getlink=True).__class__ is h5py.HardLink
            np.testing.assert_allclose(handle["entry1/pil3_100k/eta"][()], scan.axis_values)
            assert _text(handle["entry1/scan_command"]) == "scan eta 10.0 10.08 0.02 pil3_100k 1"
        else:
            for path in (f"{entry}/instrument/pil3_100k/data", f"{entry}/pil3_100k/data"):
                link = handle.get(path, getlink=True)
                assert isinstance(link, h5py.ExternalLink)
                assert link.filename == f"scan-{layout}-pilatus3_100k-files/scan-{layout}.hdf"
                assert link.path == "/entry/instrument/detector/data"
        if layout == "gda9":
            diamond = handle["entry/diamond_scan"]
            np.testing.assert_array_equal(diamond["keys/uniqueKeys"][()], np.arange(1, 6))
            assert diamond["keys/uniqueKeys"].dtype == np.int32
            np.testing.assert_array_equal(diamond["scan_finished"][()], [1])
            np.testing.assert_array_equal(diamond["scan_shape"][()], [5])
            assert _text(diamond["scan_command"]).startswith("scan eta 10.0 ")
            np.testing.assert_allclose(handle["entry/pil3_100k/eta"][()], scan.axis_values)
        if layout == "gda8":
            assert handle["entry1/measurement"].attrs["NX_class"] == "NXdata"
            np.testing.assert_allclose(handle["entry1/measurement/eta"][()], scan.axis_values)
            assert "diamond_scan" not in handle["entry1"]
    if layout != "nexus":
        with h5py.File(plan.detector_path, "r") as detector:
            assert detector["entry"].attrs["NX_class"] == "NXentry"
            assert detector["/entry/instrument/detector/data"].shape == (5, *FRAME_SHAPE)
    _assert_truth_file(plan, 5)


def test_gda9_keys_follow_flushed_frames_while_written(tmp_path: Path) -> None:
    plan = ScanPlan(directory=tmp_path, name="live9", layout="gda9", n_frames=8, rate_hz=20.0, seed=1)
    scan = plan.rocking_scan()
    writer = ScanWriter(plan).start()
    deadline = time.monotonic() + TIMEOUT_S
    checked: set[int] = set()
    shapes_seen: set[int] = set()
    try:
        with _open_when_ready(plan.nxs_path, deadline) as handle:
            keys = handle["entry/diamond_scan/keys/uniqueKeys"]
            finished = handle["entry/diamond_scan/scan_finished"]
            eta = handle["entry/pil3_100k/eta"]
            data = None
            while time.monotonic() < deadline:
                finished.refresh()
                done = int(finished[0]) == 1
                keys.refresh()
                eta.refresh()
                ready = np.flatnonzero(keys[()])
                if len(ready) and data is None:
                    data = handle["entry/pil3_100k/data"]  # the link resolves once the detector file exists
                if data is not None:
                    data.refresh()
                    shapes_seen.add(data.shape[0])
                for index in ready:
                    if index in checked:
                        continue
                    assert keys[index] == index + 1
                    assert data.shape[0] > index, "a key turned non-zero before its frame was readable"
                    np.testing.assert_array_equal(data[index], scan.frame(int(index))[0])
                    assert eta[index] == pytest.approx(scan.axis_values[index])
                    checked.add(int(index))
                if done:
                    keys.refresh()
                    assert (keys[()] > 0).all(), "scan_finished before all keys"
                    break
                time.sleep(0.01)
            else:
                pytest.fail("scan_finished never turned 1")
    finally:
        writer.join(TIMEOUT_S)
    assert checked == set(range(8))
    assert len(shapes_seen) >= 2, "the reader never saw the dataset grow"
    assert not writer.is_alive()


def test_nexus_frames_readable_while_written(tmp_path: Path) -> None:
    plan = ScanPlan(directory=tmp_path, name="livenx", layout="nexus", n_frames=6, rate_hz=20.0, seed=2)
    scan = plan.rocking_scan()
    writer = ScanWriter(plan).start()
    deadline = time.monotonic() + TIMEOUT_S
    shapes_seen: list[int] = []
    try:
        with _open_when_ready(plan.nxs_path, deadline) as handle:
            data = handle["entry1/pil3_100k/data"]
            end_time = handle["entry1/end_time"]
            assert _text(end_time).strip("\x00") == ""
            while time.monotonic() < deadline:
                end_time.refresh()
                ended = bool(_text(end_time).strip("\x00"))
                data.refresh()
                shapes_seen.append(data.shape[0])
                if data.shape[0]:
                    last = data.shape[0] - 1
                    np.testing.assert_array_equal(data[last], scan.frame(last)[0])
                if ended:
                    break
                time.sleep(0.01)
            else:
                pytest.fail("end_time never written")
    finally:
        writer.join(TIMEOUT_S)
    assert shapes_seen[-1] == 6 and len(set(shapes_seen)) >= 3
    assert shapes_seen == sorted(shapes_seen)


def test_frames_keep_to_the_rate(tmp_path: Path) -> None:
    plan = ScanPlan(directory=tmp_path, name="rate", layout="nexus", n_frames=10, rate_hz=20.0)
    writer = ScanWriter(plan).start()
    deadline = time.monotonic() + TIMEOUT_S
    first_frame_at = None
    while writer.frames_written < 10 and time.monotonic() < deadline:
        if first_frame_at is None and writer.frames_written >= 1:
            first_frame_at = time.monotonic()
        time.sleep(0.005)
    elapsed = time.monotonic() - first_frame_at
    writer.join(TIMEOUT_S)
    assert 0.35 < elapsed < 1.5  # 9 intervals of 50 ms


def test_link_delay_detector_file_appears_later(tmp_path: Path) -> None:
    plan = ScanPlan(directory=tmp_path, name="delay", layout="gda8", n_frames=3, rate_hz=50.0, link_delay_s=1.5)
    writer = ScanWriter(plan).start()
    deadline = time.monotonic() + TIMEOUT_S
    while not plan.nxs_path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    nxs_seen = time.monotonic()
    time.sleep(0.5)
    assert not plan.detector_path.exists(), "the detector file appeared before link_delay_s"
    with h5py.File(plan.nxs_path, "r", locking=False) as handle:  # gda8: complete and closed at once
        assert isinstance(handle.get("entry1/pil3_100k/data", getlink=True), h5py.ExternalLink)
        with pytest.raises(KeyError):
            handle["entry1/pil3_100k/data"]
    while not plan.detector_path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert time.monotonic() - nxs_seen > 1.2
    writer.join(TIMEOUT_S)
    with h5py.File(plan.nxs_path, "r") as handle:
        assert handle["entry1/pil3_100k/data"].shape[0] == 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_abandoned_scan_has_no_end_marker(tmp_path: Path, layout: str) -> None:
    plan = ScanPlan(directory=tmp_path, name=f"crash-{layout}", layout=layout, n_frames=6, rate_hz=100.0,
                    abandon_after=2)
    writer = ScanWriter(plan).start()
    writer.join(TIMEOUT_S)
    assert not writer.is_alive()
    entry = "entry" if layout == "gda9" else "entry1"
    with h5py.File(plan.nxs_path, "r", swmr=True, locking=False) as handle:
        assert handle[f"{entry}/pil3_100k/data"].shape[0] == 2
        if layout == "gda9":
            np.testing.assert_array_equal(handle["entry/diamond_scan/keys/uniqueKeys"][()], [1, 2, 0, 0, 0, 0])
            np.testing.assert_array_equal(handle["entry/diamond_scan/scan_finished"][()], [0])
        if layout == "gda8":
            assert "end_time" not in handle["entry1"]
        else:
            assert _text(handle[f"{entry}/end_time"]).strip("\x00") == ""
    _assert_truth_file(plan, 2)


def test_kill_leaves_readable_partial_files(tmp_path: Path) -> None:
    plan = ScanPlan(directory=tmp_path, name="killed", layout="gda9", n_frames=100, rate_hz=20.0)
    writer = ScanWriter(plan).start()
    deadline = time.monotonic() + TIMEOUT_S
    while writer.frames_written < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.kill()
    assert not writer.is_alive()
    writer.join(1.0)  # a killed writer is not an error
    scan = plan.rocking_scan()
    with h5py.File(plan.nxs_path, "r", swmr=True, locking=False) as handle:
        keys = handle["entry/diamond_scan/keys/uniqueKeys"][()]
        assert handle["entry/diamond_scan/scan_finished"][0] == 0
        data = handle["entry/pil3_100k/data"]
        written = int(np.count_nonzero(keys))
        assert 2 <= written < 100 and data.shape[0] >= written
        np.testing.assert_array_equal(keys[:written], np.arange(1, written + 1))
        np.testing.assert_array_equal(data[written - 1], scan.frame(written - 1)[0])


def test_plan_validation() -> None:
    with pytest.raises(ValueError):
        ScanPlan(directory=Path("."), name="x", layout="gda7", n_frames=3)
    with pytest.raises(ValueError):
        ScanPlan(directory=Path("."), name="x", layout="gda9", n_frames=0)
    with pytest.raises(ValueError):
        ScanPlan(directory=Path("."), name="x", layout="gda9", n_frames=3, rate_hz=0.0)
    plan = ScanPlan(directory=Path("/data"), name="123", layout="gda9", n_frames=3)
    assert plan.nxs_path == Path("/data/123.nxs") and plan.truth_path == Path("/data/123.truth.h5")
    assert plan.detector_path == Path("/data/123-pilatus3_100k-files/123.hdf")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["simulate", "--out", str(tmp_path), "--layout", "nexus", "--frames", "3",
                                 "--rate", "100", "--seed", "4", "--peaks", "2"])
    assert args.func is run_simulate
    assert run_simulate(args) == 0
    out = capsys.readouterr().out
    nxs = tmp_path / "sim-nexus-0000.nxs"
    assert str(nxs) in out and str(tmp_path / "sim-nexus-0000.truth.h5") in out
    with h5py.File(nxs, "r") as handle:
        assert handle["entry1/pil3_100k/data"].shape == (3, *FRAME_SHAPE)
    with h5py.File(tmp_path / "sim-nexus-0000.truth.h5", "r") as truth:
        assert truth.attrs["seed"] == 4 and len(truth["peaks/id"]) <= 2
    defaults = _parser().parse_args(["simulate"])
    assert (defaults.out, defaults.layout, defaults.scans, defaults.frames, defaults.rate, defaults.seed) == (
        Path("simulated"), "all", 1, 50, 10.0, 0)


@pytest.mark.parametrize("bad", [["--rate", "0"], ["--frames", "x"], ["--layout", "gda7"], ["--scans", "0"]])
def test_command_line_rejects_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["simulate", *bad])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_rocking_scan_frames_match_what_simulate_uses() -> None:
    plan = ScanPlan(directory=Path("."), name="x", layout="gda9", n_frames=4, seed=9, n_peaks=2)
    np.testing.assert_array_equal(plan.rocking_scan().frame(2)[0], RockingScan(4, 9, n_peaks=2).frame(2)[0])
