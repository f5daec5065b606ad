"""A read-only Zarr store for stores that someone else may have planted: only regular files inside the store, each
read no further than its chunk can be long.

Why: zarr's LocalStore follows symbolic links and reads a file to its end. The web view serves
every store under its roots, and anyone who can write there can plant one: a chunk linked to
`/dev/zero` grew the web process to 14 GB, a chunk (or a chunk folder) linked into another visit's
store served that store's values, and a FIFO blocked its reader for ever. Here every key is opened
one path component at a time from the store's own folder with O_NOFOLLOW (a link anywhere on the
way is refused, not followed), with O_NONBLOCK and checked with fstat before a byte is read (only a
regular file is read), and its size is checked against the most its encoding can take: a chunk's
size follows from its array's metadata (chunk shape, data type, codecs; a shard's from its inner
chunks and index), and metadata documents have a fixed cap. Whatever is refused raises StoreError
with one line naming the file; a missing file is a missing key, as in LocalStore.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import stat
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.buffer.core import default_buffer_prototype
from zarr.storage import LocalStore

from pipeline.store.reader import StoreError

METADATA_NAMES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
MAX_METADATA_BYTES = 64 << 20  # a metadata document (a finished store's consolidated root: tens of KiB; attributes a few MiB)
MAX_UNBOUNDED_CHUNK_BYTES = 256 << 20  # a chunk whose encoded size cannot be bounded (an unknown codec or a variable-size type)
# every codec the stores use (and the common lossless ones) encodes n bytes in at most n + n/64 + 4 KiB: zstd's bound is
# n + n/256 + 64, deflate's n + 5 per 16 KiB + 18, blosc's n + 16, a checksum 4 or 8
SIZE_PRESERVING = {"bytes", "transpose", "crc32c"}
COMPRESSING = {"zstd", "gzip", "blosc", "zlib", "lz4", "bz2", "lzma"}
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
DIRECTORY_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory",
          stat.S_IFSOCK: "a socket"}


def encoded_bound(raw_bytes: int, codecs: Iterable[Any]) -> int | None:
    """The most bytes `raw_bytes` of chunk data can take once encoded by `codecs` (Zarr v3 codec list), None if unknown."""
    size = raw_bytes
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else codec
        if name in SIZE_PRESERVING:
            size += 8 if name == "crc32c" else 0
        elif name in COMPRESSING:
            size += size // 64 + 4096
        else:
            return None
    return size


def _itemsize(data_type: Any) -> int | None:
    if not isinstance(data_type, str):
        return None  # a parametrised or structured type: not one the stores use
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    return dtype.itemsize if dtype.itemsize and not dtype.hasobject else None


def chunk_file_bound(metadata: dict[str, Any]) -> int | None:
    """The largest file a chunk (or a shard of chunks) of this Zarr v3 array can be, from its metadata; None if unknown."""
    itemsize = _itemsize(metadata.get("data_type"))
    grid = metadata.get("chunk_grid") or {}
    chunk_shape = (grid.get("configuration") or {}).get("chunk_shape") if isinstance(grid, dict) else None
    codecs = metadata.get("codecs") or []
    if itemsize is None or not isinstance(chunk_shape, list) or not all(isinstance(n, int) and n >= 0 for n in chunk_shape):
        return None
    if len(codecs) == 1 and isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed":
        sharding = codecs[0].get("configuration") or {}
        inner_shape = sharding.get("chunk_shape")
        if not isinstance(inner_shape, list) or len(inner_shape) != len(chunk_shape) or not all(isinstance(n, int) and n > 0 for n in inner_shape):
            return None
        inner_chunks = math.prod(-(-outer // inner) for outer, inner in zip(chunk_shape, inner_shape))
        inner = encoded_bound(math.prod(inner_shape) * itemsize, sharding.get("codecs") or [])
        index = encoded_bound(inner_chunks * 16, sharding.get("index_codecs") or [])
        return None if inner is None or index is None else inner_chunks * inner + index
    return encoded_bound(math.prod(chunk_shape) * itemsize, codecs)


def _read_regular(fd: int, name: str, limit: int, byte_range: ByteRequest | None) -> bytes:
    """The requested bytes of the open file `fd`, after checking that it is a regular file no longer than `limit`."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{name}: {_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not a regular file; not read")
    size = info.st_size
    if size > limit:
        raise StoreError(f"{name}: {size:,} bytes, larger than any valid encoding of it ({limit:,} bytes at most); not read")
    if byte_range is None:
        start, end = 0, size
    elif isinstance(byte_range, RangeByteRequest):
        start, end = byte_range.start, min(byte_range.end, size)
    elif isinstance(byte_range, OffsetByteRequest):
        start, end = byte_range.offset, size
    elif isinstance(byte_range, SuffixByteRequest):
        start, end = max(0, size - byte_range.suffix), size
    else:
        raise TypeError(f"unexpected byte range {byte_range!r}")
    parts: list[bytes] = []
    position = start
    while position < end:
        part = os.pread(fd, end - position, position)
        if not part:
            break  # the file was cut short meanwhile: what there is
        parts.append(part)
        position += len(part)
    return b"".join(parts)


