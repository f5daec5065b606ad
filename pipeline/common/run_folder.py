"""One private temporary folder per daemon: its workers' socket, their config, the CurveZMQ keys it allows.

A daemon stopped normally removes its folder. One killed (kill -9, the OOM killer, a power cut of its
node) cannot, so the next daemon to start removes the folders that no live process holds. "Holds" is a
lock (flock) on a file in the folder, taken at its creation and let go by the kernel when the process
ends however it ends: unlike a pid, it cannot be mistaken for another process that got the same pid,
nor for a daemon in another pid namespace (a container) sharing the same /tmp.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "pipeline-run-"
LOCK_NAME = "held-by-a-live-daemon.lock"


class RunFolder:
    """A folder only this user can open (0700), held for the life of this object's process."""

    def __init__(self) -> None:
        while True:
            self.path = Path(tempfile.mkdtemp(prefix=PREFIX))  # mkdtemp makes it 0700
            self._lock = open(self.path / LOCK_NAME, "w")
            fcntl.flock(self._lock, fcntl.LOCK_EX)  # waits out another daemon's `remove_abandoned` looking at it
            if (self.path / LOCK_NAME).exists():
                return
            self._lock.close()  # that look came between our open and our lock, and removed the folder: make another

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def remove_abandoned(directory: Path | None = None) -> list[Path]:
    """Remove this user's run folders in `directory` (the temporary directory) that no live process holds."""
    removed = []
    for folder in Path(directory or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            lock = open(folder / LOCK_NAME)  # no lock file: a folder being made this instant, or not ours to judge
        except OSError:
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: its daemon is alive
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
