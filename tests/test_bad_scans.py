"""Bad scan files, for real: a real daemon with a real worker process meets broken, odd and vanishing files.

Each bad file gets one log line naming it and what is wrong, its store says `failed` with that
line as `end_reason` (a bare store when none was made yet), and the daemon goes on: a good scan
written after the bad ones in the same directory completes with every frame done.

One daemon serves the module (its worker takes seconds to start); each test works in its own
sub-directory of the watched directory. Scans are tiny (4-8 frames) to keep the file quick.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from pipeline.simulator.writers import ScanPlan, ScanWriter, write_scan
from pipeline.store import open_live, store_made_from, store_path_for
from pipeline.testing.configs import write_config
from pipeline.testing.daemons import wait_for_status, wait_until
from pipeline.testing.files import appear, nexus_file

pytestmark = pytest.mark.daemon

# -- helpers -----------------------------------------------------------------------------------


class LogLines(logging.Handler):
    """The daemon's log, kept in memory: (level, message) per record."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        with self._lock:
            self.records.append((record.levelno, message))

    def problems(self, needle: str) -> list[str]:
        """Warning and error lines that mention `needle` (a file name or path)."""
        with self._lock:
            return [m for level, m in self.records if level >= logging.WARNING and needle in m]

    def lines(self, needle: str) -> list[str]:
        with self._lock:
            return [m for _, m in self.records if needle in m]


@dataclass
class Live:
    daemon: object
    watched: Path
    vanishing: Path
    staging: Path
    log: LogLines
    config_path: Path


def attrs_of(store: Path) -> dict:
    try:
        return json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def done_frames(store: Path) -> int:
    try:
        return int(open_live(store)["frames/done"][:].sum())
    except Exception:
        return 0


def frames_read(live: Live, nexus_path: Path) -> int:
    """How far the daemon has read a scan, as `pipeline status` shows it."""
    return max([scan["frames_read"] for scan in live.daemon.status()["scans"] if scan["path"] == str(nexus_path)] or [0])


def assert_complete(store: Path, n_frames: int) -> None:
    attrs = attrs_of(store)
    assert attrs.get("status") == "complete", (store, attrs.get("status"), attrs.get("end_reason"))
    assert open_live(store)["frames/done"][:].tolist() == [1] * n_frames


def _filtered_file(path: Path, chunks: tuple[int, int, int] = (1, 195, 487), compression: int | None = None) -> Path:
    """A finished scan of 2 frames stored in chunks of `chunks`; with `compression`, a filter this installation lacks
    (its chunks written raw, as the filter would have left them)."""
    frames = np.ones((2, 195, 487), dtype=np.int32)

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.25 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:00:00"
            group = entry.create_group("pil3_100k")
            if compression is None:
                group.create_dataset("data", data=frames, chunks=chunks)
                return
            data = group.create_dataset("data", shape=frames.shape, dtype=frames.dtype, chunks=chunks,
                                        compression=compression, allow_unknown_filter=True)
            for index in range(len(frames)):
                data.id.write_direct_chunk((index, 0, 0), frames[index].tobytes())

    return appear(path, write)


def _linked_to_itself(path: Path) -> Path:
    """A scan whose frames are an external link to the same path in the same file (audit R7: it was called missing)."""

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:00:00"
            entry.create_group("pil3_100k")["data"] = h5py.ExternalLink(path.name, "/entry1/pil3_100k/data")

    return appear(path, write)


def _self_virtual(path: Path) -> Path:
    """A scan whose frames are a virtual dataset over itself: reading it crashed the reader process."""

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w", libver="latest") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:00:00"
            layout = h5py.VirtualLayout(shape=(3, 195, 487), dtype="int32")
            layout[:] = h5py.VirtualSource(".", "/entry1/pil3_100k/data", shape=(3, 195, 487))
            entry.create_group("pil3_100k").create_virtual_dataset("data", layout, fillvalue=0)

    return appear(path, write)


def start_scan(directory: Path, name: str, seed: int, n_frames: int = 4, layout: str = "nexus", **options) -> tuple[ScanPlan, ScanWriter]:
    plan = ScanPlan(directory=directory, name=name, layout=layout, n_frames=n_frames, rate_hz=options.pop("rate_hz", 20.0), seed=seed, **options)
    return plan, ScanWriter(plan).start()


