"""Rows of a detector dataset that hold no frame yet are never read as frames (audit F5, F9).

Two live layouts read their unwritten rows as the fill value (zeros) and marked them done, so the scan's real frames were
never processed: a detector that grows its dataset of several-frame chunks before it writes each frame (areaDetector's
NDFileHDF5 with NumFramesChunks > 1), and a virtual dataset (Eiger, Odin) made at the scan's start over source files
its writers fill later. Each is written here by another process while `pipeline process` follows it, every frame
non-zero, so one all-zero frame in the store's `bad_frames` is a frame lost.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.live.written_rows import VirtualRows
from pipeline.store import open_live, read_attributes, schema
from pipeline.testing.configs import MODELS_OFF, write_config

pytestmark = pytest.mark.daemon

SHAPE = (195, 487)

_HEADER = textwrap.dedent("""
    import os, sys, time
    import h5py, numpy as np
    path = sys.argv[1]
    rng = np.random.default_rng(5)
    def frame():
        return (rng.poisson(5.0, (195, 487)) + 1).astype("i4")  # never zero
    def entry(handle, n):
        e = handle.create_group("entry1")
        e["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"
        e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        e.create_dataset("end_time", data=np.bytes_(b""), dtype="S32")
        group = e.create_group("pil3_100k")
        group.attrs["NX_class"] = "NXdetector"
        return e, group
    def follower_there():  # its store appears once it has opened the file: from then on, the frames come live
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.splitext(path)[0] + ".zarr") and time.monotonic() < deadline:
            time.sleep(0.05)
    def published():  # the file made under its .part name appears, and is reopened for SWMR once a follower has it
        os.replace(path + ".part", path)
        follower_there()
        handle = h5py.File(path, "a", libver="latest")
        handle.swmr_mode = True
        return handle
    def end(handle):
        handle["entry1/end_time"][()] = np.bytes_(time.strftime("%Y-%m-%dT%H:%M:%S").encode())
        handle.flush()
""")

GROWS_BEFORE_WRITING = _HEADER + textwrap.dedent("""
    n, frames_a_chunk, exposure_s = 6, 3, 1.2
    with h5py.File(path + ".part", "w", libver="latest") as handle:
        e, group = entry(handle, n)
        data = group.create_dataset("data", shape=(0, 195, 487), maxshape=(None, 195, 487), dtype="i4",
                                    chunks=(frames_a_chunk, 195, 487))
    with published() as handle:
        data = handle["entry1/pil3_100k/data"]
        for index in range(n):
            data.resize(index + 1, axis=0)  # the row exists for the whole exposure before the frame is in it
            data.flush()
            time.sleep(exposure_s)
            data[index] = frame()
            data.flush()
        end(handle)
