"""Reading one frame of a compressed detector dataset without letting a chunk inflate past its declared size.

Why by hand: HDF5's deflate filter grows its output buffer until the stream ends, so a chunk that
declares 380 KB of frame can inflate to gigabytes (a 400 KB chunk of zlib-compressed zeros took a
reader to 450 MB; the same trick scales with the file). No library bounds it. So every deflate stage
is bounded here, in one of two ways:

- pipelines made only of shuffle, deflate and fletcher32 (what detectors write with HDF5's built-ins)
  are decoded here: the chunks that hold a frame are read raw (`read_direct_chunk`), their checksum
  verified, and inflated with zlib, stopping at the size the stage can legitimately have (the chunk's
  declared size when deflate is the only compressor): more than that is a refused frame, not memory;
- pipelines where deflate is written last (before any fletcher32) in front of a filter only HDF5
  decodes (scaleoffset, nbit, a plugin) are inflated here first, a piece at a time and thrown away,
  to check that the deflate stage stays within the chunk's declared size plus what that filter may
  add; then HDF5 reads the chunk. A deflate stage anywhere else cannot be checked without decoding
  what follows it, so such a dataset is refused at open (`chunk_problem`).

Datasets without deflate are read by HDF5 itself, after the declared chunk size has been checked
against the cap (`chunk_problem`); their plugin compressors are bounded only by it, but a bitshuffle or LZ4 chunk's
header (the size it decodes to, which the plugin trusts) is checked first (`_check_header`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import h5py
import numpy as np

SHUFFLE = h5py.h5z.FILTER_SHUFFLE
DEFLATE = h5py.h5z.FILTER_DEFLATE
FLETCHER32 = h5py.h5z.FILTER_FLETCHER32
_DECODED_HERE = frozenset({SHUFFLE, DEFLATE, FLETCHER32})
_NAMES = {DEFLATE: "deflate", SHUFFLE: "shuffle", FLETCHER32: "fletcher32", h5py.h5z.FILTER_SZIP: "szip",
          h5py.h5z.FILTER_NBIT: "nbit", h5py.h5z.FILTER_SCALEOFFSET: "scaleoffset", 32000: "lzf", 32001: "blosc",
          32004: "lz4", 32008: "bitshuffle", 32015: "zstd"}
_CHECKSUM_BYTES = 4  # fletcher32's trailer
_MEASURE_STEP = 1 << 16  # bytes inflated (and dropped) at a time when a chunk is only measured
_MEASURED_KEYS = 4096  # chunks remembered as measured, then forgotten all at once
_WORDS_AT_ONCE = 1 << 16  # fletcher32 sums this many words per numpy pass (index products stay far below 2**63)
_WORD_INDEX = np.arange(_WORDS_AT_ONCE, dtype=np.int64)

Filter = tuple[int, tuple[int, ...]]  # (filter id, its parameters)


class ChunkRefused(ValueError):
    """A chunk that inflates past its declared size, or a dataset whose chunks could: the message says which and by how much."""


class ChunkCorrupt(OSError):
    """A chunk whose stored bytes do not decode (a failed checksum, a broken deflate stream). An OSError, like HDF5's
    own read errors, so that a reader treats it as it treats those (a hole a truncation left, or one unreadable frame)."""


def chunk_bytes(dataset: h5py.Dataset) -> int:
    """Bytes one chunk holds when decompressed (the whole dataset when it is not chunked)."""
    shape = dataset.chunks or dataset.shape
    return int(np.prod(shape, dtype=np.int64)) * dataset.dtype.itemsize


def chunk_problem(dataset: h5py.Dataset, max_chunk_bytes: int, max_chunks_per_frame: int = 4096) -> str | None:
    """Why reading one frame would cost more than `max_chunk_bytes` of decompressed chunk, or None: too big a chunk, a
    deflate stage that cannot be bounded, or a frame in more than `max_chunks_per_frame` tiles (each costs a lookup in
    the chunk index: a 195 x 487 frame in 4 x 4 tiles took 1.3 s to read, in 2 x 2 tiles 43 s, so a readable scan was
    killed as "damaged" by the reader's deadline). A contiguous dataset is read frame by frame: only chunked ones are limited."""
    if dataset.chunks is None:
        return None
    filters = _filters(dataset)
    unbounded = _pipeline_problem(filters)
    if unbounded is not None:
        return unbounded
    elements = int(np.prod(dataset.chunks, dtype=np.int64))
    for code, values in filters:  # scaleoffset and nbit keep a chunk's element count in their parameters (the third)
        if code in (h5py.h5z.FILTER_SCALEOFFSET, h5py.h5z.FILTER_NBIT) and (len(values) < 3 or values[2] != elements):
            claimed = values[2] if len(values) >= 3 else "no count"
            return (f"{_name(code)} filter claims {claimed} elements a chunk, its chunks hold {elements:,}: refused (HDF5's "
                    "decoder trusts the count: a crafted one crashed the reader)")
    tiles = -(-dataset.shape[1] // dataset.chunks[1]) * -(-dataset.shape[2] // dataset.chunks[2]) if dataset.ndim == 3 else 1
    if tiles > max_chunks_per_frame:
        return (f"frames stored in {tiles:,} chunks each (chunks of {' x '.join(map(str, dataset.chunks))}), more than "
                f"follow.max_chunks_per_frame ({max_chunks_per_frame:,}): each frame would take seconds to read")
    size = chunk_bytes(dataset)
    if size <= max_chunk_bytes:
        return None
    frames = dataset.chunks[0]
    return (f"chunks of {' x '.join(map(str, dataset.chunks))} ({frames} frame(s), {size / 2**20:.0f} MiB decompressed) "
            f"exceed follow.max_chunk_mib {max_chunk_bytes / 2**20:g}: every frame read would decompress the whole chunk")


def fletcher32(data: bytes | memoryview) -> int:
    """HDF5's fletcher32 checksum (H5_checksum_fletcher32) of `data`, from two sums numpy takes at once.

    HDF5 adds the big-endian 16-bit words (an odd last byte as the high byte of one more) into sum1, and each new
    sum1 into sum2, folding both to 16 bits every 360 words. A fold keeps the value modulo 65535 and gives 0 only
    from 0, so each half is its exact sum taken modulo 65535 into 1..65535 (0 when the sum is 0), and the exact
    sum2 is each word times the number of words from it to the end."""
    words = np.frombuffer(data, dtype=">u2", count=len(data) // 2)
    sum1 = weighted = 0  # the words' sum; each word times its index
    for start in range(0, len(words), _WORDS_AT_ONCE):
        part = words[start:start + _WORDS_AT_ONCE].astype(np.int64)
        part_sum = int(part.sum())
        sum1 += part_sum
        weighted += start * part_sum + int(part @ _WORD_INDEX[:len(part)])
    sum2 = len(words) * sum1 - weighted
    if len(data) % 2:
        sum1 += data[-1] << 8
        sum2 += sum1
    return (_fold(sum2) << 16) | _fold(sum1)


def _fold(total: int) -> int:
    """An exact fletcher sum as HDF5's 16-bit folds leave it."""
    return (total - 1) % 65535 + 1 if total else 0


def missing_filters(dataset: h5py.Dataset) -> str | None:
    """The dataset's filters this process cannot decode, named ("szip (HDF5 filter 4)"), or None: said with an unreadable
    frame, whose HDF5 error ("filter returned failure during read") names none. (hdf5plugin's filters, bitshuffle and
    LZ4 among them, are there once hdfmap has been imported: it imports hdf5plugin.)"""
    missing = [f"{_NAMES[code]} (HDF5 filter {code})" if code in _NAMES else f"HDF5 filter {code}"
               for code, _ in _filters(dataset) if not h5py.h5z.filter_avail(code)]
    return ", ".join(missing) or None


BITSHUFFLE, LZ4 = 32008, 32004
_HEADED = (BITSHUFFLE, LZ4)  # hdf5plugin's filters (there once hdfmap imports it) whose chunks begin with their size


def _outermost(codes: list[int]) -> int | None:
    """The filter undone first on read (the last written), past a trailing fletcher32."""
    outer = list(codes)
    while outer and outer[-1] == FLETCHER32:
        outer.pop()
    return outer[-1] if outer else None


def _check_header(payload: bytes | memoryview, bound: int, code: int, offset: tuple[int, ...]) -> None:
    """A bitshuffle or LZ4 chunk's header (its decoded size, big-endian 8 bytes, then its block size, 4) within what the
    stage can have been given: the plugin allocates and decodes what the header says (a crafted size crashed the reader)."""
    if len(payload) < 12:
        raise ChunkRefused(f"chunk at {offset}: {len(payload)} byte(s), too short for its {_name(code)} header: refused")
    size, block = int.from_bytes(payload[:8], "big"), int.from_bytes(payload[8:12], "big")
    if not 0 < size <= bound or not 0 < block <= size:
        raise ChunkRefused(f"chunk at {offset}: its {_name(code)} header claims {size:,} bytes in blocks of {block:,}, the "
                           f"chunk holds {bound:,}: refused (the plugin trusts it: a crafted one crashed the reader)")


def _name(code: int) -> str:
    return _NAMES.get(code, f"filter {code}")  # never the name the file gives: it is the writer's text


def _filters(dataset: h5py.Dataset) -> list[Filter]:
    plist = dataset.id.get_create_plist()
    return [(code, tuple(values)) for code, _, values, _ in (plist.get_filter(i) for i in range(plist.get_nfilters()))]


def _deflate_measured(codes: list[int]) -> bool:
    """True when the pipeline's only deflate is written last but for fletcher32: undone first on read (after the
    checksum), so its output can be measured before HDF5 decodes the rest."""
    return _outermost(codes) == DEFLATE and codes.count(DEFLATE) == 1


def _pipeline_problem(filters: list[Filter]) -> str | None:
    """Why the chunks of a pipeline with these filters (in write order) could inflate without bound, or None."""
    codes = [code for code, _ in filters]
    if DEFLATE not in codes or set(codes) <= _DECODED_HERE or _deflate_measured(codes):
        return None
    others = sorted({_name(code) for code in codes if code not in _DECODED_HERE})
    return (f"filter pipeline {', '.join(map(_name, codes))} (as written): a deflate stage that HDF5 decodes further "
            f"({', '.join(others)}) cannot be bounded before it inflates, so its chunks could take any memory: refused")


def _grown(code: int, size: int) -> int:
    """The most bytes a stage writes for `size` bytes in: a checksum trailer, zlib's worst case (compressBound), or
    for a filter HDF5 decodes, a header or incompressible overhead (scaleoffset 22 bytes, LZ4 1/255, zstd 1/256)."""
    if code == SHUFFLE:
        return size
    if code == FLETCHER32:
        return size + _CHECKSUM_BYTES
    if code == DEFLATE:
        return size + (size >> 12) + (size >> 14) + (size >> 25) + 13
    return size + size // 64 + 4096


def _unshuffle(payload: bytes | memoryview, itemsize: int) -> bytes | memoryview:
    """Byte planes back into elements, as HDF5's shuffle does it: whole elements only, a remainder as it is."""
    count = len(payload) // itemsize
    if itemsize <= 1 or count <= 1:
        return payload
    planes = np.frombuffer(payload, np.uint8, count * itemsize).reshape(itemsize, count)
    whole = np.empty((count, itemsize), np.uint8)
    for plane in range(itemsize):  # a plane at a time: faster than one transposed copy
        whole[:, plane] = planes[plane]
    if len(payload) > count * itemsize:
        return whole.tobytes() + bytes(payload[count * itemsize:])
    return whole.reshape(-1).data


def _swapped_halves(checksum: int) -> int:
    """The checksum as HDF5 before 1.6.3 stored it on little-endian machines (the bytes of each 16-bit half swapped)."""
    return ((checksum & 0x00FF00FF) << 8) | ((checksum >> 8) & 0x00FF00FF)


def _checked(payload: bytes | memoryview, offset: tuple[int, ...]) -> memoryview:
    """The bytes under fletcher32's trailer, once they match it: a checksum failure is HDF5's error, raised here."""
    if len(payload) < _CHECKSUM_BYTES:
        raise ChunkCorrupt(f"chunk at {offset}: {len(payload)} byte(s), too short for its fletcher32 checksum")
    body = memoryview(payload)[:-_CHECKSUM_BYTES]
    stored = int.from_bytes(payload[-_CHECKSUM_BYTES:], "little")
    computed = fletcher32(body)
    if stored not in (computed, _swapped_halves(computed)):
        raise ChunkCorrupt(f"chunk at {offset} fails its fletcher32 checksum (stored {stored:#010x}, computed {computed:#010x} "
                           f"over {len(body):,} bytes): a damaged chunk")
    return body


def _inflates_past(payload: bytes | memoryview, bound: int, offset: tuple[int, ...]) -> bool:
    """Whether a deflate stream inflates to more than `bound` bytes, found out holding one piece of it at a time."""
    inflater = zlib.decompressobj()
    total = 0
    try:
        while not inflater.eof:
            out = inflater.decompress(payload, _MEASURE_STEP)
            total += len(out)
            if total > bound:
                return True
            payload = inflater.unconsumed_tail
            if not out and not payload:
                break  # the stream stops short: HDF5 says how when it reads it
    except zlib.error as error:
        raise ChunkCorrupt(f"chunk at {offset}: its deflate stream is broken ({error})") from None
    return False


@dataclass
class BoundedFrameReader:
    """Reads frames of one dataset; keeps the last decoded chunk, as a chunk may hold several frames."""

    dataset: h5py.Dataset
    _filters: list[Filter] = field(init=False)
    _problem: str | None = field(init=False, default=None)  # why no frame is read: a deflate stage that cannot be bounded
    _here: bool = field(init=False, default=False)  # the chunks are decoded here
    _measures: bool = field(init=False, default=False)  # HDF5 decodes the chunks once their deflate stage was measured here
    _cached: tuple[tuple[int | None, ...], np.ndarray] | None = field(init=False, default=None)
    _measured: set[tuple[int | None, ...]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._filters = _filters(self.dataset) if self.dataset.chunks is not None else []
        self._problem = _pipeline_problem(self._filters)
        codes = [code for code, _ in self._filters]
        self._here = DEFLATE in codes and set(codes) <= _DECODED_HERE
        self._measures = (DEFLATE in codes and not self._here and self._problem is None) or _outermost(codes) in _HEADED

    @property
    def decodes_itself(self) -> bool:
        """True when the frames' chunks are decoded here (bounded), False when HDF5 reads them (after their deflate
        stage was measured here, where they have one)."""
        return self._here

    def read_block(self, start: int, stop: int) -> np.ndarray:
        """Frames `start` to `stop` - 1 as one array: one HDF5 read for all of them where HDF5 decodes the chunks."""
        if not self.decodes_itself:
            self._measure_frames(start, stop)
            return np.asarray(self.dataset[start:stop])
        return np.stack([self.read(index) for index in range(start, stop)])

    def read(self, index: int) -> np.ndarray:
        """Frame `index` as stored (fill value where a chunk was never written)."""
        if not self.decodes_itself:
            self._measure_frames(index, index + 1)
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

    def _stages(self, mask: int) -> list[tuple[Filter, int]]:
        """The filters a chunk went through (those its mask does not skip), in write order, each with the most bytes
        it can have been given: the chunk's declared size, grown by the stages before it."""
        stages = []
        size = chunk_bytes(self.dataset)
        for position, (code, values) in enumerate(self._filters):
            if not mask & (1 << position):
                stages.append(((code, values), size))
                size = _grown(code, size)
        return stages

    def _too_much(self, offset: tuple[int, ...], stages: list[tuple[Filter, int]], stage: int, stored: int) -> ChunkRefused:
        """The refusal of a chunk whose deflate stage `stage` inflated past what the stages before it can have written."""
        size = chunk_bytes(self.dataset)
        bound = stages[stage][1]
        below = dict.fromkeys(_name(code) for (code, _), _ in stages[:stage] if code != SHUFFLE)
        allowed = f"+{bound - size:,} allowed for {', '.join(below)}; " if bound > size else ""
        return ChunkRefused(f"chunk at {offset} inflates past its declared {size:,} bytes ({allowed}{stored:,} stored): "
                            "refused (a decompression bomb, or a corrupt chunk)")

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
        """Undo the filters (last applied first), each deflate stage inflating at most what it can have been given."""
        data = self.dataset
        chunks = data.chunks
        assert chunks is not None
        size = chunk_bytes(data)
        payload: bytes | memoryview = raw
        stages = self._stages(mask)
        for stage in reversed(range(len(stages))):
            (code, values), bound = stages[stage]
            if code == DEFLATE:
                inflater = zlib.decompressobj()
                try:
                    payload = inflater.decompress(payload, bound)
                    more = bool(inflater.unconsumed_tail) or not inflater.eof and bool(inflater.decompress(b"", 1))
                except zlib.error as error:
                    raise ChunkCorrupt(f"chunk at {offset}: its deflate stream is broken ({error})") from None
                if more:
                    raise self._too_much(offset, stages, stage, len(raw))
            elif code == FLETCHER32:
                payload = _checked(payload, offset)
            else:  # shuffle, of elements of the size HDF5 gave it
                payload = _unshuffle(payload, values[0] if values and values[0] > 0 else data.dtype.itemsize)
        if len(payload) != size:
            raise ChunkRefused(f"chunk at {offset} holds {len(payload):,} bytes after decompression, declared {size:,}")
        return np.frombuffer(payload, dtype=data.dtype).reshape(chunks)

    def _measure_frames(self, start: int, stop: int) -> None:
        """Before HDF5 reads frames `start` to `stop` - 1: refuse a dataset whose deflate stage cannot be bounded, and
        measure the deflate stage of each chunk that holds them."""
        if self._problem is not None:
            raise ChunkRefused(self._problem)
        if not self._measures or stop <= start:
            return
        data = self.dataset
        chunks = data.chunks
        assert chunks is not None
        for first in range(start - start % chunks[0], min(stop, data.shape[0]), chunks[0]):
            for row in range(0, data.shape[1], chunks[1]):
                for column in range(0, data.shape[2], chunks[2]):
                    self._measure((first, row, column))

    def _measure(self, offset: tuple[int, ...]) -> None:
        """Inflate the chunk's outermost deflate stage a piece at a time, keeping nothing, to refuse it past the most
        its inner stages can have written (HDF5 would inflate it whole before decoding them)."""
        info = self.dataset.id.get_chunk_info_by_coord(offset)
        key = (*offset, info.byte_offset, info.size)
        if info.byte_offset is None or key in self._measured:
            return
        mask, raw = self.dataset.id.read_direct_chunk(offset)
        payload: bytes | memoryview = raw
        stages = self._stages(mask)
        for stage in reversed(range(len(stages))):
            (code, _), bound = stages[stage]
            if code == FLETCHER32:
                payload = _checked(payload, offset)
                continue
            if code == DEFLATE and _inflates_past(payload, bound, offset):
                raise self._too_much(offset, stages, stage, len(raw))
            if code in _HEADED:
                _check_header(payload, bound, code, offset)
            break  # what the outermost stage wrote is for HDF5 to decode
        if len(self._measured) >= _MEASURED_KEYS:
            self._measured.clear()
        self._measured.add(key)
