"""The scan axis of real-shaped GDA 9 and GDA 8 files whose held fields jitter (issue 26, point 3).

In a real `scan hkl [h k l] [h k l] [0 0 0.001] ...` the diffractometer computes h and k, which wander by
~4e-14 while l steps by 0.001. GDA 8 names h in `entry1/measurement@axes` all the same. The axis must be
the field that moves against the scan (its step), never one that only rounds differently at each point:
otherwise every rocking curve sits on one value. Files are built as GDA writes them
(`pipeline.testing.i16`) and read by the same function the follower calls.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.common import nexus
from pipeline.testing.i16 import I16Scan, write_gda8, write_gda9

JITTER = 4e-14


def _axis_of(path: Path) -> tuple[nexus.ScanAxis | None, np.ndarray | None]:
    """What the follower would choose, and that dataset's values."""
    with nexus.open_hdf5(path) as handle:
        entry = next(name for name in nexus.ENTRIES if name in handle)
        axis = nexus.find_scan_axis(handle, entry, nexus.scan_command_of(handle, entry))
        return axis, None if axis is None else np.asarray(handle[axis.path][()])


def _write(scan: I16Scan) -> Path:
    return (write_gda9 if scan.layout == "gda9" else write_gda8)(scan)


def test_the_files_really_jitter(tmp_path: Path) -> None:
    """The test files hold what the issue describes: h and k differ at the 1e-14 level, l steps by 0.001."""
    scan = I16Scan(tmp_path, "900", "gda8", n_frames=8, jitter=JITTER, held=(1.0, 0.5, 0.0))
    with h5py.File(_write(scan), "r") as handle:
        h, k, l_values = (handle[f"entry1/measurement/{name}"][()] for name in "hkl")
        assert list(handle["entry1/measurement"].attrs["axes"]) == ["h"]
    assert 0 < np.ptp(h) <= 2 * JITTER and 0 < np.ptp(k) <= 2 * JITTER
    assert abs(h.mean() - 1.0) < 1e-13 and abs(k.mean() - 0.5) < 1e-13
    np.testing.assert_allclose(np.diff(l_values), 0.001)


@pytest.mark.parametrize("held", [(0.0, 0.0, 0.0), (1.0, 0.5, 0.0), (-2.0, 3.0, 0.0)])
def test_gda8_hkl_scan_takes_l_though_axes_names_a_jittered_h(tmp_path: Path, held: tuple[float, float, float]) -> None:
    scan = I16Scan(tmp_path, "808", "gda8", n_frames=8, scanned="l", jitter=JITTER, held=held)
    axis, values = _axis_of(_write(scan))
    assert axis is not None and (axis.path, axis.name) == ("/entry1/measurement/l", "l")
    assert axis.source.startswith("scan command scannable") and "/entry1/measurement/h" in axis.source
    np.testing.assert_array_equal(values, scan.points())


def test_gda8_hkl_scan_along_h_keeps_the_default_axis(tmp_path: Path) -> None:
    scan = I16Scan(tmp_path, "809", "gda8", n_frames=6, scanned="h", start=0.95, jitter=JITTER, held=(0.0, 1.0, 2.0))
    axis, values = _axis_of(_write(scan))
    assert axis is not None and axis.path == "/entry1/measurement/h" and axis.source.startswith("NeXus default plot axis")
    np.testing.assert_array_equal(values, scan.points())


@pytest.mark.parametrize("layout, path", [("gda9", "/entry/pil3_100k/hkl_l"), ("gda8", "/entry1/measurement/l")])
@pytest.mark.parametrize("axes", [True, False])
def test_hkl_scan_along_l_with_and_without_axes(tmp_path: Path, layout: str, path: str, axes: bool) -> None:
    scan = I16Scan(tmp_path, "1009", layout, n_frames=7, scanned="l", jitter=JITTER, held=(0.0, 0.0, 0.0), axes=axes)
    axis, values = _axis_of(_write(scan))
    assert axis is not None and axis.path == path, axis
    if axes and layout == "gda9":  # GDA 9's @axes = [hkl_l, ., .] is right: it is taken as named
        assert axis.source == "NeXus default plot axis (/entry/pil3_100k@axes)"
    else:
        assert axis.source.startswith("scan command scannable")
    np.testing.assert_array_equal(values, scan.points())


