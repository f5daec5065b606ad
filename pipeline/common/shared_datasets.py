"""One open object per HDF5 dataset in this process: every follower and reader of a detector dataset shares it.

Why: HDF5 (2.0, through h5py 3.16) corrupts its own memory when a dataset in a file with the
old chunk index (a version-0 superblock, as older detector writers make it) is refreshed while
a second object of the same dataset is open, in any handle of the process. Two scan files that
link to one detector file (a copied .nxs) did exactly that: both scans failed, then the daemon
died with a segfault. With one object per (file, dataset), a refresh by one scan's follower is
seen by the others and frees nothing they hold. Files are told apart by (device, inode), so a
hard link or a second path to the same file shares too, and a new file at an old path does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.common.nexus import Identity, file_identity, handle_identity, open_hdf5


class NoSuchDataset(LookupError):
    """Nothing of that name in the file (yet: a writer may still create it)."""


class NotADataset(LookupError):
    """The name is a group or another object that is not a dataset: final."""


@dataclass
class _Shared:
    handle: h5py.File
    dataset: h5py.Dataset
    users: int


_LOCK = threading.Lock()
_OPEN: dict[tuple[Identity | None, str], _Shared] = {}


def acquire_dataset(path: Path, name: str, check: Callable[[h5py.File], None] | None = None) -> h5py.Dataset:
    """The process's one object for dataset `name` in the file at `path`, opened (SWMR where it can, no lock)
    if nobody holds it yet; give it back with `release_dataset`. `check` sees the open file before `name` is looked up
    (and so before HDF5 follows any link on the way to it): it raises to refuse the file."""
    with _LOCK:
        identity = file_identity(path)  # the same file by (device, inode), whatever path opened it
        shared = None if identity is None else _OPEN.get((identity, name))
        if shared is not None and shared.handle.id.valid:
            if check is not None:
                check(shared.handle)  # another holder's check may have allowed other roots
            shared.users += 1
            return shared.dataset
        handle = open_hdf5(path)
        try:
            if check is not None:
                check(handle)
            node = handle.get(name)
            if node is None:
                raise NoSuchDataset(f"no dataset {name}")
            if not isinstance(node, h5py.Dataset):
                raise NotADataset(f"{name}: a {type(node).__name__}, not a dataset")
        except BaseException:
            handle.close()
            raise
        _OPEN[(handle_identity(handle), name)] = _Shared(handle, node, 1)
        return node


def release_dataset(dataset: h5py.Dataset) -> None:
    """One user fewer; the last one closes the file. A dataset not from `acquire_dataset` is left alone."""
    with _LOCK:
        for key, shared in list(_OPEN.items()):
            if shared.dataset is dataset:
                shared.users -= 1
                if shared.users <= 0:
                    del _OPEN[key]
                    try:
                        if shared.handle.id.valid:
                            shared.handle.close()
                    except Exception:  # closing a file that vanished must not hide the caller's own error
                        pass
                return


def datasets_open() -> int:
    """How many datasets are held open here (for tests and status)."""
    with _LOCK:
        return len(_OPEN)