class ConfinedLocalStore(LocalStore):
    """LocalStore, read-only, whose reads open only regular files inside the store, bounded by what their key can hold."""

    def __init__(self, root: Path | str, *, read_only: bool = True) -> None:
        if not read_only:
            raise ValueError("a confined store is read-only")
        super().__init__(root, read_only=True)
        self._arrays: dict[str, int | None] = {}  # array folder -> its chunk files' size bound
        self._not_arrays: set[str] = set()

    def with_read_only(self, read_only: bool = True) -> ConfinedLocalStore:
        if not read_only:
            raise ValueError("a confined store is read-only")
        return type(self)(self.root)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConfinedLocalStore) and self.root == other.root

    __hash__ = None  # type: ignore[assignment]

    # -- opening a key ------------------------------------------------------------------------

    def _parts(self, key: str) -> list[str]:
        parts = [part for part in key.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise StoreError(f"{self.root.name}/{key}: not a key inside the store")
        return parts

    def _open_key(self, key: str, directory: bool = False) -> int | None:
        """A descriptor of `key` reached from the store's folder without following a link; None when it does not exist."""
        parts = self._parts(key)
        try:
            fd = os.open(self.root, DIRECTORY_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._refusal(error, "") from None
        try:
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                try:
                    next_fd = os.open(part, DIRECTORY_FLAGS if directory or not last else OPEN_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    return None
                except NotADirectoryError:  # a file where a folder should be (none there), or a link to a folder
                    if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise self._refusal(OSError(errno.ELOOP, "a link"), "/".join(parts[:index + 1])) from None
                    return None
                except OSError as error:
                    raise self._refusal(error, "/".join(parts[:index + 1])) from None
                os.close(fd)
                fd = next_fd
            result, fd = fd, -1
            return result
        finally:
            if fd >= 0:
                os.close(fd)

    def _refusal(self, error: OSError, key: str) -> StoreError:
        name = f"{self.root.name}/{key}" if key else str(self.root)
        if error.errno == errno.ELOOP:
            return StoreError(f"{name}: a symbolic link inside a store; not followed")
        return StoreError(f"{name}: cannot be read ({error.strerror or error})")

    def _limit(self, key: str) -> int:
        """The most bytes the file of `key` may hold: a metadata document's cap, or its array's chunk bound."""
        parts = self._parts(key)
        if parts and parts[-1] in METADATA_NAMES:
            return MAX_METADATA_BYTES
        for depth in range(len(parts) - 1, 0, -1):
            folder = "/".join(parts[:depth])
            if folder in self._arrays:
                bound = self._arrays[folder]
                return MAX_UNBOUNDED_CHUNK_BYTES if bound is None else bound
            if folder in self._not_arrays:
                continue
            document = self._read(f"{folder}/zarr.json", None)
            metadata = None
            if document is not None:
                try:
                    metadata = json.loads(document)
                except ValueError:
                    metadata = None
            if isinstance(metadata, dict) and metadata.get("node_type") == "array":
                self._arrays[folder] = chunk_file_bound(metadata)
                return self._limit(key)
            self._not_arrays.add(folder)
        return MAX_UNBOUNDED_CHUNK_BYTES

    def _read(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        limit = self._limit(key)
        fd = self._open_key(key)
        if fd is None:
            return None
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                return None  # a folder is no key (as in LocalStore)
            return _read_regular(fd, f"{self.root.name}/{key}", limit, byte_range)
        finally:
            os.close(fd)

    # -- the store's reads ----------------------------------------------------------------------

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None) -> Buffer | None:
        data = self._read(key, byte_range)
        return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get(self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        data = await asyncio.to_thread(self._read, key, byte_range)
        return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        fd = await asyncio.to_thread(self._open_key, key)
        if fd is None:
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    async def getsize(self, key: str) -> int:
        fd = await asyncio.to_thread(self._open_key, key)
        if fd is None:
            raise FileNotFoundError(key)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _names(self, prefix: str) -> list[tuple[str, bool]]:
        """(name, is a folder) of what `prefix` holds, links left out: they are not part of a store."""
        fd = self._open_key(prefix, directory=True)
        if fd is None:
            return []
        try:
            names = []
            for name in os.listdir(fd):
                try:
                    mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                except OSError:
                    continue
                if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                    names.append((name, stat.S_ISDIR(mode)))
            return sorted(names)
        finally:
            os.close(fd)

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        for name, _ in await asyncio.to_thread(self._names, prefix):
            yield name

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        pending = [prefix.strip("/")]
        while pending:
            folder = pending.pop()
            for name, is_folder in await asyncio.to_thread(self._names, folder):
                key = f"{folder}/{name}" if folder else name
                if is_folder:
                    pending.append(key)
                else:
                    yield key

    async def list(self) -> AsyncIterator[str]:
        async for key in self.list_prefix(""):
            yield key
