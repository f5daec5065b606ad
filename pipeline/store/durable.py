"""A Zarr local store that flushes every file to the disk before it counts as written (`output.fsync`).

Why: zarr's LocalStore writes each key to a temporary file and renames it into place, which keeps
a chunk whole against a crash of the process, but not against a power cut or a kernel crash: the
rename can reach the disk before the data does, and the done flag before the masks it vouches for.
Here each file's data is fsynced before the rename and its directory after it, so what a reader
(or a resume after a reboot) finds marked done was on the disk first. It costs a disk round trip
per chunk, so it is off by default.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore


def durable_write(path: Path, data: memoryview | bytes, exclusive: bool = False) -> None:
    """Write `path` whole or not at all, and on the disk before returning (file, then its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temporary, path)  # FileExistsError if someone was first, as zarr's own store does
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class DurableLocalStore(LocalStore):
    """LocalStore whose writes are durable (see the module docstring); reads are LocalStore's own."""

    def with_read_only(self, read_only: bool = False) -> DurableLocalStore:
        return type(self)(self.root, read_only=read_only)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._ensure_open_sync()
        self._check_writable()
        durable_write(self.root / key, value.as_buffer_like())

    async def set(self, key: str, value: Buffer) -> None:
        await self._durable_set(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        try:
            await self._durable_set(key, value, exclusive=True)
        except FileExistsError:
            pass

    async def _durable_set(self, key: str, value: Buffer, exclusive: bool) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(durable_write, self.root / key, value.as_buffer_like(), exclusive)


def store_for(path: Path, fsync: bool) -> Store | Path:
    """What `zarr.open_group` is given for a store at `path`: the path itself, or a durable store."""
    return DurableLocalStore(path) if fsync else path