""")

VIRTUAL_SOURCES_LATER = _HEADER + textwrap.dedent("""
    n, folder = 6, os.path.dirname(path)
    layout = h5py.VirtualLayout(shape=(n, 195, 487), dtype="i4")
    for process in range(2):  # two writer processes, frames interleaved (Odin: frame i to process i % 2)
        layout[process:n:2] = h5py.VirtualSource(f"odin_{process:06d}.h5", "data", shape=(n // 2, 195, 487))
    with h5py.File(path + ".part", "w", libver="latest") as handle:
        e, group = entry(handle, n)
        group.create_virtual_dataset("data", layout, fillvalue=0)
    os.replace(path + ".part", path)
    follower_there()
    time.sleep(1.0)  # the detector starts after the scan file is there
    sources = [h5py.File(os.path.join(folder, f"odin_{process:06d}.h5"), "w", libver="latest") for process in range(2)]
    datasets = [source.create_dataset("data", shape=(0, 195, 487), maxshape=(None, 195, 487), dtype="i4",
                                      chunks=(1, 195, 487)) for source in sources]
    for source in sources:
        source.swmr_mode = True
    for index in range(n):
        data = datasets[index % 2]
        data.resize(index // 2 + 1, axis=0)
        data[index // 2] = frame()
        data.flush()
        time.sleep(0.4)
    for source in sources:
        source.close()
    with h5py.File(path, "a") as handle:
        end(handle)
""")

PREALLOCATED = _HEADER + textwrap.dedent("""
    n = 6
    with h5py.File(path + ".part", "w", libver="latest") as handle:
        e, group = entry(handle, n)
        group.create_dataset("data", shape=(n, 195, 487), dtype="i4")  # contiguous: every row there from the start
    with published() as handle:
        data = handle["entry1/pil3_100k/data"]
        for index in range(n):
            time.sleep(0.6)
            data[index] = frame()
            data.flush()
        end(handle)
""")

END_TIME_ADDED_LAST = _HEADER + textwrap.dedent("""
    n = 4
    with h5py.File(path + ".part", "w", libver="latest") as handle:
        e = handle.create_group("entry1")
        e["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"
        e.create_group("pil3_100k").create_dataset("data", shape=(0, 195, 487), maxshape=(None, 195, 487), dtype="i4",
                                                   chunks=(1, 195, 487))
    with published() as handle:
        data = handle["entry1/pil3_100k/data"]
        for index in range(n):
            time.sleep(1.0)
            data.resize(index + 1, axis=0)
            data[index] = frame()
            data.flush()
    with h5py.File(path, "a", locking=False) as handle:  # as GDA 8 adds it to its .nxs: a new object, at the end
        handle["entry1"]["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
""")

RESHAPED = _HEADER + textwrap.dedent("""
    n = 6
    with h5py.File(path + ".part", "w", libver="latest") as handle:
        e, group = entry(handle, n)
        group.create_dataset("data", shape=(0, 195, 487), maxshape=(None, None, None), dtype="i4", chunks=(1, 195, 487))
    with published() as handle:
        data = handle["entry1/pil3_100k/data"]
        for index in range(n):
            time.sleep(0.8)
            if index == 3:  # a region of interest changed mid-scan
                data.resize((3, 200, 487))
            data.resize(index + 1, axis=0)
            data[index] = (rng.poisson(5.0, data.shape[1:]) + 1).astype("i4")
            data.flush()
        end(handle)
""")


def _follow_while_written(tmp_path: Path, writer: str, name: str, expect_rc: int = 0) -> tuple[Path, str]:
    """Start the writer process, then `pipeline process` on its file while it writes; the store and what process said."""
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = scans / f"{name}.nxs"
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF, follow={"settle_s": 0.3, "idle_timeout_s": 20.0})
    writing = subprocess.Popen([sys.executable, "-c", writer, str(scan)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not scan.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        following = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress",
                                    str(scan)], capture_output=True, text=True, timeout=180)
        assert writing.wait(timeout=60) == 0, writing.stderr.read() if writing.stderr else ""
    finally:
        if writing.poll() is None:
            writing.kill()
    assert following.returncode == expect_rc, following.stderr[-3000:]
    return scan.with_suffix(".zarr"), following.stderr


@pytest.mark.parametrize("writer, name", [(GROWS_BEFORE_WRITING, "grows_first"), (VIRTUAL_SOURCES_LATER, "odin")])
def test_rows_not_yet_written_are_read_once_their_frames_are_there(tmp_path: Path, writer: str, name: str) -> None:
    store, said = _follow_while_written(tmp_path, writer, name)
    attrs = read_attributes(store)
    assert attrs.get("bad_frames", {}) == {}, (attrs.get("bad_frames"), said[-2000:])  # no frame read as zeros
    assert attrs[schema.Attr.STATUS] == schema.STATUS_COMPLETE, attrs
    assert open_live(store)["frames/done"][:].tolist() == [1] * 6


def test_a_contiguous_dataset_filled_live_fails_in_one_line_saying_how_to_process_it_once_written(tmp_path: Path) -> None:
    """Audit F10: HDF5 cannot refresh a contiguous dataset once its SWMR writer has allocated it ("invalid dataset size,
    likely file corruption", for any new object of it too, until the file is opened again). The scan failed with that
    line, naming no dataset and suggesting damage. Its rows were also read as frames while unwritten (all there from
    the start). Now one line names the dataset and says what to do; the same command on the written file completes it."""
    store, said = _follow_while_written(tmp_path, PREALLOCATED, "preallocated", expect_rc=1)
    scan = tmp_path / "scans" / "preallocated.nxs"
    reason = read_attributes(store)[schema.Attr.END_REASON]
    assert reason == (f"{scan}:/entry1/pil3_100k/data: a contiguous dataset being filled cannot be followed live (Unable to "
                      f"refresh dataset (invalid dataset size, likely file corruption)); once the scan is written: "
                      f"pipeline process --force {scan}"), reason
    assert open_live(store)["frames/done"][:].sum() == 0  # no unwritten row was taken for a frame
    again = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(tmp_path / "config.yaml"),
                            "--no-progress", "--force", str(scan)], capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    attrs = read_attributes(store)
    assert (attrs[schema.Attr.STATUS], attrs.get("bad_frames", {})) == (schema.STATUS_COMPLETE, {}), attrs
    assert open_live(store)["frames/done"][:].tolist() == [1] * 6


def test_an_end_time_added_as_a_new_object_after_the_frames_ends_the_scan(tmp_path: Path) -> None:
    """Audit F6: with the frames in the scan file itself, an end_time its writer adds at the end (reopening the file) was
    never seen: the scan waited the idle timeout (30 s by default) and ended `incomplete` with every frame done."""
    started = time.monotonic()
    store, said = _follow_while_written(tmp_path, END_TIME_ADDED_LAST, "end_added")
    attrs = read_attributes(store)
    assert (attrs[schema.Attr.STATUS], attrs[schema.Attr.END_REASON]) == (schema.STATUS_COMPLETE, "end_time"), said[-2000:]
    assert time.monotonic() - started < 20  # the idle timeout here: 20 s
    assert open_live(store)["frames/done"][:].tolist() == [1] * 4


def test_a_frame_shape_that_changes_mid_scan_fails_the_scan_in_one_line(tmp_path: Path) -> None:
    """Audit F7: rows 195 -> 200 from frame 3 on were cropped to 195 without a word (the store kept 195 x 487)."""
    store, said = _follow_while_written(tmp_path, RESHAPED, "reshaped", expect_rc=1)
    scan = tmp_path / "scans" / "reshaped.nxs"
    attrs = read_attributes(store)
    assert attrs[schema.Attr.STATUS] == schema.STATUS_FAILED, attrs
    assert attrs[schema.Attr.END_REASON] == (f"{scan}:/entry1/pil3_100k/data: frames now of 200 x 487 pixels, were 195 x "
                                             "487: a frame shape that changes mid-scan is refused"), attrs
    assert open_live(store)["frames/done"][:].sum() <= 3  # none of the 200-row frames


def _virtual_file(path: Path, sources: dict[str, int], build: object) -> h5py.Dataset:
    for name, rows in sources.items():
        with h5py.File(path.parent / name, "w") as handle:
            handle.create_dataset("data", data=np.ones((rows, 2, 3), dtype="i4"), maxshape=(None, 2, 3), chunks=(1, 2, 3))
    with h5py.File(path, "w", libver="latest") as handle:
        build(handle)  # type: ignore[operator]
    return h5py.File(path, "r")["data"]


def test_virtual_rows_follow_each_mapping_to_its_source_row(tmp_path: Path) -> None:
    """The mapping arithmetic, on the layouts writers make: blocks of whole sources, interleaved sources, unlimited ones."""

    def blocks(handle: h5py.File) -> None:  # frames 0-3 from a.h5 (all there), 4-7 from b.h5 (2 of 4 written), 8-11: c.h5
        layout = h5py.VirtualLayout(shape=(12, 2, 3), dtype="i4")
        for number, name in enumerate(["a.h5", "b.h5", "c.h5"]):
            layout[4 * number:4 * number + 4] = h5py.VirtualSource(name, "data", shape=(4, 2, 3))
        handle.create_virtual_dataset("data", layout, fillvalue=0)

    data = _virtual_file(tmp_path / "blocks.nxs", {"a.h5": 4, "b.h5": 2}, blocks)
    rows = VirtualRows(data, tmp_path / "blocks.nxs")
    try:
        assert [rows.row_complete(i, final=False) for i in range(12)] == [True] * 4 + [True, True, False, False] + [False] * 4
    finally:
        rows.close()
        data.file.close()

    def interleaved(handle: h5py.File) -> None:  # even frames from even.h5 (3 written), odd ones from odd.h5 (1 written)
        layout = h5py.VirtualLayout(shape=(8, 2, 3), dtype="i4", maxshape=(None, 2, 3))
        for first, name in enumerate(["even.h5", "odd.h5"]):
            source = h5py.VirtualSource(name, "data", shape=(4, 2, 3), maxshape=(None, 2, 3))
            layout[first:h5py.h5s.UNLIMITED:2] = source[0:h5py.h5s.UNLIMITED]
        handle.create_virtual_dataset("data", layout, fillvalue=0)

    data = _virtual_file(tmp_path / "interleaved.nxs", {"even.h5": 3, "odd.h5": 1}, interleaved)
    rows = VirtualRows(data, tmp_path / "interleaved.nxs")
    try:
        assert [rows.row_complete(i, final=False) for i in range(8)] == [True, True, True, False, True, False, False, False]
    finally:
        rows.close()
        data.file.close()
