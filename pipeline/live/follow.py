"""Follow one scan file while the detector is still writing it, in any of I16's three layouts.

A frame is handed on once, and only when it is complete:
- GDA 9 (`entry/diamond_scan/keys/uniqueKeys`): when its key is non-zero, which the writer sets
  after the frame's data is flushed (the `swmr-tools` convention);
- without keys (GDA 8, frames inside the NeXus file): when a later frame exists, or the dataset's
  shape has held still for `settle_s` and the frame's data is on disk, or the scan's end marker is seen.
  A writer killed after growing the dataset but before writing the new frame leaves a row that reads
  as the fill value; where the storage can tell (chunks of one frame, allocated when written, as
  detectors write them) a row whose chunk was never written is not a frame and is never handed on.
The scan ends at `scan_finished` (GDA 9) or a non-empty `end_time` (older layouts), else after
`idle_timeout_s` without a new frame, which leaves it incomplete.

A file that cannot be read raises `ScanError`, whose message is one line naming the file and what
is wrong with it. Opening waits while the problem may be the writer not being done yet (an empty
file, a file caught mid-creation, a link target not there yet); it gives up at once on what no
writer will fix (not HDF5, wrong dtype, rank or frame shape) and, for the rest, as soon as the file
has not changed for `SETTLED_S` (nobody is writing it, so waiting longer changes nothing) or the
timeout passes. While following, a scan file that is deleted or replaced by another file of the
same name ends the scan (`end_reason` says which): its frames cannot be trusted to continue.

Frames are handed on as the file stores them, except that non-finite pixels
(NaN, inf) become dead pixels (`DEAD_PIXEL`, as the Pilatus reports them), so the models fill
them from their neighbours and the peak sums count them as 0; such frames, and frames that are
all zero, carry a `problem` ("nan", "inf", "all_zero") for the scan's `bad_frames` record.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from pipeline.common.chunks import BoundedFrameReader, ChunkRefused, chunk_problem, missing_filters
from pipeline.common.detector import DEAD_PIXEL
from pipeline.common.nexus import (
    H5_ERRORS,
    HDF5_SIGNATURE,
    ScanInfo,
    expected_frames,
    file_identity,
    find_scan_axis,
    handle_identity,
    open_hdf5,
    read_text,
    scan_command_of,
    start_time_of,
)
from pipeline.common.shared_datasets import NoSuchDataset, NotADataset, acquire_dataset, release_dataset
from pipeline.config import FollowSettings
from pipeline.errors import PipelineError, one_line, shortage_of
from pipeline.live import wire
from pipeline.live.confinement import NotRegular, dataset_outside, external_link_target, links_outside, read_head
from pipeline.live.written_rows import VirtualRows, row_complete, virtual_rows

log = logging.getLogger(__name__)

READY_WINDOW = 4096  # rows looked at per poll, from the first frame not yet handed on
_FIRST_LOOK = 512  # pixels looked at first for a non-zero count (a frame's background has counts almost everywhere)
READ_BLOCK = 16  # consecutive complete frames read in one HDF5 call (one call per frame cost ~0.1 ms each at 1,000 Hz)
H5_MESSAGE_LIMIT = 300  # HDF5's own messages can run over many lines and kilobytes
REOPEN_INTERVAL_S = 1.0  # older layouts add their end marker as a new object: only a reopen shows it
SETTLED_S = 2.0  # a file whose modification time is this old is not being written: an error reading it is final

T = TypeVar("T")


class ScanError(PipelineError):
    """A scan that cannot be read; the message is one line naming the file and the problem."""


class NotADetectorScan(ScanError):
    """A NeXus file that has settled without detector frames (a scan of counters only, a processed file): nothing to
    segment. The daemon skips it without making a store (a `failed` store beside every such file was noise)."""


class _NotYet(Exception):
    """A problem that the writer may still fix (the file is still being written); final once it has settled."""


class _NoDetector(_NotYet):
    """No detector dataset (yet): the writer may still add it; once the file has settled it is not a detector scan."""


@dataclass(frozen=True)
class Frame:
    index: int
    data: np.ndarray
    axis_value: float | None
    # "nan", "inf" or "all_zero": processed anyway, recorded in the store's `bad_frames`; "lost": the file was truncated
    # under the frame (its pixels read as the hole's zeros), so it is not processed and the scan ends incomplete
    problem: str | None = None


Progress = Callable[[str | None], None]
"""Told each step a follower takes (a name such as "opening the scan file") and, with None, that it is still alive
between steps: a reader process passes these on, so the daemon can tell a slow scan from a blocked one."""


def _no_progress(step: str | None) -> None:
    """A follower in the caller's own process has nobody to tell."""


def _settled(path: Path) -> bool:
    """True when nobody has written `path` for `SETTLED_S` (or it is gone), so an error reading it will not go away."""
    try:
        return time.time() - path.stat().st_mtime >= SETTLED_S
    except OSError:
        return True


