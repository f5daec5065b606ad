"""Whether a row of a detector dataset holds a written frame, or only the fill value HDF5 gives for what was never
written (zeros, read as a frame of no counts and marked done: the frame is then lost for good).

Three layouts hide it. A chunk of one frame shows it (no chunk on disk, no frame). A chunk of several frames, a
contiguous dataset, or chunks allocated before they are written do not: a detector that grows the dataset before it
writes the frame (areaDetector's NDFileHDF5 with NumFramesChunks > 1) leaves its newest row unwritten for the exposure,
so that row counts only once a later row exists or the scan has ended; a dataset made at the scan's full size has every
row from the start, so its rows count only at the end. And a virtual dataset (an Eiger's or an Odin
detector's, over files its writer processes fill) reads its fill value wherever its source file does not exist yet or
does not hold the row yet: each row is judged by its source (`VirtualRows`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.common.nexus import H5_ERRORS
from pipeline.common.shared_datasets import acquire_dataset, release_dataset
from pipeline.live.confinement import hdf5_search

log = logging.getLogger(__name__)

UNLIMITED = h5py.h5s.UNLIMITED


def storage_shows_written(data: h5py.Dataset, index: int) -> bool | None:
    """True or False where the storage shows whether row `index` was written (one frame a chunk: its chunk is on disk or
    not); None where it cannot tell (several frames a chunk, contiguous data, chunks allocated early, virtual data)."""
    try:
        if data.is_virtual or data.chunks is None or data.chunks[0] != 1:
            return None
        if data.id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY:
            return None
        return data.id.get_chunk_info_by_coord((index,) + (0,) * (data.ndim - 1)).byte_offset is not None
    except H5_ERRORS:
        return None


def row_complete(data: h5py.Dataset, index: int, final: bool) -> bool:
    """Whether row `index` of a (non-virtual) dataset of `data.shape[0]` rows holds its frame: shown by the storage, or,
    where the storage cannot tell, once a later row exists in a dataset that grows (a writer grows it for the next frame
    only after it wrote this one), or `final` (the scan has ended: its writer writes nothing more). A dataset made at its
    full size (pre-allocated, contiguous) has every row from the start: only the end tells."""
    shown = storage_shows_written(data, index)
    if shown is not None:
        return shown
    grows = data.maxshape[0] is None or data.maxshape[0] > data.shape[0]
    return (grows and index < data.shape[0] - 1) or final


@dataclass(frozen=True)
class _Span:
    """A regular selection along the frame axis: `count` blocks of `block` rows, `stride` apart, from `start`."""

    start: int
    stride: int
    count: int  # UNLIMITED: as many as the source grows to
    block: int

    def position(self, row: int) -> int | None:
        """Which element of the selection row `row` is (0 for the first row selected), or None when not selected."""
        offset = row - self.start
        if offset < 0:
            return None
        number, within = divmod(offset, self.stride) if self.count != 1 and self.stride else (0, offset)  # one block: any stride
        if within >= self.block or (self.count != UNLIMITED and number >= self.count):
            return None
        return number * self.block + within

    def row(self, position: int) -> int:
        """The row of the selection's element `position`."""
        number, within = divmod(position, self.block)
        return self.start + (number * self.stride if number else 0) + within


def _span(space: h5py.h5s.SpaceID) -> _Span | None:
    """The selection of a mapping's space along the frame axis, or None when it is not one regular run of frames
    (point selections, irregular hyperslabs: rows of such a mapping cannot be told and count as written)."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:  # the whole space, whose extent HDF5 may not record (a source not open): row for row
        return _Span(0, 0, 1, UNLIMITED)
    if kind == h5py.h5s.SEL_HYPERSLABS and space.is_regular_hyperslab():
        start, stride, count, block = space.get_regular_hyperslab()
        return _Span(int(start[0]), int(stride[0]), int(count[0]), int(block[0]))
    return None


@dataclass(frozen=True)
class _Mapping:
    virtual: _Span
    source: _Span
    file_name: str
    dataset: str


class VirtualRows:
    """Whether each row of a virtual dataset has its source data: its source file exists (where HDF5 looks for it,
    `confinement.hdf5_search`), its source dataset does, and holds the row. Source datasets are opened through
    `shared_datasets` (one object per dataset in the process), and held until `close`."""

    def __init__(self, data: h5py.Dataset, holder: Path) -> None:
        self.data, self.holder = data, holder
        self.mappings: list[_Mapping] = []
        self.untold = False  # a mapping whose rows cannot be told (see _span): its rows count as written
        for source in data.virtual_sources():
            virtual, origin = _span(source.vspace), _span(source.src_space)
            if virtual is None or origin is None:
                self.untold = True
                continue
            self.mappings.append(_Mapping(virtual, origin, source.file_name, source.dset_name))
        self._open: dict[tuple[str, str], h5py.Dataset] = {}

    def row_complete(self, index: int, final: bool) -> bool:
        for mapping in self.mappings:
            position = mapping.virtual.position(index)
            if position is not None:
                return self._source_row_complete(mapping, mapping.source.row(position), final)
        return self.untold  # a row no mapping covers holds the fill value for ever; one an untold mapping covers is let go

    def _source_row_complete(self, mapping: _Mapping, row: int, final: bool) -> bool:
        source = self._source(mapping)
        if source is None:
            return False
        if row >= source.shape[0] - 1:  # refreshed only for rows it did not hold at the last look, not once a row
            try:
                if source.file.swmr_mode:
                    source.refresh()  # a source file still being written: its current length
            except H5_ERRORS:
                return False
        return row < source.shape[0] and row_complete(source, row, final)

    def _source(self, mapping: _Mapping) -> h5py.Dataset | None:
        """The mapping's source dataset, or None while its file or dataset is not there."""
        if mapping.file_name == ".":
            found = self.data.file.get(mapping.dataset)
            return found if isinstance(found, h5py.Dataset) else None
        path = next((place for place in hdf5_search(mapping.file_name, self.holder, "virtual") if place.is_file()), None)
        if path is None:
            return None
        key = (str(path), mapping.dataset)
        if key not in self._open:
            try:
                self._open[key] = acquire_dataset(path, mapping.dataset)
            except (LookupError, *H5_ERRORS):  # not there yet, or a file still being made
                return None
        return self._open[key]

    def close(self) -> None:
        for dataset in self._open.values():
            release_dataset(dataset)
        self._open.clear()


def virtual_rows(data: h5py.Dataset, holder: Path) -> VirtualRows | None:
    """The row judge of a virtual dataset, or None for any other."""
    return VirtualRows(data, holder) if data.is_virtual else None