@pytest.mark.parametrize("layout, path", [("gda9", "/entry/pil3_100k/eta"), ("gda8", "/entry1/measurement/eta")])
@pytest.mark.parametrize("axes", [True, False])
def test_eta_scan_beside_jittered_hkl(tmp_path: Path, layout: str, path: str, axes: bool) -> None:
    scan = I16Scan(tmp_path, "1100", layout, n_frames=6, scanned="eta", start=10.0, step=0.02, jitter=JITTER,
                   held=(0.0, 0.0, 1.0), axes=axes)
    assert scan.scan_command().startswith("scan eta 10.0 10.1")
    axis, values = _axis_of(_write(scan))
    assert axis is not None and (axis.path, axis.name) == (path, "eta"), axis
    np.testing.assert_array_equal(values, scan.points())


def test_a_tiny_step_still_beats_the_jitter(tmp_path: Path) -> None:
    """Constant is relative to the scan: a step of 1e-7 moves; 4e-14 of wander does not."""
    scan = I16Scan(tmp_path, "1200", "gda8", n_frames=6, scanned="l", step=1e-7, jitter=JITTER, held=(0.0, 0.0, 0.0), axes=False)
    axis, values = _axis_of(_write(scan))
    assert axis is not None and axis.path == "/entry1/measurement/l"
    np.testing.assert_array_equal(values, scan.points())


def test_without_steps_in_the_command_the_values_decide(tmp_path: Path) -> None:
    """A command that names `hkl` but no steps the parser reads: jittered h and k are constant by their values."""
    scan = I16Scan(tmp_path, "1300", "gda8", n_frames=6, scanned="l", jitter=JITTER, held=(1.0, 0.0, 0.0))
    path = _write(scan)
    with h5py.File(path, "r+") as handle:
        del handle["entry1/scan_command"]
        handle["entry1/scan_command"] = "scan hkl"
    axis, values = _axis_of(path)
    assert axis is not None and axis.path == "/entry1/measurement/l" and "constant against the scan" in axis.source
    np.testing.assert_array_equal(values, scan.points())


def test_a_live_file_with_one_point_takes_the_commands_moving_field(tmp_path: Path) -> None:
    """Opened while the first point is written, values cannot tell what moves: the command's step does."""
    scan = I16Scan(tmp_path, "1400", "gda8", n_frames=6, scanned="l", jitter=JITTER)
    path = _write(scan)
    with h5py.File(path, "r+") as handle:
        for name in "hkl":
            first = handle[f"entry1/measurement/{name}"][:1]
            del handle[f"entry1/measurement/{name}"]
            handle[f"entry1/measurement/{name}"] = first
    axis, values = _axis_of(path)
    assert axis is not None and axis.path == "/entry1/measurement/l"
    np.testing.assert_array_equal(values, scan.points()[:1])


def test_no_command_and_no_axes_finds_nothing(tmp_path: Path) -> None:
    scan = I16Scan(tmp_path, "1500", "gda8", n_frames=4, axes=False)
    path = _write(scan)
    with h5py.File(path, "r+") as handle:
        del handle["entry1/scan_command"]
    assert _axis_of(path) == (None, None)


def test_scan_command_moves() -> None:
    moves = nexus.scan_command_moves
    assert moves("scan hkl [0, 0, 0.9] [0, 0, 1.1] [0, 0, 0.001] pil3_100k 1") == [nexus.ScanMove("hkl", (0.0, 0.0, 0.001))]
    assert moves("scan hkl [1 0.5 0.9] [1 0.5 1.1] [0 0 0.001] pil3_100k 1") == [nexus.ScanMove("hkl", (0.0, 0.0, 0.001))]
    # a step on a field whose start is its stop moves nothing
    assert moves("scan hkl [1.0, 0, 2] [1.5, 0, 2] [0.05, 0, 0.1] pil3_100k 1") == [nexus.ScanMove("hkl", (0.05, 0.0, 0.0))]
    assert moves("scan eta 10 11 0.25 pil3_100k 1") == [nexus.ScanMove("eta", (0.25,))]
    assert moves("scan eta 10 11 0.25 delta 20 0.5 pil3_100k 1") == [nexus.ScanMove("eta", (0.25,)), nexus.ScanMove("delta", (0.5,))]
    assert moves("scan eta -1e-2 1e-2 5e-3 pil3_100k 1") == [nexus.ScanMove("eta", (5e-3,))]
    assert moves("scancn eta 0.01 41 pil3_100k 1") == [nexus.ScanMove("eta", (0.01,))]
    assert moves("scan hkl") == [] and moves("pos eta 10") == [] and moves(None) == [] and moves("") == []
    fields = nexus.ScanMove("hkl", (0.0, 0.0, 0.001)).fields()
    assert fields == [(("hkl_h", "h"), 0.0), (("hkl_k", "k"), 0.0), (("hkl_l", "l"), 0.001)]
    assert nexus.ScanMove("sixc", (0.0,) * 5 + (1.0,)).fields() == []  # parts it cannot name
