"""Notice new scan files: filesystem events when they work, a periodic rescan because they do not always.

inotify misses writes from other hosts on network mounts and drops events when its queue
overflows, and an observer thread can die; so the watcher also walks the directories every
`rescan_interval_s` (and polls only, in `polling` mode) and restarts a dead observer. Each scan
file is reported once. Symbolic links that lead outside the watched roots are not followed.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pipeline.config import WatchSettings

log = logging.getLogger(__name__)


def is_inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == root or root in resolved.parents for root in roots)


def _skipped(name: str) -> bool:
    """Our own stores and detector-file folders hold no scans, only thousands of subfolders."""
    return name.endswith(".zarr") or name.endswith("-files")


def walk_scan_dirs(roots: list[Path], recursive: bool) -> Iterator[tuple[Path, list[str]]]:
    """(directory, file names) for every directory that may hold scans, never through links."""
    for root in roots:
        if not root.is_dir():
            continue
        for directory, subdirs, files in os.walk(root, followlinks=False):
            subdirs[:] = sorted(d for d in subdirs if not _skipped(d)) if recursive else []
            yield Path(directory), sorted(files)


def find_scans(roots: list[Path], patterns: list[str], recursive: bool) -> Iterator[Path]:
    """Every file under `roots` whose name matches a pattern, without leaving the roots through links."""
    resolved_roots = [root.resolve() for root in roots]
    for directory, files in walk_scan_dirs(roots, recursive):
        for name in files:
            if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                path = directory / name
                if is_inside(path, resolved_roots):
                    yield path


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher") -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "moved", "modified", "closed"):
            return
        path = getattr(event, "dest_path", "") or event.src_path
        self.watcher.offer(Path(os.fsdecode(path)))


class Watcher:
    """Calls `on_scan(path)` once per new matching file, from its own threads."""

    def __init__(self, settings: WatchSettings, on_scan: Callable[[Path], None]) -> None:
        self.settings = settings
        self.on_scan = on_scan
        self.roots = [Path(d) for d in settings.dirs]
        self._resolved_roots = [r.resolve() for r in self.roots]
        self._seen: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Observer | None = None
        self._watched: set[Path] = set()
        self._thread = threading.Thread(target=self._rescan_loop, name="watch-rescan", daemon=True)

    def offer(self, path: Path) -> None:
        if not any(fnmatch.fnmatch(path.name, p) for p in self.settings.patterns):
            return
        if not is_inside(path, self._resolved_roots):
            log.warning("%s: leads outside the watched directories; not followed", path)
            return
        key = path.absolute()
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        self.on_scan(key)

    def mark_seen(self, path: Path) -> None:
        with self._lock:
            self._seen.add(path.absolute())

    def forget(self, path: Path) -> None:
        """Let a path be reported again (a scan file replaced by a new one of the same name)."""
        with self._lock:
            self._seen.discard(path.absolute())

    def rescan(self) -> None:
        for directory, files in walk_scan_dirs(self.roots, self.settings.recursive):
            self._watch_directory(directory)
            for name in files:
                self.offer(directory / name)

    def _watch_directory(self, directory: Path) -> None:
        """One non-recursive watch per scan directory: a recursive one would also watch every store's chunk folders."""
        if self._observer is None or directory in self._watched:
            return
        try:
            self._observer.schedule(_Handler(self), str(directory), recursive=False)
            self._watched.add(directory)
        except OSError as error:  # e.g. out of inotify watches: the rescan still finds its scans
            log.warning("%s: cannot watch for events (%s); found by rescans only", directory, error)

    def _start_observer(self) -> None:
        self._watched: set[Path] = set()
        if self.settings.mode == "polling":
            self._observer = None
            return
        observer = Observer()
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _rescan_loop(self) -> None:
        interval = self.settings.poll_interval_s if self.settings.mode == "polling" else self.settings.rescan_interval_s
        while not self._stop.wait(interval):
            if self.settings.mode != "polling" and (self._observer is None or not self._observer.is_alive()):
                log.warning("file-event observer died; restarting it")
                try:
                    self._start_observer()
                except OSError as error:  # e.g. a watched mount that has gone away: the rescan still runs
                    log.warning("cannot watch for events (%s); relying on rescans", error)
            try:
                self.rescan()
            except OSError as error:
                log.warning("rescan failed: %s", error)

    def start(self) -> "Watcher":
        for root in self.roots:
            if not root.is_dir():
                log.warning("%s: watched directory does not exist (yet); rescanning for it", root)
        try:
            self._start_observer()
        except OSError as error:
            log.warning("cannot watch for events (%s); relying on rescans", error)
        self._thread.start()
        self.rescan()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
        self._thread.join(timeout=2)
