"""Which stores the web view serves: every `<scan>.zarr` under its roots, each under a stable id.

A store's id is its path relative to its root without `.zarr` (`visit1/scan1`); with several roots
the root's own folder name comes first (`data/visit1/scan1`). A request names a store only by id
and the id is looked up in this index, so a name that is not in it (`../../etc`) is simply not
found: no path is ever built from what a request says. Symbolic links are never followed, neither
to stores nor to folders (what a link points at may lie outside the roots), and stores (`*.zarr`),
detector folders (`*-files`), stores moved aside (`*.zarr.unreadable-*`) and hidden folders are not
descended into. A folder whose modification time has not changed is not listed again, so looking
for new stores every second costs one `stat` per folder.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.live.confinement import is_inside

log = logging.getLogger(__name__)

STORE_SUFFIX = ".zarr"
MAX_FOLDERS = 50_000  # folders looked at per pass: a root set at / by mistake must not walk the whole machine


@dataclass(frozen=True)
class _Listing:
    mtime_ns: int
    folders: tuple[str, ...]
    stores: tuple[str, ...]


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.endswith("-files") or f"{STORE_SUFFIX}." in name


def root_labels(roots: Sequence[Path]) -> list[str]:
    """The id prefix of each root: none for a single root, else its folder name (made unique with -2, -3, ...)."""
    if len(roots) <= 1:
        return [""] * len(roots)
    labels: list[str] = []
    for root in roots:
        label, n = root.name or "root", 2
        while label in labels:
            label, n = f"{root.name or 'root'}-{n}", n + 1
        labels.append(label)
    return labels


class StoreIndex:
    """The stores under `roots`, found again by `refresh`; `lookup` is the only way from an id to a path."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(os.path.realpath(root)) for root in roots]
        self.labels = root_labels(self.roots)
        self._listings: dict[Path, _Listing] = {}
        self._stores: dict[str, Path] = {}
        self._warned_full = False

    def refresh(self) -> dict[str, Path]:
        """Walk the roots again (unchanged folders from memory); id -> store path."""
        stores: dict[str, Path] = {}
        seen: set[Path] = set()
        budget = MAX_FOLDERS
        for root, label in zip(self.roots, self.labels):
            pending = [root]
            while pending and budget > 0:
                folder = pending.pop()
                budget -= 1
                listing = self._listing(folder)
                if listing is None:
                    continue
                seen.add(folder)
                pending.extend(folder / name for name in listing.folders)
                for name in listing.stores:
                    relative = (folder / name).relative_to(root).as_posix().removesuffix(STORE_SUFFIX)
                    stores.setdefault(f"{label}/{relative}" if label else relative, folder / name)
        if budget <= 0 and not self._warned_full:
            log.warning("web view: more than %d folders under %s; the rest are not looked at", MAX_FOLDERS, ", ".join(map(str, self.roots)))
            self._warned_full = True
        self._listings = {folder: listing for folder, listing in self._listings.items() if folder in seen}
        self._stores = stores
        return dict(stores)

    def _listing(self, folder: Path) -> _Listing | None:
        try:
            info = os.lstat(folder)
        except OSError:
            return None
        if not stat.S_ISDIR(info.st_mode):  # a folder replaced by a symbolic link since the last pass
            return None
        mtime = info.st_mtime_ns
        cached = self._listings.get(folder)
        if cached is not None and cached.mtime_ns == mtime:
            return cached
        folders: list[str] = []
        stores: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                        continue
                    if entry.name.endswith(STORE_SUFFIX) and not entry.name.startswith("."):
                        stores.append(entry.name)
                    elif not _skipped(entry.name):
                        folders.append(entry.name)
        except OSError as error:  # a folder we may not read, or one removed under us: skipped, said once
            if cached is None:
                log.info("web view: cannot list %s (%s)", folder, error.strerror or error)
            return None
        listing = _Listing(mtime, tuple(sorted(folders)), tuple(sorted(stores)))
        self._listings[folder] = listing
        return listing

    def lookup(self, scan_id: str) -> Path | None:
        """The store of `scan_id` if the last walk found it and it is still a real folder inside the roots; else None."""
        path = self._stores.get(scan_id)
        if path is None or path.is_symlink() or not is_inside(path, self.roots):
            return None
        return path

    def ids(self) -> list[str]:
        return list(self._stores)