def _head(path: Path, size: int) -> tuple[bytes, int]:
    """The first bytes of a regular file (ScanError for a FIFO or device: opening one would block its reader)."""
    try:
        return read_head(path, size)
    except NotRegular as error:
        raise ScanError(str(error)) from None


def check_signature(path: Path) -> None:
    """ScanError if `path` is certainly not HDF5 (or not a regular file); _NotYet while it may still be being created."""
    head, size = _head(path, 8)
    if head == HDF5_SIGNATURE:
        return
    if not head:
        raise _NotYet("not an HDF5 file (empty, 0 bytes)")
    if head.strip(b"\0") and not HDF5_SIGNATURE.startswith(head) and not h5py.is_hdf5(path):
        raise ScanError(f"{path}: not an HDF5 file (starts with {head!r})")
    if not h5py.is_hdf5(path):
        raise _NotYet(f"not an HDF5 file (no HDF5 signature in its {size} bytes)")


def check_truncated(path: Path) -> None:
    """_NotYet if the file is shorter than its superblock (v2/v3) says: a SWMR reader would read zeros past the end.

    Older superblocks (v0/v1) are checked by HDF5 itself when the file is opened.
    """
    head, size = _head(path, 64)
    if head[:8] != HDF5_SIGNATURE or len(head) < 12 or head[8] not in (2, 3) or head[9] not in (4, 8):
        return
    offset_size = head[9]
    fmt = "<I" if offset_size == 4 else "<Q"
    start = 12 + 2 * offset_size
    if len(head) < start + offset_size:
        return
    base = struct.unpack(fmt, head[12:12 + offset_size])[0]
    end_of_file = base + struct.unpack(fmt, head[start:start + offset_size])[0]
    if end_of_file > size:
        raise _NotYet(f"truncated HDF5 file ({size} bytes on disk, its superblock says {end_of_file})")


