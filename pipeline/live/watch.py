"""Notice new scan files: filesystem events when they work, a periodic rescan because they do not always.

inotify misses writes from other hosts on network mounts and drops events when its queue
overflows, and an observer thread can die; so the watcher also walks the directories every
`rescan_interval_s` (and polls only, in `polling` mode) and restarts a dead observer.

Each scan file is reported once, as long as it stays the same file: a file that is deleted, or
replaced by a new file of the same name (a new inode), is reported again when it (re)appears.
A directory that vanishes and comes back (renamed away and recreated, a remounted share) is
noticed by the rescan, which also drops the stale event watch and arms a new one on the new
directory. Symbolic links that lead outside the watched roots are not followed (one log line each).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from pipeline.config import WatchSettings

log = logging.getLogger(__name__)

# the events a watch asks the kernel for: files and directories appearing, going and closing after a write, not every
# write (a detector at 1,000 Hz modifies its files thousands of times a second; the watch's thread cost the daemon
# ~0.4 ms of CPU per frame handling them). A scan whose creation was missed is found by the rescan.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent,
                                                 DirCreatedEvent, DirMovedEvent, DirDeletedEvent]

REOFFER_RESCANS = 3  # a replaced file is offered again at this many rescans, in case its old scan was still finishing

Identity = tuple[int, int]  # (device, inode)


def is_inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == root or root in resolved.parents for root in roots)


def _skipped(name: str) -> bool:
    """Our own stores and detector-file folders hold no scans, only thousands of subfolders."""
    return name.endswith(".zarr") or name.endswith("-files")


def _identity(path: Path, follow: bool = True) -> Identity | None:
    try:
        status = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return status.st_dev, status.st_ino


MISSING = "watched directory does not exist (when it is created, it is picked up)"


def directory_problem(path: Path) -> str | None:
    """Why `path` cannot be watched now, in words, or None when it is a directory this process can list.
    `MISSING` is the one problem that may pass by itself (a visit directory made after the daemon starts)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return MISSING
    except NotADirectoryError:
        blocker = next((parent for parent in reversed(path.parents) if parent.exists() and not parent.is_dir()), None)
        return f"cannot exist: {blocker} is a file, not a directory" if blocker is not None else "not a directory"
    except OSError as error:
        return f"cannot be looked at ({error.strerror})"
    if stat.S_ISREG(info.st_mode):
        return "is a regular file, not a directory"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if not os.access(path, os.R_OK | os.X_OK):
        return "cannot be listed (permission denied)"
    return None


def walk_scan_dirs(roots: list[Path], recursive: bool) -> Iterator[tuple[Path, list[str]]]:
    """(directory, file names) for every directory that may hold scans, never through links."""
    for root in roots:
        if not root.is_dir():
            continue
        for directory, subdirs, files in os.walk(root, followlinks=False):
            subdirs[:] = sorted(d for d in subdirs if not _skipped(d)) if recursive else []
            yield Path(directory), sorted(files)


def is_scan_name(name: str, patterns: list[str]) -> bool:
    """Whether a file of this name is a scan to follow: it matches a pattern, and is not hidden. A writer that renames its
    file into place writes `.NAME.nxs` first (`*.nxs` matches it: fnmatch is not the shell); that file vanishes, renamed."""
    return not name.startswith(".") and any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def find_scans(roots: list[Path], patterns: list[str], recursive: bool) -> Iterator[Path]:
    """Every file under `roots` whose name matches a pattern, without leaving the roots through links."""
    resolved_roots = [root.resolve() for root in roots]
    for directory, files in walk_scan_dirs(roots, recursive):
        for name in files:
            if is_scan_name(name, patterns):
                path = directory / name
                if is_inside(path, resolved_roots):
                    yield path


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._handle(event)
        except Exception:  # an odd event must never kill the observer thread
            log.exception("file event %s not handled", event)

    def _handle(self, event: FileSystemEvent) -> None:
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        dest = Path(os.fsdecode(event.dest_path)) if getattr(event, "dest_path", "") else None
        if event.event_type in ("deleted", "moved") and src is not None:
            self.watcher.gone(src, event.is_directory)
        if event.is_directory:
            appeared = dest or src
            if event.event_type in ("created", "moved") and appeared is not None:
                self.watcher.new_directory(appeared)
            return
        if event.event_type not in ("created", "moved", "modified", "closed"):
            return
        path = dest or src
        if path is not None:
            self.watcher.offer(path)