# -- the daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory, untrained_weights):
    from pipeline.config import load_config
    from pipeline.live.daemon import Daemon

    root = tmp_path_factory.mktemp("bad-scans")
    watched, vanishing, staging = root / "watched", root / "vanishing", root / "staging"
    for directory in (watched, vanishing, staging):
        directory.mkdir()
    config_path = write_config(root / "config.yaml", untrained_weights, watch={"dirs": [str(watched), str(vanishing)]},
                               follow={"idle_timeout_s": 3.0, "link_timeout_s": 2.0, "open_timeout_s": 20.0},
                               # more scans at once: with 4, the scheduler (daemon.py) starts at most ~40 scans/s, and
                               # the burst test would spend a minute failing junk files
                               daemon={"max_active_scans": 16})
    log = LogLines()
    logger = logging.getLogger("pipeline")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    daemon = Daemon(load_config(config_path)).start()
    try:
        wait_until(lambda: daemon.dispatcher.stats()["workers"], 120, "a worker joined")
        yield Live(daemon, watched, vanishing, staging, log, config_path)
    finally:
        daemon.shutdown()
        logger.removeHandler(log)
        logger.setLevel(old_level)


# -- the tests ---------------------------------------------------------------------------------


def test_unreadable_files_fail_with_one_line_each_and_the_next_scan_completes(live):
    directory = live.watched / "unreadable"
    directory.mkdir()

    # not HDF5 at all: fails at once, not after open_timeout_s (20 s here)
    started = time.monotonic()
    text = appear(directory / "notes.nxs", lambda p: p.write_text("this is a logbook entry, not a scan\n"))
    wait_for_status([text.with_suffix(".zarr")], timeout=15, wanted=("failed",))
    assert time.monotonic() - started < 5.0

    # real scans broken after the fact: cut to half its size; 4 KiB overwritten in the middle of its metadata
    truncated_plan = ScanPlan(directory=live.staging, name="truncated", layout="nexus", n_frames=4, seed=1)
    corrupt_plan = ScanPlan(directory=live.staging, name="corrupt", layout="gda8", n_frames=4, seed=2)
    write_scan(truncated_plan)
    write_scan(corrupt_plan)

    def cut(target: Path) -> None:
        shutil.copy(truncated_plan.nxs_path, target)
        os.truncate(target, target.stat().st_size // 2)

    def scribble(target: Path) -> None:
        shutil.copy(corrupt_plan.nxs_path, target)
        size = target.stat().st_size
        with open(target, "r+b") as handle:
            handle.seek(size // 2 - 2048)
            handle.write(bytes(range(256)) * 16)

    shutil.copytree(corrupt_plan.detector_path.parent, directory / corrupt_plan.detector_path.parent.name)
    frames = np.ones((2, 195, 487), dtype=np.int32)
    bad = {  # file -> words its one line and its end_reason must hold
        appear(directory / "truncated.nxs", cut): ["truncated HDF5 file", "bytes on disk"],
        appear(directory / "corrupt.nxs", scribble): ["unreadable"],
        nexus_file(directory / "strings.nxs", np.full((2, 195, 487), b"x", dtype="S1")): ["dtype |S1", "not a number type"],
        nexus_file(directory / "compound.nxs", shape=(2, 195, 487), dtype=np.dtype([("counts", "<i4"), ("gain", "<f4")])):
            ["dtype [('counts'", "not a number type"],
        nexus_file(directory / "two_d.nxs", np.ones((195, 487), dtype=np.int32)): ["rank 2", "expected 3"],
        nexus_file(directory / "huge_frames.nxs", shape=(2, 4096, 4096), dtype=np.int32):
            ["4096 x 4096 pixels", "more than follow.max_frame_pixels (8,388,608)"],
        # a line detector's frames: few pixels, but a side longer than a worker takes (wire.MAX_SIDE). Ten of them, more
        # than workers.credit: the worker dropped each one unanswered, and every other scan stalled behind them
        nexus_file(directory / "line_frames.nxs", np.ones((10, 1, 10000), dtype=np.int32)):
            ["1 x 10000 pixels", "a side longer than 8192"],
        _filtered_file(directory / "tiny_tiles.nxs", chunks=(1, 4, 4)): ["5,978 chunks each (chunks of 1 x 4 x 4)",
                                                                          "more than follow.max_chunks_per_frame (4,096)"],
        _filtered_file(directory / "lzo.nxs", compression=305): [  # LZO: in no package this project installs
            "frame 0 unreadable", "compressed with HDF5 filter 305, which is not installed here"],
        _self_virtual(directory / "self_virtual.nxs"): ["a virtual dataset over /entry1/pil3_100k/data, a virtual dataset "
                                                        "of the same file"],
        _linked_to_itself(directory / "link_self.nxs"): ["entry1/pil3_100k/data: an external link to itself", "refused"],
        nexus_file(directory / "lost_link.nxs", link="lost_link-pilatus3_100k-files/lost_link.hdf"):
            ["target file did not appear within 2 s", str(directory / "lost_link-pilatus3_100k-files" / "lost_link.hdf")],
    }
    # a NeXus file with no detector frames (a scan of counters only): skipped with one line, no store beside it
    not_a_scan = nexus_file(directory / "no_detector.nxs", frames, detector="pil1_ccd")
    good_plan, good_writer = start_scan(directory, "good", seed=3)
    good_writer.join(timeout=60)
    other_shape = nexus_file(directory / "small_frames.nxs", np.ones((3, 100, 100), dtype=np.int32))  # any detector's frames
    stores = [path.with_suffix(".zarr") for path in bad] + [good_plan.nxs_path.with_suffix(".zarr"), other_shape.with_suffix(".zarr")]
    wait_for_status(stores, timeout=60)
    assert open_live(other_shape.with_suffix(".zarr"))["frames/done"][:].tolist() == [1, 1, 1]

    for path, words in {text: ["not an HDF5 file", "starts with b'this is "], **bad}.items():
        attrs = attrs_of(path.with_suffix(".zarr"))
        assert attrs.get("status") == "failed", (path.name, attrs)
        reason = attrs["end_reason"]
        assert str(path) in reason or str(directory) in reason, reason
        for word in words:
            assert word in reason, (path.name, reason)
        lines = live.log.problems(path.name)
        assert lines == [reason], (path.name, lines)  # one line, and it is the reason
    assert_complete(good_plan.nxs_path.with_suffix(".zarr"), 4)
    def skipped_lines() -> list[str]:
        return [line for line in live.log.lines("no_detector.nxs") if "not a detector scan" in line]

    wait_until(skipped_lines, 30, "no_detector.nxs skipped")
    skipped = skipped_lines()
    assert len(skipped) == 1 and "no detector dataset" in skipped[0] and "no store made" in skipped[0], skipped
    assert live.log.problems("no_detector.nxs") == []  # not a problem: nothing to segment
    assert not not_a_scan.with_suffix(".zarr").exists()
    scan = next(s for s in live.daemon.status()["scans"] if s["scan"] == "no_detector.nxs")
    assert scan["status"] == "skipped" and "not a detector scan" in scan["reason"]
    time.sleep(3 * 1.0)  # a few rescans offer it again: it is not opened again
    assert len(live.log.lines("no_detector.nxs: following")) == 1


def _gda9_scan(directory: Path, name: str, finished: np.ndarray) -> Path:
    """A finished GDA 9 scan of 3 good frames whose scan_finished is `finished`."""
    detector = directory / f"{name}-pilatus3_100k-files" / f"{name}.hdf"
    detector.parent.mkdir()
    with h5py.File(detector, "w") as handle:
        handle.create_dataset("entry/instrument/detector/data", data=np.ones((3, 195, 487), np.int32), chunks=(1, 195, 487))

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry")
            entry.create_group("instrument/pil3_100k")["data"] = h5py.ExternalLink(
                str(detector.relative_to(directory)), "/entry/instrument/detector/data")
            scan = entry.create_group("diamond_scan")
            scan["keys/uniqueKeys"] = np.arange(1, 4, dtype=np.int32)
            scan["scan_finished"] = finished
            scan["scan_shape"] = np.array([3], np.int32)
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1"
            entry["start_time"] = f"2026-12-05T00:00:{time.time_ns() % 60:02d}"

    return appear(directory / f"{name}.nxs", write)


def test_a_malformed_gda9_end_marker_is_said_once_and_the_good_frames_are_processed(live):
    """Audit R4: an empty, text or NaN scan_finished failed the scan before its first frame was read, with a message
    naming no field (`IndexError: index 0 is out of bounds`, `invalid literal for int()`)."""
    directory = live.watched / "end_markers"
    directory.mkdir()
    malformed = {
        _gda9_scan(directory, "fin_empty", np.zeros(0, np.int32)): "is (0,) int32, not one number",
        _gda9_scan(directory, "fin_text", np.array([b"true"])): "is [b'true'], not one number",
        _gda9_scan(directory, "fin_nan", np.array([np.nan])): "is [nan], not one number",
    }
    half = _gda9_scan(directory, "fin_half", np.array([0.5]))  # a number, not zero: finished
    wait_for_status([path.with_suffix(".zarr") for path in [*malformed, half]], timeout=60)
    for path, words in malformed.items():
        attrs = attrs_of(path.with_suffix(".zarr"))
        assert (attrs.get("status"), attrs.get("end_reason")) == ("incomplete", "idle_timeout"), (path.name, attrs)
        assert done_frames(path.with_suffix(".zarr")) == 3
        lines = [line for line in live.log.problems(path.name) if "scan_finished" in line]
        assert lines == [f"{path}: entry/diamond_scan/scan_finished {words}; the scan's end is judged without it"], lines
    assert_complete(half.with_suffix(".zarr"), 3)


def test_oversized_text_and_axis_metadata_are_cut_or_passed_over_and_the_frames_processed(live):
    """Audit F2, F3: a 20 MB scan_command (or start_time) failed a good scan as "its reader sent a broken message"; an
    NXdata axis declaring 400 M values (a 1 MB file) took the reader to 2 GB until its deadline killed it as "damaged"."""
    directory = live.watched / "metadata"
    directory.mkdir()
    frames = np.ones((3, 195, 487), dtype=np.int32)

    def long_text(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1 " + "x" * 5_000_000
            entry["end_time"] = "2024-01-01T00:00:00"
            entry.create_group("pil3_100k").create_dataset("data", data=frames, chunks=(1, 195, 487))

    def huge_axis(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.5 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:00:00"
            entry.create_group("pil3_100k").create_dataset("data", data=frames, chunks=(1, 195, 487))
            plot = entry.create_group("plot")
            plot.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": ["eta", ".", "."]})
            plot.create_dataset("eta", shape=(400_000_000,), dtype="f4", chunks=(1 << 20,))  # never written
            plot["data"] = h5py.SoftLink("/entry1/pil3_100k/data")
            entry.attrs["default"] = "plot"

    texts = appear(directory / "long_command.nxs", long_text)
    axis = appear(directory / "huge_axis.nxs", huge_axis)
    wait_for_status([texts.with_suffix(".zarr"), axis.with_suffix(".zarr")], timeout=60)
    assert_complete(texts.with_suffix(".zarr"), 3)
    assert_complete(axis.with_suffix(".zarr"), 3)
    said = [line for line in live.log.problems("long_command.nxs") if "scan_command" in line]
    assert said == [f"{texts}:/entry1/scan_command holds 5,000,034 characters of text; only the first 4,096 are kept"], said
    assert not any("reader" in line for line in live.log.problems("huge_axis.nxs")), live.log.problems("huge_axis.nxs")


def test_nan_and_all_zero_frames_are_processed_counted_and_an_abandoned_scan_ends_incomplete(live):
    directory = live.watched / "odd-frames"
    directory.mkdir()
    abandoned, abandoned_writer = start_scan(directory, "abandoned", seed=4, n_frames=6, layout="gda9", abandon_after=3)

    frames = np.stack([np.random.default_rng(i).poisson(5.0, (195, 487)) for i in range(8)]).astype(np.float32)
    frames[1, 10:20, 30:40] = np.nan  # a few NaN pixels
    frames[5] = np.nan  # a whole frame of NaN
    frames[3] = 0.0  # nothing recorded
    odd = nexus_file(directory / "odd.nxs", frames)
    zeros = nexus_file(directory / "zeros.nxs", np.zeros((4, 195, 487), dtype=np.int32))
    huge = np.ones((3, 195, 487))  # float64; frame 1 beyond float32 (audit F1: it reached the models as inf, unflagged)
    huge[1, :5] = 1e308
    beyond = nexus_file(directory / "beyond_float32.nxs", huge)
    abandoned_writer.join(timeout=60)
    stores = [odd.with_suffix(".zarr"), zeros.with_suffix(".zarr"), abandoned.nxs_path.with_suffix(".zarr"),
              beyond.with_suffix(".zarr")]
    wait_for_status(stores, timeout=60)

    assert_complete(odd.with_suffix(".zarr"), 8)  # a few bad frames do not fail the scan
    assert attrs_of(odd.with_suffix(".zarr"))["bad_frames"] == {"all_zero": [3], "nan": [1, 5]}
    warnings = live.log.problems("odd.nxs")
    assert len(warnings) == 1 and "3 frame(s)" not in warnings[0], warnings  # one summary line per scan
    assert "2 frame(s) with NaN pixels (1, 5)" in warnings[0] and "1 frame(s) all zero (3)" in warnings[0], warnings
    assert_complete(zeros.with_suffix(".zarr"), 4)
    assert attrs_of(zeros.with_suffix(".zarr"))["bad_frames"] == {"all_zero": [0, 1, 2, 3]}
    assert len(live.log.problems("zeros.nxs")) == 1
    assert_complete(beyond.with_suffix(".zarr"), 3)
    assert attrs_of(beyond.with_suffix(".zarr"))["bad_frames"] == {"inf": [1]}
    assert [line for line in live.log.problems("beyond_float32.nxs") if "1 frame(s) with infinite pixels (1)" in line]

    group = open_live(abandoned.nxs_path.with_suffix(".zarr"))
    assert (group.attrs["status"], group.attrs["end_reason"]) == ("incomplete", "idle_timeout")
    assert group.attrs["frames_expected"] == 6
    assert group["frames/done"][:].tolist() == [1, 1, 1]


def test_names_that_cannot_be_shown_or_stored_are_refused_in_one_escaped_line_and_temporary_files_are_left_alone(live):
    """Audit F8, R5, R7: a newline in a scan file's name wrote forged lines into the log (and cut the store's reason at
    it); a terminal escape in one cleared the screen of whoever tailed the log; a name that is not UTF-8 failed with a
    26-line traceback (tensorstore cannot take it); a detector group whose name is not UTF-8 failed with `internal error
    SystemError: FastRLock`; and a writer's temporary `.NAME.nxs`, renamed away, was an ERROR each time."""
    directory = live.watched / "names"
    directory.mkdir()
    good = nexus_file(live.staging / "good_named.nxs", np.ones((2, 195, 487), dtype=np.int32))
    forged = "evil\nERROR   MainProcess pipeline.live.session: other.nxs is FORGED.nxs"
    names = {forged: "evil\\nERROR", "esc\x1b[2J\x1b[31mred.nxs": "esc\\x1b[2J"}
    for name in names:
        os.link(good, directory / name)
    latin = os.path.join(os.fsencode(directory), b"name_\xff\xfe_latin.nxs")
    os.link(good, latin)

    def group_not_utf8(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.25 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:00:00"
            detector = entry.create_group("instrument").create_group(b"det\xff\xfe")
            detector.attrs["NX_class"] = "NXdetector"
            detector.create_dataset("data", data=np.ones((2, 195, 487), np.int32), chunks=(1, 195, 487))

    odd_group = appear(directory / "odd_group.nxs", group_not_utf8)

    def write_then_rename(final: Path) -> Path:  # as atomic writers do: a hidden name first
        hidden = final.with_name(f".{final.name}")
        with h5py.File(hidden, "w") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 10.25 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:00:00"
            entry.create_group("pil3_100k").create_dataset("data", data=np.ones((2, 195, 487), np.int32), chunks=(1, 195, 487))
        time.sleep(3.0)  # rescans (1 s) see the hidden file
        os.rename(hidden, final)
        return final

    renamed = write_then_rename(directory / "renamed.nxs")
    wait_for_status([odd_group.with_suffix(".zarr"), renamed.with_suffix(".zarr")], timeout=60)
    assert_complete(renamed.with_suffix(".zarr"), 2)
    assert live.log.problems(".renamed.nxs") == []  # a hidden file is a writer's, not a scan
    reason = attrs_of(odd_group.with_suffix(".zarr"))["end_reason"]
    assert reason == f"{odd_group}: entry1/instrument holds a name that is not UTF-8 (b'det\\xff\\xfe'); refused", reason
    assert live.log.problems("odd_group.nxs") == [reason]
    wait_until(lambda: len([m for m in live.log.problems("names/") if "cannot be used" in m]) >= 3, 30, "the names refused")
    shown = {name: [m for m in live.log.problems("names/") if escaped in m] for name, escaped in names.items()}
    for lines in shown.values():
        assert len(lines) == 1 and "control characters" in lines[0] and "rename it" in lines[0], lines
        assert "\n" not in lines[0] and "\x1b" not in lines[0], lines
    latin_lines = [m for m in live.log.problems("names/") if "name_\\udcff\\udcfe_latin.nxs" in m]
    assert len(latin_lines) == 1 and "not UTF-8" in latin_lines[0], latin_lines
    assert sorted(p.name for p in directory.iterdir() if p.name.endswith(".zarr")) == ["odd_group.zarr", "renamed.zarr"]
    assert not any("Traceback" in m or "internal error" in m for m in live.log.problems("names/"))


def test_files_deleted_or_replaced_while_being_read(live):
    directory = live.watched / "vanishing"
    directory.mkdir()
    deleted, deleted_writer = start_scan(directory, "deleted", seed=5, n_frames=8, rate_hz=1.0)
    replaced, replaced_writer = start_scan(directory, "replaced", seed=6, n_frames=8, rate_hz=1.0)
    deleted_store, replaced_store = deleted.nxs_path.with_suffix(".zarr"), replaced.nxs_path.with_suffix(".zarr")
    wait_until(lambda: frames_read(live, deleted.nxs_path) >= 2 and frames_read(live, replaced.nxs_path) >= 2, 60,
               "two frames of each read")

    deleted.nxs_path.unlink()  # the writer goes on writing into the deleted file
    replaced_writer.kill()
    replaced.nxs_path.unlink()
    new, new_writer = start_scan(directory, "replaced", seed=7, n_frames=5)  # same name, new content
    wait_for_status([deleted_store], timeout=30, wanted=("incomplete", "failed"))
    deleted_writer.kill()
    new_writer.join(timeout=60)
    wait_until(lambda: attrs_of(replaced_store).get("status") == "complete", 60, "the new file's store complete")

    reason = attrs_of(deleted_store)["end_reason"]
    assert str(deleted.nxs_path) in reason and "deleted while being read" in reason, reason
    assert live.log.problems(f"{deleted.nxs_path}: scan file deleted while being read")
    assert attrs_of(deleted_store)["status"] == "incomplete" and 2 <= attrs_of(deleted_store)["frames_total"] < 8
    assert_complete(replaced_store, 5)  # a fresh store: the new file's 5 frames, nothing of the old 8
    with h5py.File(new.nxs_path, "r", locking=False) as handle:
        assert attrs_of(replaced_store)["source_start_time"] == handle["entry1/start_time"][()].decode()
    assert store_made_from(replaced_store, new.nxs_path)
    assert any("replaced" in line or "deleted" in line for line in live.log.problems(str(replaced.nxs_path)))
    assert live.daemon.dispatcher.stats()["workers"]  # nothing crashed


def test_a_finished_scan_replaced_by_a_new_file_of_the_same_name_is_processed_into_a_fresh_store(live):
    directory = live.watched / "rewritten"
    directory.mkdir()
    first, writer = start_scan(directory, "again", seed=8, n_frames=4)
    writer.join(timeout=60)
    store = first.nxs_path.with_suffix(".zarr")
    wait_for_status([store], timeout=60)
    assert_complete(store, 4)
    first.nxs_path.unlink()
    second, writer = start_scan(directory, "again", seed=9, n_frames=6)
    writer.join(timeout=60)
    wait_until(lambda: attrs_of(store).get("frames_total") == 6, 60, "the new file processed")  # seconds under load
    assert_complete(store, 6)
    asides = sorted(directory.glob("again.zarr.replaced-*"))  # the first scan's results kept (audit F4), not deleted
    assert len(asides) == 1, asides
    kept = open_live(asides[0])
    assert kept.attrs["status"] == "complete" and kept["frames/done"][:].tolist() == [1] * 4


def test_same_scan_name_in_two_directories_and_a_link_out_of_the_watched_directories(live, tmp_path):
    plans = []
    for sub, seed in (("sample-a", 10), ("sample-b", 11)):
        (live.watched / sub).mkdir()
        plans.append(start_scan(live.watched / sub, "same-name", seed=seed))
    outside = tmp_path / "elsewhere"
    outside_plan = ScanPlan(directory=outside, name="private", layout="nexus", n_frames=4, seed=12)
    write_scan(outside_plan)
    links = live.watched / "links"
    links.mkdir()
    (links / "escape.nxs").symlink_to(outside_plan.nxs_path)
    for _, writer in plans:
        writer.join(timeout=60)
    stores = [plan.nxs_path.with_suffix(".zarr") for plan, _ in plans]
    wait_for_status(stores, timeout=60)
    time.sleep(2.5)  # two more rescans: the link must still be refused once only

    for plan, _ in plans:
        store = plan.nxs_path.with_suffix(".zarr")
        assert_complete(store, 4)
        assert attrs_of(store)["source_nexus"] == str(plan.nxs_path)
    lines = live.log.problems("escape.nxs")
    assert len(lines) == 1 and str(outside_plan.nxs_path) in lines[0] and "not followed" in lines[0], lines
    assert not (links / "escape.zarr").exists() and not outside_plan.nxs_path.with_suffix(".zarr").exists()


def test_a_scan_with_several_names_in_the_watched_directories_is_processed_once(live):
    """Audit F11: a scan reached through a symbolic link (a beamline's `latest.nxs`) or a hard link was processed once
    per name, in full: three stores, three times the workers' load."""
    directory = live.watched / "aliases"
    (directory / "sub").mkdir(parents=True)
    scan = nexus_file(directory / "a.nxs", np.ones((3, 195, 487), dtype=np.int32))
    (directory / "sub" / "latest.nxs").symlink_to(Path("..") / "a.nxs")
    os.link(scan, directory / "hard.nxs")
    wait_for_status([scan.with_suffix(".zarr")], timeout=60)
    time.sleep(2.5)  # two more rescans: the other names stay unfollowed, and are said once
    assert_complete(scan.with_suffix(".zarr"), 3)
    assert sorted(p.name for p in directory.rglob("*.zarr")) == ["a.zarr"]
    assert live.log.lines(f"{directory / 'sub' / 'latest.nxs'}: the same file as {scan}; followed once") != []
    assert len(live.log.lines(f"{directory / 'hard.nxs'}: the same file as {scan}")) == 1
    assert live.log.lines("latest.nxs: following") == [] and live.log.lines("hard.nxs: following") == []


def test_a_burst_of_two_thousand_junk_files_with_one_good_scan(live):
    from pipeline.live.control import query_status

    directory = live.watched / "burst"
    directory.mkdir()
    endpoint = live.daemon.config.daemon.control
    rss_before = psutil.Process().memory_info().rss
    junk = []
    started = time.monotonic()
    for index in range(2000):
        path = directory / f"junk-{index:04d}.nxs"
        path.write_text(f"junk {index}\n")
        junk.append(path)
        if index == 1000:
            good, good_writer = start_scan(directory, "good-in-burst", seed=13)
    answered = time.monotonic()
    status = query_status(endpoint, timeout_s=5.0)  # the daemon still answers while it works through the burst
    assert status is not None and time.monotonic() - answered < 5.0
    good_writer.join(timeout=60)
    good_store = good.nxs_path.with_suffix(".zarr")
    wait_for_status([good_store], timeout=120)
    wait_for_status([path.with_suffix(".zarr") for path in junk], timeout=120, wanted=("failed",))
    elapsed = time.monotonic() - started

    assert_complete(good_store, 4)
    for path in junk[::97]:
        assert "not an HDF5 file" in attrs_of(path.with_suffix(".zarr"))["end_reason"]
    problems = live.log.problems("/burst/junk-")
    assert len(problems) == 2000 and len(set(problems)) == 2000, len(problems)  # each failed once, one line each
    time.sleep(1.5)  # a rescan later, nothing is failed twice
    assert len(live.log.problems("/burst/junk-")) == 2000
    assert not [s for s in live.daemon.sessions.values() if not s.finished.is_set()]
    growth_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert growth_mb < 200, growth_mb
    print(f"2000 junk files and one good scan in {elapsed:.1f} s, RSS +{growth_mb:.0f} MiB")


def test_the_watched_directory_vanishes_and_comes_back(live):
    root = live.vanishing
    first, writer = start_scan(root, "before", seed=14)
    writer.join(timeout=60)
    wait_for_status([first.nxs_path.with_suffix(".zarr")], timeout=60)
    assert live.daemon.wait_idle(30)  # the store is finished (consolidated, quick look) before its directory moves
    root.rename(root.with_name("vanishing-old"))
    wait_until(lambda: live.log.lines(f"{root}: watched directory does not exist"), 10, "the watcher saw it go")
    root.mkdir()
    wait_until(lambda: live.log.lines(f"{root}: watched directory is back"), 10, "the watcher saw it return")
    second, writer = start_scan(root, "after", seed=15)
    writer.join(timeout=60)
    store = second.nxs_path.with_suffix(".zarr")
    wait_for_status([store], timeout=60)
    assert_complete(store, 4)


def test_output_root_keeps_same_named_scans_apart_and_an_unwritable_output_fails_the_scan(tmp_path, untrained_weights):
    from pipeline.config import load_config
    from pipeline.live.daemon import Daemon

    watched, output = tmp_path / "watched", tmp_path / "output"
    for sub in ("a", "b", "blocked"):
        (watched / sub).mkdir(parents=True)
    output.mkdir()
    (output / "blocked").write_text("a file where the store's directory should go\n")  # even root cannot mkdir through it
    config = load_config(write_config(tmp_path / "config.yaml", untrained_weights, watch={"dirs": [str(watched)]},
                                      output={"root": str(output)}))
    log = LogLines()
    logger = logging.getLogger("pipeline")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    daemon = Daemon(config).start()
    try:
        wait_until(lambda: daemon.dispatcher.stats()["workers"], 120, "a worker joined")
        blocked, writer = start_scan(watched / "blocked", "blocked", seed=20)
        writer.join(timeout=60)
        wait_until(lambda: log.problems("blocked.nxs"), 30, "the unwritable output logged")
        plans = [start_scan(watched / sub, "same", seed=21 + i) for i, sub in enumerate(("a", "b"))]
        for _, writer in plans:
            writer.join(timeout=60)
        stores = [output / sub / "same.zarr" for sub in ("a", "b")]
        wait_for_status(stores, timeout=60)
    finally:
        daemon.shutdown()
        logger.removeHandler(log)
        logger.setLevel(old_level)
    assert [store_path_for(plan.nxs_path, output, [watched]) for plan, _ in plans] == stores
    for (plan, _), store in zip(plans, stores):
        assert_complete(store, 4)
        assert attrs_of(store)["source_nexus"] == str(plan.nxs_path)
    lines = log.problems("blocked.nxs")
    assert len(lines) == 1, lines
    assert str(blocked.nxs_path) in lines[0] and f"{output / 'blocked'} is a file, not a directory" in lines[0], lines
    assert (output / "blocked").is_file() and not (watched / "blocked" / "blocked.zarr").exists()


def test_store_path_for_is_predictable(tmp_path):
    out = Path("/out")
    assert store_path_for(Path("/data/cm1/1234.nxs"), None) == Path("/data/cm1/1234.zarr")
    assert store_path_for(Path("/data/cm1/1234.nxs"), out) == out / "1234.zarr"
    assert store_path_for(Path("/data/cm1/1234.nxs"), out, [Path("/data/cm1")]) == out / "1234.zarr"
    assert store_path_for(Path("/data/cm1/s2/1234.nxs"), out, [Path("/data/cm1")]) == out / "s2" / "1234.zarr"
    assert store_path_for(Path("/data/cm2/1234.nxs"), out, [Path("/data/cm1"), Path("/data/cm2")]) == out / "cm2" / "1234.zarr"
    assert store_path_for(Path("/elsewhere/1234.nxs"), out, [Path("/data/cm1")]) == out / "1234.zarr"
