"""Reading one frame of a compressed detector dataset without letting a chunk inflate past its declared size.

Why by hand: HDF5's deflate filter grows its output buffer until the stream ends, so a chunk that
declares 380 KB of frame can inflate to gigabytes (a 400 KB chunk of zlib-compressed zeros took a
reader to 450 MB; the same trick scales with the file). No library bounds it. For the filters
detectors use with HDF5's built-ins (shuffle, deflate), the chunks that hold a frame are read raw
(`read_direct_chunk`) and inflated here with zlib, stopping at the chunk's declared size: more than
that is a refused frame, not memory. Datasets with other filters are read by HDF5 itself, after
the declared chunk size has been checked against the cap (`chunk_problem`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import h5py
import numpy as np

SHUFFLE = h5py.h5z.FILTER_SHUFFLE
DEFLATE = h5py.h5z.FILTER_DEFLATE
_DECODED_HERE = {SHUFFLE, DEFLATE}


class ChunkRefused(ValueError):
    """A chunk that inflates past its declared size; the message says which and by how much."""


def chunk_bytes(dataset: h5py.Dataset) -> int:
    """Bytes one chunk holds when decompressed (the whole dataset when it is not chunked)."""
    shape = dataset.chunks or dataset.shape
    return int(np.prod(shape, dtype=np.int64)) * dataset.dtype.itemsize


def chunk_problem(dataset: h5py.Dataset, max_chunk_bytes: int) -> str | None:
    """Why reading one frame would cost more than `max_chunk_bytes` of decompressed chunk, or None.
    A contiguous dataset is read frame by frame, so only chunked ones are limited."""
    if dataset.chunks is None:
        return None
    size = chunk_bytes(dataset)
    if size <= max_chunk_bytes:
        return None
    frames = dataset.chunks[0]
    return (f"chunks of {' x '.join(map(str, dataset.chunks))} ({frames} frame(s), {size / 2**20:.0f} MiB decompressed) "
            f"exceed follow.max_chunk_mib {max_chunk_bytes / 2**20:g}: every frame read would decompress the whole chunk")


def _filters(dataset: h5py.Dataset) -> list[int]:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


@dataclass
class BoundedFrameReader:
    """Reads frames of one dataset; keeps the last decoded chunk, as a chunk may hold several frames."""

    dataset: h5py.Dataset
    _filters: list[int] = field(init=False)
    _cached: tuple[tuple[int | None, ...], np.ndarray] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._filters = _filters(self.dataset) if self.dataset.chunks is not None else []

    @property
    def decodes_itself(self) -> bool:
        """True when the frames' chunks are inflated here (bounded), False when HDF5 reads them."""
        return bool(self._filters) and set(self._filters) <= _DECODED_HERE and self._filters.count(DEFLATE) == 1

    def read_block(self, start: int, stop: int) -> np.ndarray:
        """Frames `start` to `stop` - 1 as one array: one HDF5 read for all of them where HDF5 decodes the chunks."""
        if not self.decodes_itself:
            return np.asarray(self.dataset[start:stop])
        return np.stack([self.read(index) for index in range(start, stop)])

    def read(self, index: int) -> np.ndarray:
        """Frame `index` as stored (fill value where a chunk was never written)."""
        if not self.decodes_itself:
            return np.asarray(self.dataset[index])
        data = self.dataset
        chunks = data.chunks
        assert chunks is not None
        frame = np.empty(data.shape[1:], dtype=data.dtype)
        first = index - index % chunks[0]
        for row in range(0, data.shape[1], chunks[1]):
            for column in range(0, data.shape[2], chunks[2]):
                block = self._chunk((first, row, column))
                part = block[index - first, : data.shape[1] - row, : data.shape[2] - column]
                frame[row:row + part.shape[0], column:column + part.shape[1]] = part
        return frame

    def _chunk(self, offset: tuple[int, ...]) -> np.ndarray:
        data = self.dataset
        chunks = data.chunks
        assert chunks is not None
        info = data.id.get_chunk_info_by_coord(offset)
        key = (*offset, info.byte_offset, info.size)  # a chunk of several frames is rewritten as they arrive
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        if info.byte_offset is None:  # never written: HDF5 would give the fill value
            fill = data.fillvalue if data.fillvalue is not None else 0
            block = np.full(chunks, fill, dtype=data.dtype)
        else:
            mask, raw = data.id.read_direct_chunk(offset)
            block = self._decode(raw, mask, offset)
        self._cached = (key, block)
        return block

    def _decode(self, raw: bytes, mask: int, offset: tuple[int, ...]) -> np.ndarray:
        """Undo the filters (last applied first), inflating at most the chunk's declared size."""
        data = self.dataset
        chunks = data.chunks
        assert chunks is not None
        size = chunk_bytes(data)
        payload = raw
        for position in reversed(range(len(self._filters))):
            if mask & (1 << position):
                continue  # the writer skipped this filter for this chunk
            if self._filters[position] == DEFLATE:
                inflater = zlib.decompressobj()
                payload = inflater.decompress(payload, size)
                if inflater.unconsumed_tail or not inflater.eof and inflater.decompress(b"", 1):
                    raise ChunkRefused(f"chunk at {offset} inflates past its declared {size:,} bytes ({len(raw):,} stored): "
                                       "refused (a decompression bomb, or a corrupt chunk)")
            else:  # shuffle: byte planes back into elements
                itemsize = data.dtype.itemsize
                if len(payload) == size and itemsize > 1:
                    payload = np.frombuffer(payload, np.uint8).reshape(itemsize, -1).T.tobytes()
        if len(payload) != size:
            raise ChunkRefused(f"chunk at {offset} holds {len(payload):,} bytes after decompression, declared {size:,}")
        return np.frombuffer(payload, dtype=data.dtype).reshape(chunks)
