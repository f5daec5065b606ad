"""The watcher on a real directory tree: each scan file once, again when replaced, links out refused,
and a watched directory that vanishes and comes back watched again (events, not only rescans)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import WatchSettings
from pipeline.live.watch import Watcher


class Reports:
    def __init__(self) -> None:
        self.paths: list[Path] = []
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        with self._lock:
            self.paths.append(path)

    def count(self, path: Path) -> int:
        with self._lock:
            return self.paths.count(path.absolute())

    def wait_for(self, path: Path, times: int = 1, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(path) >= times:
                return
            time.sleep(0.02)
        raise AssertionError(f"{path} reported {self.count(path)} times, expected {times}: {self.paths}")


@pytest.fixture
def watching(tmp_path):
    """A watcher on tmp_path/root with events and no periodic rescan (the tests call `rescan` themselves)."""
    root = tmp_path / "root"
    root.mkdir()
    reports = Reports()
    watcher = Watcher(WatchSettings(dirs=[root], mode="events", rescan_interval_s=3600), reports).start()
    yield root, watcher, reports
    watcher.stop()


def test_each_file_is_reported_once_however_often_it_is_seen(watching):
    root, watcher, reports = watching
    scan = root / "scan.nxs"
    scan.write_bytes(b"x")
    reports.wait_for(scan)
    with scan.open("ab") as handle:  # a growing file sends modified and closed events
        handle.write(b"more")
    (root / "notes.txt").write_text("not a scan")
    watcher.rescan()
    watcher.rescan()
    time.sleep(0.3)
    assert reports.paths == [scan]


def test_a_file_deleted_or_replaced_under_the_same_name_is_reported_again(watching):
    root, watcher, reports = watching
    scan = root / "scan.nxs"
    scan.write_bytes(b"first")
    reports.wait_for(scan)
    scan.unlink()
    scan.write_bytes(b"second")  # may even get the same inode back
    reports.wait_for(scan, times=2)
    replacement = root / "incoming.tmp"
    replacement.write_bytes(b"third")
    os.replace(replacement, scan)  # renamed over it: a new inode
    reports.wait_for(scan, times=3)
    watcher.rescan()
    time.sleep(0.3)
    # reported again at a few later rescans too (the daemon drops an offer while the old scan still finishes)
    assert 3 <= reports.count(scan) <= 4


def test_a_link_out_of_the_watched_directories_is_refused_with_one_log_line(watching, tmp_path, caplog):
    root, watcher, reports = watching
    outside = tmp_path / "outside" / "private.nxs"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    caplog.set_level(logging.WARNING, logger="pipeline.live.watch")
    (root / "escape.nxs").symlink_to(outside)
    for _ in range(3):
        watcher.rescan()
    time.sleep(0.3)
    assert reports.paths == []
    lines = [r.getMessage() for r in caplog.records if "escape.nxs" in r.getMessage()]
    assert len(lines) == 1 and str(outside) in lines[0] and "not followed" in lines[0], lines


def test_a_new_subdirectory_is_watched_at_once(watching):
    root, watcher, reports = watching
    sub = root / "sample-2" / "deeper"
    sub.mkdir(parents=True)
    time.sleep(0.3)  # the watcher arms watches on the new directories from their creation events
    scan = sub / "scan.nxs"
    scan.write_bytes(b"x")
    reports.wait_for(scan)  # no rescan ran: found by an event


def test_a_watched_directory_that_vanishes_and_comes_back_is_watched_again(watching, caplog):
    root, watcher, reports = watching
    caplog.set_level(logging.INFO, logger="pipeline.live.watch")
    before = root / "before.nxs"
    before.write_bytes(b"x")
    reports.wait_for(before)
    root.rename(root.with_name("root-away"))
    watcher.rescan()  # notices it gone and drops the watch that followed the old directory away
    assert any("does not exist" in r.getMessage() for r in caplog.records)
    root.mkdir()
    watcher.rescan()  # notices it back and arms a new watch on the new directory
    assert any("is back" in r.getMessage() for r in caplog.records)
    after = root / "after.nxs"
    after.write_bytes(b"x")
    reports.wait_for(after)  # no rescan since: found by an event from the new watch
    moved = root.with_name("root-away") / "ghost.nxs"
    moved.write_bytes(b"x")  # events from the old directory, now elsewhere, must not be mistaken for the watched one
    time.sleep(0.3)
    assert reports.count(root / "ghost.nxs") == 0


def test_polling_mode_finds_files_and_replacements_by_rescans_alone(tmp_path):
    root = tmp_path / "polled"
    root.mkdir()
    reports = Reports()
    watcher = Watcher(WatchSettings(dirs=[root], mode="polling", poll_interval_s=0.1), reports).start()
    try:
        scan = root / "scan.nxs"
        scan.write_bytes(b"x")
        reports.wait_for(scan)
        replacement = root / "scan.part"
        replacement.write_bytes(b"y")
        os.replace(replacement, scan)
        reports.wait_for(scan, times=2)
    finally:
        watcher.stop()


def test_problems_name_each_watched_path_that_cannot_be_watched_and_clear_when_fixed(tmp_path):
    """What `pipeline status` and the web front page show: re-checked at every rescan."""
    good, missing, a_file = tmp_path / "good", tmp_path / "visit-1", tmp_path / "a-file"
    good.mkdir()
    a_file.write_text("not a directory")
    through = a_file / "sub"
    reports = Reports()
    watcher = Watcher(WatchSettings(dirs=[good, missing, a_file, through], mode="polling", poll_interval_s=3600), reports).start()
    try:
        assert watcher.problems() == [
            f"{missing}: watched directory does not exist (when it is created, it is picked up)",
            f"{a_file}: is a regular file, not a directory",
            f"{through}: cannot exist: {a_file} is a file, not a directory",
        ]
        missing.mkdir()
        (missing / "scan.nxs").write_bytes(b"x")
        a_file.unlink()
        a_file.mkdir()
        watcher.rescan()
        assert watcher.problems() == [f"{through}: watched directory does not exist (when it is created, it is picked up)"]
        reports.wait_for(missing / "scan.nxs", timeout=1)  # the created visit directory is watched
        (missing / "scan.nxs").unlink()
        missing.rmdir()
        watcher.rescan()
        assert watcher.problems()[0] == f"{missing}: watched directory does not exist (when it is created, it is picked up)"
    finally:
        watcher.stop()