def inspect_frame(data: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A frame with non-finite pixels made dead pixels, and what was wrong with it, if anything. Floats are looked at as
    the workers get them (float32): a float64 count beyond float32's range is infinite there."""
    problem = None
    if data.dtype.kind == "u" and data.dtype.itemsize >= 2:
        data = _gaps_dead(data)
    if data.dtype.kind == "f":
        with np.errstate(over="ignore"):
            data = wire.carried(data)
        bad = ~np.isfinite(data)
        if bad.any():
            problem = "nan" if np.isnan(data).any() else "inf"
            data = np.where(bad, DEAD_PIXEL, data)
    if problem is None and not _any_counts(data):
        problem = "all_zero"
    return data, problem


def _gaps_dead(data: np.ndarray) -> np.ndarray:
    """An unsigned frame with its type's largest value made dead pixels. A Dectris Eiger marks the gaps between its
    modules and its masked pixels so (4294967295 in 32-bit frames, 65535 in 16-bit ones): as counts, they reached the
    models as lines of 2 billion counts. Frames without such a pixel are returned as they are."""
    largest = np.iinfo(data.dtype).max
    masked = data == largest
    if not masked.any():
        return data
    counts = np.minimum(data, np.iinfo(np.int32).max).astype(np.int32)  # room for the dead pixels' negative value
    counts[masked] = DEAD_PIXEL
    return counts


def _any_counts(data: np.ndarray) -> bool:
    """Whether any pixel is non-zero, usually from the first row alone: a whole frame's `any` cost ~0.1 ms a frame."""
    flat = data.reshape(-1)
    return bool(flat[:_FIRST_LOOK].any() or flat[_FIRST_LOOK:].any())


def _link_at(nexus: h5py.File, path: str) -> object | None:
    """The link (hard, soft or external) at `path`, or None when there is nothing there."""
    try:
        return nexus.get(path, getlink=True)
    except (KeyError, OSError):
        return None


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def _nx_class(group: h5py.Group) -> str:
    value = group.attrs.get("NX_class", "")
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class ScanFollower:
    """Yields the frames of one NeXus scan as they become complete; see the module docstring."""

    def __init__(self, nexus_path: Path, settings: FollowSettings, stop: threading.Event | None = None,
                 roots: Sequence[Path] | None = None, progress: Progress = _no_progress) -> None:
        self.nexus_path = Path(nexus_path)
        self.progress = progress
        # pixels only from files under these (see pipeline.live.confinement); by default the scan's own directory
        self.roots = [Path(root) for root in roots] if roots else [self.nexus_path.parent]
        self.settings = settings
        self.stop = stop or threading.Event()
        self.info: ScanInfo | None = None
        self.end_reason: str | None = None  # finished | end_time | idle_timeout | stopped | why the file went away
        self._nexus: h5py.File | None = None
        self._source: h5py.File | None = None
        self._data: h5py.Dataset | None = None
        self._keys: h5py.Dataset | None = None
        self._axis_path: str | None = None
        # datasets of the NeXus file looked at on every poll, found once per opening of it: an h5py `get` by path
        # costs ~120 us, a third of a poll's look (docs/performance.md); None: not there (until the file is reopened)
        self._nexus_datasets: dict[str, h5py.Dataset | None] = {}
        self._reader: BoundedFrameReader | None = None
        self._virtual: VirtualRows | None = None  # a virtual dataset's rows, judged by their sources
        self._said_bad_marker = False  # a malformed scan_finished is said once, not once a poll
        self._identities: dict[Path, tuple[int, int] | None] = {}  # the files we opened, to notice them replaced
        self._largest_size = 0  # the detector file's largest size seen; a smaller one later means it was truncated
        self.holes: list[tuple[int, int]] = []  # byte ranges (start, end) a truncation cut out of the detector file

    # -- opening --------------------------------------------------------------------------

    def _wait(self, path: Path, timeout_s: float, attempt: Callable[[], T], missing: str | None = None) -> T:
        """`attempt()` until it works. Gives up at once on a ScanError; on other errors once `path` has settled
        (or is gone, unless `missing` says it is awaited) or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return attempt()
            except ScanError:
                raise
            except (_NotYet, *H5_ERRORS) as error:
                if shortage_of(error) is not None:
                    raise  # no descriptor to open it with: says nothing about the file (the session stalls, then retries)
                problem = str(error) if isinstance(error, _NotYet) else f"unreadable HDF5 ({one_line(error, H5_MESSAGE_LIMIT)})"
                exists = path.exists()
                if not exists and missing is None:
                    raise ScanError(f"{path}: no such file (deleted before it could be read)") from None
                if not exists and time.monotonic() > deadline:
                    raise ScanError(f"{self.nexus_path}: {missing} within {timeout_s:g} s") from None
                final = NotADetectorScan if isinstance(error, _NoDetector) else ScanError
                if exists and _settled(path):
                    raise final(f"{path}: {problem}") from None
                if exists and time.monotonic() > deadline:
                    raise final(f"{path}: {problem}, still after {timeout_s:g} s") from None
            self.progress(None)
            if self.stop.wait(min(0.2, timeout_s / 10)):
                raise ScanError(f"{self.nexus_path}: stopped while opening")

    def open(self) -> ScanInfo:
        """Find the layout and the frames; waits for the file and its link target to appear."""
        try:
            return self._open()
        except ScanError:
            self.close()
            raise
        except H5_ERRORS as error:  # metadata that HDF5 cannot read
            self.close()
            if shortage_of(error) is not None:
                raise
            raise ScanError(f"{self.nexus_path}: unreadable NeXus metadata ({one_line(error, H5_MESSAGE_LIMIT)})") from None

    @property
    def _file(self) -> h5py.File:
        """The NeXus file, once `open` found it."""
        assert self._nexus is not None, "open() the follower first"
        return self._nexus

    @property
    def _frames(self) -> h5py.Dataset:
        """The detector dataset, once `open` found it."""
        assert self._data is not None, "open() the follower first"
        return self._data

    @property
    def _opened(self) -> ScanInfo:
        assert self.info is not None, "open() the follower first"
        return self.info

    def _open(self) -> ScanInfo:
        self._nexus_datasets.clear()
        self.progress("opening the scan file")
        self._nexus, entry, data_path, link = self._wait(self.nexus_path, self.settings.open_timeout_s, self._open_nexus)
        keys_path = f"{entry}/diamond_scan/keys/uniqueKeys"
        if isinstance(link, h5py.ExternalLink):
            layout = "gda9" if keys_path in self._file else "gda8"
            source_file = self._resolve_link_target(link.filename)
            if link.path.strip("/") == data_path.strip("/") and _same_file(source_file, self.nexus_path):
                raise ScanError(f"{self.nexus_path}:{data_path}: an external link to itself ({link.filename}:{link.path}); refused")
            self.progress("opening the detector file")
            self._source, self._data = self._wait(
                source_file, self.settings.link_timeout_s, lambda: self._open_target(source_file, link.path),
                missing=f"external link {data_path} -> {source_file}:{link.path}: target file did not appear",
            )
            dataset = link.path
        else:
            layout, source_file, dataset = "nexus", self.nexus_path, self._frames.name
            self._source = self._nexus
        self._check_dataset(self._data, source_file, dataset)
        outside = dataset_outside(self._frames, source_file, self.roots)
        if outside is not None:
            raise ScanError(outside)
        self._virtual = virtual_rows(self._frames, Path(self._frames.file.filename))
        self._keys = self._file[keys_path] if layout == "gda9" else None
        self.progress("reading the scan's metadata")
        command = scan_command_of(self._file, entry)
        axis = find_scan_axis(self._file, entry, command)
        self._axis_path = None if axis is None else axis.path
        expected, expected_from = expected_frames(self._file, entry, command)
        self.info = ScanInfo(
            nexus_path=self.nexus_path,
            scan_id=self.nexus_path.stem,
            layout=layout,
            entry=entry,
            source_file=source_file,
            dataset=dataset,
            scan_command=command,
            expected_frames=expected,
            axis_name=None if axis is None else axis.name,
            start_time=start_time_of(self._file, entry),
            detector_path=data_path,
            axis_path=self._axis_path,
            axis_source=None if axis is None else axis.source,
            expected_frames_source=expected_from,
            frame_shape=(int(self._frames.shape[1]), int(self._frames.shape[2])),
        )
        log.info("%s: %s layout, frames of %d x %d in %s:%s (detector %s), scan axis %s, %s frames expected%s", self.nexus_path.name, layout,
                 *self.info.frame_shape, source_file.name, dataset, data_path, self._axis_path or "none found", expected if expected is not None else "unknown",
                 f" ({expected_from})" if expected_from else "")
        return self.info

    def _open_nexus(self) -> tuple[h5py.File, str, str, object]:
        """The scan file open, with its detector found (and, for frames inside it, the dataset)."""
        check_signature(self.nexus_path)
        check_truncated(self.nexus_path)
        handle = open_hdf5(self.nexus_path)
        try:
            self.progress("checking the scan file's links")
            self._check_links(handle, self.nexus_path)  # before anything follows a link
            self.progress("finding the detector's frames")
            entry, data_path, link = self._find_detector(handle)
            if not isinstance(link, h5py.ExternalLink):
                data = handle[data_path]
                if not isinstance(data, h5py.Dataset):
                    raise ScanError(f"{self.nexus_path}:{data_path}: a {type(data).__name__}, not a dataset of frames")
                self._data = data
        except BaseException:
            handle.close()
            raise
        self._identities[self.nexus_path] = handle_identity(handle)
        return handle, entry, data_path, link

    def _check_links(self, handle: h5py.File, path: Path) -> None:
        """ScanError when a link in the file at `path` leads outside the allowed roots (pipeline.live.confinement)."""
        outside = links_outside(handle, path, self.roots, self.settings.max_links, self.settings.max_group_depth,
                                alive=lambda: self.progress(None))
        if outside is not None:
            raise ScanError(outside)

    def _find_detector(self, nexus: h5py.File) -> tuple[str, str, object]:
        """The detector's frames: `<entry>/instrument/<name>/data` or `<entry>/<name>/data` for each configured name
        (`follow.detectors`, I16's names first), else the `data` of any NXdetector group in the entry's instrument."""
        for entry in self.settings.entries:
            for name in self.settings.detectors:
                for path in (f"{entry}/instrument/{name}/data", f"{entry}/{name}/data"):
                    link = _link_at(nexus, path)
                    if link is not None:
                        return entry, path, link
        for entry in self.settings.entries:
            instrument = nexus.get(f"{entry}/instrument")
            if not isinstance(instrument, h5py.Group):
                continue
            for name in sorted(self._names_in(instrument)):
                group = instrument.get(name)
                if isinstance(group, h5py.Group) and _nx_class(group) == "NXdetector":
                    link = _link_at(nexus, f"{entry}/instrument/{name}/data")
                    if link is not None:
                        return entry, f"{entry}/instrument/{name}/data", link
        names = ", ".join(f"[instrument/]{name}/data" for name in self.settings.detectors)
        raise _NoDetector(f"no detector dataset (none of {names} in {' or '.join(self.settings.entries)}, and no NXdetector group with data)")

    def _names_in(self, group: h5py.Group) -> list[str]:
        """The names in `group`; ScanError naming one that is not UTF-8 (h5py gives it as bytes, which no lookup takes)."""
        names = []
        for raw in group.id:
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ScanError(f"{self.nexus_path}: {group.name.lstrip('/')} holds a name that is not UTF-8 ({raw!r}); refused") from None
        return names

    def _resolve_link_target(self, filename: str) -> Path:
        """Relative targets are relative to the NeXus file; absolute beamline paths fall back to it too."""
        return external_link_target(filename, self.nexus_path)

    def _open_target(self, path: Path, dataset: str) -> tuple[h5py.File, h5py.Dataset]:
        check_signature(path)
        check_truncated(path)
        try:
            # shared with any other scan that reads it (see pipeline.common.shared_datasets); the detector file's own links
            # are checked before HDF5 follows one of them to the frames
            data = acquire_dataset(path, dataset, check=lambda handle: self._check_links(handle, path))
        except NoSuchDataset:
            raise _NotYet(f"no dataset {dataset} (the external link's target)") from None
        except NotADataset as wrong:
            raise ScanError(f"{path}:{wrong} of frames") from None
        self._identities[path] = handle_identity(data.file)
        return data.file, data

    def _check_dataset(self, data: h5py.Dataset, source: Path, dataset: str) -> None:
        """Dtype, rank and frame shape never change once a dataset exists: a wrong one is final. Frames of any shape
        are read (a Pilatus 100K, 300K, an Eiger), up to `follow.max_frame_pixels`, unless `follow.frame_shape` asks one."""
        if data.dtype.kind not in "iuf" or data.dtype.itemsize > 8:
            raise ScanError(f"{source}:{dataset}: dtype {data.dtype} is not a number type (expected integer or float counts)")
        if data.ndim != 3:
            raise ScanError(f"{source}:{dataset}: rank {data.ndim} (shape {data.shape}), expected 3 (frame, rows, columns)")
        if data.is_virtual:
            for mapping in data.virtual_sources():
                inner = data.file.get(mapping.dset_name) if mapping.file_name == "." else None
                if isinstance(inner, h5py.Dataset) and inner.is_virtual:  # itself, or another: a loop crashes HDF5's read
                    raise ScanError(f"{source}:{dataset}: a virtual dataset over {mapping.dset_name}, a virtual dataset of the "
                                    "same file (one over itself crashed its reader); refused")
        height, width = int(data.shape[1]), int(data.shape[2])
        wanted = self.settings.frame_shape
        if wanted is not None and (height, width) != tuple(wanted):
            raise ScanError(f"{source}:{dataset}: frames of {height} x {width} pixels, expected {wanted[0]} x {wanted[1]} (follow.frame_shape)")
        if height < 1 or width < 1 or height * width > self.settings.max_frame_pixels:
            raise ScanError(f"{source}:{dataset}: frames of {height} x {width} pixels, more than follow.max_frame_pixels "
                            f"({self.settings.max_frame_pixels:,})" if height * width else f"{source}:{dataset}: frames of {height} x {width} pixels")
        unsendable = wire.frame_shape_problem(height, width)
        if unsendable is not None:
            raise ScanError(f"{source}:{dataset}: frames of {height} x {width} pixels: {unsendable} (a line detector's frames "
                            "are not segmented)")
        too_big = chunk_problem(data, int(self.settings.max_chunk_mib * 2**20), self.settings.max_chunks_per_frame)
        if too_big is not None:
            raise ScanError(f"{source}:{dataset}: {too_big}")
        self._reader = BoundedFrameReader(data)

    # -- following ------------------------------------------------------------------------

    def _gone(self) -> str | None:
        """Why the files being read are no longer the ones at their paths (deleted, replaced), or None."""
        for path, identity in self._identities.items():
            now = file_identity(path)
            what = "scan file" if path == self.nexus_path else "detector file"
            if now is None:
                return f"{path}: {what} deleted while being read"
            if identity is not None and now != identity:
                return f"{path}: {what} replaced by a new file of the same name while being read"
        return None

    def _reopen_nexus(self) -> None:
        """Close and reopen the NeXus file (not the detector file) so new objects become visible."""
        if self._source is self._nexus:
            self._reopen_for_end_marker()
            return
        keys_path = None if self._keys is None else self._keys.name
        self._nexus_datasets.clear()
        self._file.close()
        self._nexus = open_hdf5(self.nexus_path)
        if keys_path is not None:
            self._keys = self._file[keys_path]
        if handle_identity(self._nexus) != self._identities.get(self.nexus_path):  # replaced between check and reopen
            raise _Replaced(f"{self.nexus_path}: scan file replaced by a new file of the same name while being read")

    def _reopen_for_end_marker(self) -> None:
        """Frames in the NeXus file itself: SWMR refresh shows them, but not an end_time its writer adds as a new object at
        the end (it reopens the file to do so): such a scan waited the idle timeout and ended `incomplete`. So while the
        file has no end marker object, it is opened again, frames and all."""
        entry = self._opened.entry
        markers = (f"{entry}/diamond_scan/scan_finished", f"{entry}/end_time")
        if any(self._nexus_dataset(path) is not None for path in markers):
            return  # the marker is there (pre-created and filled later, as SWMR writers do): refresh shows its value
        dataset = self._frames.name
        if self._virtual is not None:
            self._virtual.close()
        self._nexus_datasets.clear()
        self._file.close()
        self._nexus = self._source = open_hdf5(self.nexus_path)
        if handle_identity(self._nexus) != self._identities.get(self.nexus_path):  # replaced between check and reopen
            raise _Replaced(f"{self.nexus_path}: scan file replaced by a new file of the same name while being read")
        found = self._nexus.get(dataset)
        if not isinstance(found, h5py.Dataset):
            raise ScanError(f"{self.nexus_path}:{dataset}: the frames' dataset vanished while being read")
        self._data = found
        self._reader = BoundedFrameReader(found)
        self._virtual = virtual_rows(found, self.nexus_path) if self._virtual is not None else None

    def _nexus_dataset(self, path: str) -> h5py.Dataset | None:
        """The NeXus file's dataset at `path`, or None; looked up once per opening of the file (objects added to it
        later become visible only when it is reopened anyway)."""
        if path not in self._nexus_datasets:
            found = self._file.get(path)
            self._nexus_datasets[path] = found if isinstance(found, h5py.Dataset) else None
        return self._nexus_datasets[path]

    def _end_marker(self) -> str | None:
        entry = self._opened.entry
        finished = self._nexus_dataset(f"{entry}/diamond_scan/scan_finished")
        if isinstance(finished, h5py.Dataset):
            finished.refresh()
            flag = self._finished_flag(finished)
            if flag is not None:
                return "finished" if flag else None
        end_time = self._nexus_dataset(f"{entry}/end_time")
        if isinstance(end_time, h5py.Dataset):
            end_time.refresh()
            if read_text(end_time).strip("\x00 "):
                return "end_time"
        return None

    def _refresh_frames(self) -> None:
        """Refresh the detector dataset, or fail the scan in one line naming it. A contiguous dataset made at its full
        size and filled under SWMR cannot be refreshed once its writer allocates it (HDF5 says "invalid dataset size,
        likely file corruption", to this dataset object and to any new one, until the file is opened again): the file
        is sound, and the line says how to process it once written."""
        contiguous = self._frames.chunks is None  # asked first: a failed refresh leaves the object unusable
        try:
            self._frames.refresh()
        except H5_ERRORS as error:
            if shortage_of(error) is not None:
                raise
            why = one_line(error, H5_MESSAGE_LIMIT)
            if contiguous:
                raise ScanError(f"{self._opened.source_file}:{self._opened.dataset}: a contiguous dataset being filled cannot "
                                f"be followed live ({why}); once the scan is written: pipeline process --force {self.nexus_path}") from None
            raise ScanError(f"{self._opened.source_file}:{self._opened.dataset}: HDF5 cannot refresh the frames ({why})") from None

    def _finished_flag(self, finished: h5py.Dataset) -> bool | None:
        """GDA 9's scan_finished as True/False, or None (said once) when it is not one finite number: a malformed marker
        must not fail a scan whose frames are good; its end is then judged by end_time, or the idle timeout."""
        value = np.ravel(finished[()]) if finished.size <= 16 else np.zeros(0)  # a marker is one number: read no more
        if value.size == 1 and value.dtype.kind in "biuf" and np.isfinite(value[0]):
            return bool(value[0] != 0)
        if not self._said_bad_marker:
            self._said_bad_marker = True
            shown = repr(value.tolist())[:80] if value.size else f"{finished.shape} {finished.dtype}"
            log.warning("%s: %s is %s, not one number; the scan's end is judged without it", self.nexus_path,
                        finished.name.lstrip("/"), shown)
        return None

    def _ready_indices(self, n_rows: int, settled: bool, start: int) -> Iterable[int]:
        """Rows from `start` on (at most READY_WINDOW of them: a file can claim millions) that may be complete frames:
        a non-zero key; without keys, every row but the newest, and the newest once the dataset has held still
        `settle_s` (`_ready_runs` then asks the storage, `_row_complete`)."""
        stop = min(n_rows, start + READY_WINDOW)
        if self._keys is not None:
            return (start + int(i) for i in np.flatnonzero(self._read_keys(start, stop)))
        return range(start, min(n_rows if settled else max(n_rows - 1, 0), stop))

    def _read_keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        assert self._keys is not None
        self._keys.refresh()
        stop = self._keys.shape[0] if stop is None else min(stop, self._keys.shape[0])
        return np.asarray(self._keys[start:stop]).reshape(-1) if stop > start else np.zeros(0, np.int32)

    def _end_reason(self, marker: str, handed_on: int, n_rows: int, settled: bool, waited_s: float) -> str | None:
        """Once an end marker is seen: how the scan ends, or None while frames may still come.

        The scan file's writer can set its end marker while the detector's own writer still flushes
        the last frames (their keys still zero), as swmr-tools' KeyFollower allows for. The scan ends
        when no more frames will come: the expected number handed on, or every key non-zero, or the
        detector dataset held still `settle_s` with no key outstanding; at the latest after
        `end_grace_s`. Fewer frames than expected make the reason say how many of how many."""
        expected = self._opened.expected_frames
        if expected is not None and handed_on >= expected:
            return marker
        outstanding = False
        if self._keys is not None:
            pending = self._read_keys(handed_on, min(n_rows, handed_on + READY_WINDOW))  # keys of rows not handed on yet
            if self._keys.shape[0] and handed_on >= self._keys.shape[0]:
                return marker if expected is None else f"{marker}: {handed_on} of {expected} frames (every key set)"
            outstanding = bool((pending == 0).any())
        if settled and not outstanding and handed_on >= n_rows:
            return marker if expected is None else f"{marker}: {handed_on} of {expected} frames (the detector stopped)"
        if waited_s >= self.settings.end_grace_s:
            log.warning("%s: end marker (%s) seen %.0f s ago, %d of %s frames arrived; ending incomplete", self.nexus_path.name,
                        marker, waited_s, handed_on, expected if expected is not None else "?")
            return f"{marker}: {handed_on} of {expected if expected is not None else '?'} frames within end_grace_s {self.settings.end_grace_s:g} s"
        return None

    def _row_complete(self, index: int, final: bool) -> bool:
        """Whether row `index` holds its frame, not the fill value of a row never written (pipeline.live.written_rows);
        `final`: no row will be added any more (the end marker, or the idle timeout's last look)."""
        if self._virtual is not None:
            return self._virtual.row_complete(index, final)
        return row_complete(self._frames, index, final)

    def _axis_values(self, start: int, stop: int) -> np.ndarray:
        """The scan axis at frames `start` to `stop` - 1 (NaN where unknown), in one read: one per poll, not per frame."""
        values = np.full(max(stop - start, 0), np.nan)
        if self._axis_path is None or stop <= start:
            return values
        axis = self._nexus_dataset(self._axis_path)
        if axis is None:
            return values
        axis.refresh()
        known = min(stop, axis.shape[0])
        if known > start:
            values[: known - start] = np.asarray(axis[start:known], dtype=np.float64).reshape(-1)
        return values

    def _note_truncation(self) -> None:
        """Remember what a truncation of the detector file cut out: a writer that writes on leaves a hole there, which
        reads as zeros, so frames stored in it are lost, not frames of zero counts."""
        try:
            size = os.fstat(self._frames.file.id.get_vfd_handle()).st_size
        except (OSError, ValueError, TypeError, RuntimeError):
            return
        if size < self._largest_size:
            self.holes.append((size, self._largest_size))
            log.warning("%s: detector file truncated from %d to %d bytes while being read; frames stored past that are lost",
                        self._opened.source_file, self._largest_size, size)
            self._largest_size = size
        self._largest_size = max(self._largest_size, size)

    def _cut_out(self, index: int, data: np.ndarray) -> bool:
        """Whether frame `index` was read from a hole that a truncation left (the writer writes on past it, so it reads
        as zeros): its chunk's bytes are not all on disk (SEEK_HOLE), or, where the storage cannot say where the frame
        is, it reads all zero after a truncation was seen. A cut reaches the chunk's end, so only frames whose last
        pixels read zero are looked up (a lookup costs ~20 us)."""
        tail = data.reshape(-1)[-_FIRST_LOOK:]
        if tail.any():
            return False
        span = self._chunk_span(index)
        if span is None:
            return bool(self.holes) and not _any_counts(data)
        return self._in_hole(*span)

    def _chunk_span(self, index: int) -> tuple[int, int] | None:
        """Where frame `index`'s chunk lies in the detector file, (start, end) in bytes, or None when unknown."""
        try:
            chunk = self._frames.id.get_chunk_info_by_coord((index,) + (0,) * (self._frames.ndim - 1))
        except H5_ERRORS:
            return None
        if chunk is None or chunk.byte_offset is None:
            return None
        return int(chunk.byte_offset), int(chunk.byte_offset + chunk.size)

    def _in_hole(self, start: int, end: int) -> bool:
        """Whether any byte of [start, end) of the detector file is a hole (never written, or cut out and not rewritten).
        A file system without SEEK_HOLE reports none."""
        try:
            fd = self._frames.file.id.get_vfd_handle()
            return os.lseek(fd, start, os.SEEK_HOLE) < end or os.fstat(fd).st_size < end
        except (OSError, ValueError, TypeError, RuntimeError):
            return False

    def _read(self, index: int) -> np.ndarray:
        assert self._reader is not None, "open() the follower first"
        try:
            return self._reader.read(index)
        except ChunkRefused as error:
            raise ScanError(f"{self._opened.source_file}:{self._opened.dataset}: frame {index}: {error}") from None
        except H5_ERRORS as error:
            span = self._chunk_span(index)
            if span is not None and self._in_hole(*span):  # compressed bytes cut out by a truncation: lost, not broken
                log.warning("%s: frame %d lies where the file was cut (truncated while being read)", self._opened.source_file, index)
                return np.zeros(self._frames.shape[1:], dtype=self._frames.dtype)
            missing = missing_filters(self._frames)
            lacking = f"; compressed with {missing}, which is not installed here" if missing else ""
            raise ScanError(f"{self._opened.source_file}:{self._opened.dataset}: frame {index} unreadable "
                            f"({one_line(error, H5_MESSAGE_LIMIT)}){lacking}") from None

    def _read_run(self, run: range) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) of each frame of `run`: one HDF5 read for them all where HDF5 decodes the chunks; frame by
        frame where we inflate them ourselves (bounded) or the block read failed, so that the good frames before a bad
        one are still handed on and the error names the bad one."""
        assert self._reader is not None, "open() the follower first"
        if len(run) > 1 and not self._reader.decodes_itself:
            try:
                block = self._reader.read_block(run.start, run.stop)
            except H5_ERRORS:
                pass
            else:
                yield from zip(run, block)
                return
        for index in run:
            yield index, self._read(index)

    def _ready_runs(self, n_rows: int, settled: bool, start: int, sent: set[int], final: bool) -> list[range]:
        """The complete frames not yet handed on, as runs of neighbours of at most READ_BLOCK frames (each run is one
        read); without keys, up to the first row not known to hold its frame (`_row_complete`)."""
        runs: list[range] = []
        for index in self._ready_indices(n_rows, settled, start):
            if index in sent:
                continue
            if self._keys is None and not self._row_complete(index, final):
                break
            if runs and runs[-1].stop == index and len(runs[-1]) < READ_BLOCK:
                runs[-1] = range(runs[-1].start, index + 1)
            else:
                runs.append(range(index, index + 1))
        return runs

    def frames(self, start: int = 0) -> Iterator[Frame]:
        """Every complete frame from `start` on, once each, in index order of completion."""
        if self.info is None:
            self.open()
        self.progress("following the file")
        sent: set[int] = set()
        next_index = start
        last_rows, last_change = -1, time.monotonic()
        last_progress = time.monotonic()
        last_reopen = last_check = time.monotonic()
        ended_at: float | None = None  # when the end marker was first seen
        try:
            while True:
                if time.monotonic() - last_check >= REOPEN_INTERVAL_S:  # even while frames keep coming
                    gone = self._gone()
                    if gone is not None:
                        raise _Replaced(gone)
                    last_check = time.monotonic()
                ended = self._end_marker()
                self._refresh_frames()
                if tuple(self._frames.shape[1:]) != self._opened.frame_shape:  # a writer that grows the frames: never cropped
                    raise ScanError(f"{self._opened.source_file}:{self._opened.dataset}: frames now of "
                                    f"{' x '.join(map(str, self._frames.shape[1:]))} pixels, were "
                                    f"{' x '.join(map(str, self._opened.frame_shape))}: a frame shape that changes mid-scan is refused")
                n_rows = self._frames.shape[0]
                now = time.monotonic()
                if n_rows != last_rows:
                    last_rows, last_change = n_rows, now
                settled = now - last_change >= self.settings.settle_s
                progressed = False
                # at the end (or the idle timeout's last look) a newest row whose storage cannot tell is read: no writer
                # grows the dataset any more to show that it is written
                final = ended is not None or now - last_progress >= self.settings.idle_timeout_s
                runs = self._ready_runs(n_rows, settled, next_index, sent, final)
                axis = self._axis_values(runs[0].start, runs[-1].stop) if runs else np.zeros(0)
                self._note_truncation()
                for run in runs:
                    read: list[tuple[int, np.ndarray]] = []
                    unreadable: ScanError | None = None
                    try:
                        read.extend(self._read_run(run))
                    except ScanError as error:  # the good frames before the bad one are still handed on
                        unreadable = error
                    self._note_truncation()  # a truncation during the read shows now: the reads are bracketed
                    for index, raw in read:
                        data, problem = inspect_frame(raw)
                        if self._cut_out(index, raw):
                            problem = "lost"
                        value = float(axis[index - runs[0].start])
                        yield Frame(index=index, data=data, axis_value=value if np.isfinite(value) else None, problem=problem)
                        sent.add(index)
                        progressed = True
                    if unreadable is not None:
                        raise unreadable
                # indices below next_index are done; keep `sent` small by advancing past a full prefix
                while next_index in sent:
                    sent.discard(next_index)
                    next_index += 1
                if progressed:
                    last_progress = time.monotonic()
                    continue
                if ended is not None:
                    ended_at = now if ended_at is None else ended_at
                    reason = self._end_reason(ended, next_index + len(sent), n_rows, settled, now - ended_at)
                    if reason is not None:
                        self.end_reason = reason
                        return
                if self.stop.is_set():
                    self.end_reason = "stopped"
                    return
                idle = time.monotonic() - last_progress
                if ended is None and idle >= self.settings.idle_timeout_s:
                    self.end_reason = "idle_timeout"
                    log.warning("%s: no new frame for %.0f s and no end marker: ending incomplete", self.nexus_path.name, idle)
                    return
                self.progress(None)
                if time.monotonic() - last_reopen >= REOPEN_INTERVAL_S:
                    gone = self._gone()
                    if gone is not None:
                        raise _Replaced(gone)
                    self._reopen_nexus()
                    last_reopen = last_check = time.monotonic()
                self.stop.wait(self.settings.poll_interval_s)
        except _Replaced as change:
            self.end_reason = str(change)
            log.warning("%s; ending incomplete after %d frame(s)", change, next_index + len(sent))
        except ScanError:
            raise
        except H5_ERRORS as error:
            if shortage_of(error) is not None:
                raise  # reopening the scan file found no descriptor free: the session stalls and resumes later
            gone = self._gone()  # a file that vanished under the reader is the better explanation
            if gone is not None:
                self.end_reason = gone
                log.warning("%s; ending incomplete after %d frame(s)", gone, next_index + len(sent))
                return
            raise ScanError(f"{self.nexus_path}: read failed while following ({one_line(error, H5_MESSAGE_LIMIT)})") from None

    def read_frame(self, index: int) -> np.ndarray:
        """One frame already known to be complete (used to replay a resumed scan), as `frames` hands it on."""
        if self.info is None:
            self.open()
        return inspect_frame(self._read(index))[0]

    @property
    def frames_in_file(self) -> int:
        return 0 if self._data is None else int(self._frames.shape[0])

    def close(self) -> None:
        if self._virtual is not None:
            self._virtual.close()
            self._virtual = None
        if self._source is not None and self._source is not self._nexus and self._data is not None:
            release_dataset(self._data)  # the detector file: shared, closed by its last user
        try:
            if self._nexus is not None and self._nexus.id.valid:
                self._nexus.close()
        except Exception:  # closing a file that vanished must not hide the real error
            pass
        self._source = self._nexus = None
        self._nexus_datasets.clear()

    def __enter__(self) -> ScanFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Replaced(Exception):
    """The file being followed was deleted or replaced; the message is the one-line reason."""