class Watcher:
    """Calls `on_scan(path)` once per new matching file (again if the file is replaced), from its own threads."""

    def __init__(self, settings: WatchSettings, on_scan: Callable[[Path], None]) -> None:
        self.settings = settings
        self.on_scan = on_scan
        self.roots = [Path(d) for d in settings.dirs]
        self._resolved_roots = [r.resolve() for r in self.roots]
        self._seen: dict[Path, Identity | None] = {}  # reported path -> the file's (device, inode) then
        self._reoffer: dict[Path, int] = {}  # replaced path -> rescans left at which to offer it again
        self._refused: dict[Path, Path] = {}  # link -> outside target, logged once
        self._problems: dict[Path, str] = {}  # watched root -> what is wrong with it, as of the last rescan (each logged once)
        self._unwatchable: set[Path] = set()  # directories whose watch failed, logged once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._watched: dict[Path, tuple[ObservedWatch, Identity | None]] = {}  # directory -> (watch, its (device, inode))
        self._thread = threading.Thread(target=self._rescan_loop, name="watch-rescan", daemon=True)

    # -- reporting files --------------------------------------------------------------------

    def _matches(self, path: Path) -> bool:
        return is_scan_name(path.name, self.settings.patterns)

    def offer(self, path: Path) -> None:
        """Report `path` unless it was reported before as this same file (same device and inode, not deleted since)."""
        if not self._matches(path):
            return
        key = path.absolute()
        try:
            status = os.stat(key)
        except OSError:
            return  # gone already (or a dangling link): nothing to read
        if not stat.S_ISREG(status.st_mode):
            return
        if not is_inside(key, self._resolved_roots):
            self._refuse(key)
            return
        identity = (status.st_dev, status.st_ino)
        with self._lock:
            previous = self._seen.get(key, False)
            if previous == identity:
                return
            if previous is not False:  # deleted since (None) or another inode: a new file of the same name
                log.info("%s: a new file of the same name as a scan seen before; reporting it again", key)
                self._reoffer[key] = REOFFER_RESCANS
            self._seen[key] = identity
        self.on_scan(key)

    def _refuse(self, path: Path) -> None:
        target = path.resolve()
        with self._lock:
            if self._refused.get(path) == target:
                return
            self._refused[path] = target
        log.warning("%s: a link to %s, outside the watched directories; not followed", path, target)

    def mark_seen(self, path: Path) -> None:
        with self._lock:
            self._seen[path.absolute()] = _identity(path)

    def forget(self, path: Path) -> None:
        """Let a path be reported again (a scan file replaced by a new one of the same name)."""
        with self._lock:
            self._seen.pop(path.absolute(), None)
            self._reoffer.pop(path.absolute(), None)
            self._refused.pop(path.absolute(), None)

    def gone(self, path: Path, is_directory: bool = False) -> None:
        """A file or directory was deleted or moved away: a file of that name later is a new scan."""
        key = path.absolute()
        if not is_directory:
            with self._lock:  # events come in order: a file at this path now (even on the same inode) is a new one
                if key in self._seen:
                    self._seen[key] = None
                self._refused.pop(key, None)
            return
        self._drop_watches_under(key)

    def new_directory(self, directory: Path) -> None:
        """A directory appeared (created or moved in): watch it and report what is already in it."""
        if not self.settings.recursive or _skipped(directory.name) or not directory.is_dir():
            return
        if not is_inside(directory, self._resolved_roots) or directory.is_symlink():
            return
        for found, files in walk_scan_dirs([directory], True):
            self._watch_directory(found)
            for name in files:
                self.offer(found / name)

    # -- rescanning ---------------------------------------------------------------------------

    def rescan(self) -> None:
        with self._lock:
            pending = set(self._reoffer)  # replaced before this rescan (this rescan's own finds are reported anyway)
        self.check_roots()
        self._drop_stale_watches()
        present: set[Path] = set()
        for directory, files in walk_scan_dirs(self.roots, self.settings.recursive):
            self._watch_directory(directory)
            for name in files:
                path = (directory / name).absolute()
                present.add(path)
                self.offer(path)
        with self._lock:
            for path in [p for p, identity in self._seen.items() if identity is not None and p not in present]:
                if not path.exists():
                    self._seen[path] = None  # deleted: the next file of this name is new
            due = [p for p in pending if p in present and p in self._reoffer]
            for path in pending & set(self._reoffer):
                self._reoffer[path] -= 1
                if self._reoffer[path] <= 0 or path not in present:
                    del self._reoffer[path]
        for path in due:  # the daemon drops an offer while the path's previous scan is still finishing
            self.on_scan(path)

    def problems(self) -> list[str]:
        """One line per watched directory that cannot be watched now (naming it and what is wrong), as of the last
        rescan: for `pipeline status` and the web front page, where a user looks, not only the log."""
        with self._lock:
            return [f"{root}: {problem}" for root, problem in self._problems.items()]

    def check_roots(self) -> None:
        """Note what is wrong with each watched directory (logged once per change); every rescan does it first."""
        problems: dict[Path, str] = {}
        for root in self.roots:
            problem = directory_problem(root)
            before = self._problems.get(root)
            if problem is None:
                if before is not None:
                    log.info("%s: watched directory is back; watching it", root)
                continue
            problems[root] = problem
            if problem != before:
                log.warning("%s: %s; looked for again at every rescan", root, problem)
        with self._lock:
            self._problems = problems

    def _watch_directory(self, directory: Path) -> None:
        """One non-recursive watch per scan directory: a recursive one would also watch every store's chunk folders."""
        if self._observer is None:
            return
        identity = _identity(directory)
        with self._lock:
            known = self._watched.get(directory)
        if known is not None:
            if known[1] == identity:
                return
            self._unschedule(directory)  # the directory was recreated: the old watch follows the old one
        try:
            watch = self._observer.schedule(_Handler(self), str(directory), recursive=False, event_filter=WATCHED_EVENTS)
        except OSError as error:  # e.g. out of inotify watches: the rescan still finds its scans, and tries again
            if directory not in self._unwatchable:  # once, not at every rescan
                self._unwatchable.add(directory)
                log.warning("%s: cannot watch for events (%s); found by rescans only", directory, error)
            return
        self._unwatchable.discard(directory)
        with self._lock:
            self._watched[directory] = (watch, identity)
        if known is not None:
            log.info("%s: directory was recreated; watching the new one", directory)

    def _unschedule(self, directory: Path) -> None:
        with self._lock:
            known = self._watched.pop(directory, None)
        if known is None or self._observer is None:
            return
        try:
            self._observer.unschedule(known[0])
        except Exception:  # an emitter that already stopped itself (its directory was deleted)
            pass

    def _drop_watches_under(self, directory: Path) -> None:
        with self._lock:
            stale = [d for d in self._watched if d == directory or directory in d.parents]
        for found in stale:
            if _identity(found) != self._watched.get(found, (None, None))[1]:
                self._unschedule(found)

    def _drop_stale_watches(self) -> None:
        """Watches whose directory is gone or is now another directory (renamed away, recreated)."""
        with self._lock:
            watched = list(self._watched.items())
        for directory, (_, identity) in watched:
            if _identity(directory) != identity:
                self._unschedule(directory)

    def _start_observer(self) -> None:
        with self._lock:
            self._watched = {}
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
            except Exception:  # a bug must not end the rescans, the watcher's safety net
                log.exception("rescan failed")

    def start(self) -> Watcher:
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
