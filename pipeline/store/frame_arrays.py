"""The chunk writes of a store's per-frame arrays, made through tensorstore rather than zarr-python.

Why: at detector rates the sink's time went into zarr-python's codec pipeline and its asyncio
bridge (about 2 ms of CPU per chunk here, measured in `pipeline bench`,
docs/performance.md); tensorstore encodes and writes the same Zarr v3 chunks from C++, several at once,
without the interpreter lock. zarr-python still makes the store, its metadata and attributes,
writes the tables and reads everything back: both read and write the one format, so readers
cannot tell which wrote a chunk.

Shapes change here too (`resize`): zarr-python took ~3 ms per array per resize (a metadata read
and a write, through its event loop), tensorstore rewrites the same `zarr.json` (attributes and
dimension names kept) for every array at once. A handle's shape is the one it was opened or
resized with: an array resized by anything else must be `reopen`ed. tensorstore's errors arrive as
ValueError with the system's errno in the text; a shortage (a full disk, no descriptors) is
turned back into the OSError the daemon waits out.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def as_os_error(error: Exception) -> Exception:
    """tensorstore's error as the OSError it reports (errno and text), or the error itself if none."""
    match = _OS_ERROR_CODE.search(str(error))
    if match is None:
        return error
    code = int(match.group(1))
    return OSError(code, f"{errno.errorcode.get(code, code)}: {error}")


class FrameArrays:
    """Open tensorstore handles on some arrays of one store; writes are issued together and waited for together."""

    def __init__(self, store_path: Path, names: Sequence[str], fsync: bool = False) -> None:
        self.store_path = Path(store_path)
        self.names = tuple(names)
        # file_io_sync: each file fsynced, and its directory after the rename, as DurableLocalStore does for zarr-python;
        # no cache: a chunk read back is the one on the disk, and memory stays flat however long the scan
        self._context = ts.Context({"file_io_sync": fsync, "cache_pool": {"total_bytes_limit": 0}})
        self._arrays: dict[str, Any] = {}
        self.reopen()

    def reopen(self, names: Iterable[str] | None = None) -> None:
        """(Re)read these arrays' metadata (all by default): after something else resized or made them."""
        futures = {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.store_path / name)}},
                                 context=self._context, open=True) for name in (self.names if names is None else names)}
        self._arrays.update({name: _result(future) for name, future in futures.items()})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each array's shape as this handle knows it (as opened or last resized here)."""
        return {name: tuple(array.shape) for name, array in self._arrays.items()}

    def resize(self, lengths: dict[str, int]) -> None:
        """Give each array a new first dimension, all at once. Growing writes metadata only (the new frames are fill
        until written); shrinking also deletes the shard files wholly beyond the end (a shard the new end cuts keeps
        its frames past it, as zarr-python's resize did: the store is only trimmed past frames never written)."""
        futures = {}
        for name, length in lengths.items():
            array = self._arrays[name]
            if length == array.shape[0]:
                continue
            grow = length > array.shape[0]
            futures[name] = array.resize(exclusive_max=[length, *array.shape[1:]], resize_metadata_only=grow,
                                         expand_only=grow, shrink_only=not grow)
        self._arrays.update({name: _result(future) for name, future in futures.items()})

    def write(self, writes: Iterable[tuple[str, slice, np.ndarray]]) -> None:
        """Write each (array, frames, values) at once and return when all are on the file system (or raise the first
        error: writes to other chunks may have landed, which is why done flags are written only after this returns)."""
        futures = [self._arrays[name][block].write(np.ascontiguousarray(values)) for name, block, values in writes]
        errors = []
        for future in futures:  # every write finishes (or fails) before we return: none is left running behind us
            try:
                future.result()
            except ValueError as error:
                errors.append(error)
        if errors:
            raise as_os_error(errors[0]) from None



def _result(future: Any) -> Any:
    try:
        return future.result()
    except ValueError as error:
        raise as_os_error(error) from None
