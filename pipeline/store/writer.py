"""One Zarr v3 store per scan, in the layout of the design notes, written by one thread only.

Write order is what makes a live store trustworthy: a frame's masks and its 3D labels are written
first, `frames/done[frame] = 1` last, so a reader (or a resumed daemon) can take every done frame
as final. The tables (`tlm/detections`, `peaks`) are rewritten whole from memory, sorted, holding
done frames only; metadata is consolidated only once the scan is over, so live readers must open
with `use_consolidated=False`.
"""

from __future__ import annotations

import atexit
import copy
import fcntl
import functools
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, MemoryStore

import pipeline.store.schema as schema
from pipeline import __version__
from pipeline.common.nexus import ScanInfo
from pipeline.common.volume import VolumeLinker
from pipeline.errors import PipelineError, one_line, shortage_of
from pipeline.models.prediction import Detection, FramePrediction
from pipeline.store.durable import store_for
from pipeline.store.empty_frames import WrittenFrames, index_runs
from pipeline.store.frame_arrays import FrameArrays
from pipeline.store.location import stat_identity
from pipeline.store.schema import (
    BOX_FIELDS,
    DETECTION_COLUMNS,
    FRAME_ARRAYS,
    FRAME_DIMS,
    FRAME_SHARD,
    MAX_DETECTIONS_PER_FRAME,
    PER_FRAME_ARRAYS,
    STATUS_FAILED,
    STATUS_RUNNING,
    Attr,
)

log = logging.getLogger(__name__)

GROW_FRAMES = 4096  # the most frames the arrays grow by at once
MIN_GROW_FRAMES = 256  # the fewest: a resize rewrites every per-frame array's metadata
COLUMNS: dict[str, Any] = {schema.FRAMES_DONE: 0, schema.FRAMES_AXIS: np.nan, schema.FRAMES_WORKER: 0}
"""The 1-D per-frame arrays and their fill values."""

class StoreRefused(PipelineError):
    """A store path this daemon must not write (a symbolic link someone planted there)."""


def refuse_symlink(path: Path) -> None:
    """StoreRefused when `path` is a symbolic link: writing through it would write someone else's store."""
    if Path(path).is_symlink():
        raise StoreRefused(f"{path}: a symbolic link (to {os.readlink(path)}), not a store this daemon made; "
                           "not written through (remove it to process the scan)")


class StoreBusy(StoreRefused):
    """Another process holds the store's lock: a store has one writer."""


class StoreLock:
    """An exclusive OS lock (flock) on `<scan>.zarr.lock` beside the store, held for as long as the store is written.

    Beside, not inside: replacing a store deletes what is inside it, and a lock file deleted while held
    would let a second writer lock a new one. The kernel drops the lock when its process dies (kill -9 too);
    the file it leaves is taken by the next writer as any other. Released, the lock file is removed (by its
    holder, before it lets go), so finished stores have nothing beside them; a writer that opened the old
    file just before sees, once it has the lock, that the path no longer names that file, and opens again."""

    ATTEMPTS = 100  # opens before giving up on a lock file that keeps being replaced under us

    def __init__(self, store: Path) -> None:
        self.path = store.with_name(store.name + ".lock")
        self._fd: int | None = None
        self._pid = os.getpid()
        self._guard = threading.Lock()  # the sink's close and the exit handler must not both close the descriptor

    def acquire(self) -> None:
        for _attempt in range(self.ATTEMPTS):
            refuse_symlink(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise StoreBusy(f"{self.path.with_suffix('')}: being written by another process (pid {holder}); "
                                "a store has one writer") from None
            if self._names(fd):
                break
            os.close(fd)  # the file its last holder removed as it let go: a lock on it guards nothing
        else:
            raise StoreBusy(f"{self.path}: replaced {self.ATTEMPTS} times while being locked; a store has one writer")
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(self)
        try:  # who holds it, for the next writer's message; a full disk must not leave the lock held and forgotten
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass

    def _names(self, fd: int) -> bool:
        """Whether the lock path still names the file open as `fd`."""
        try:
            now, held = os.stat(self.path, follow_symlinks=False), os.fstat(fd)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        with self._guard:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            _HELD.discard(self)
            if self._pid == os.getpid():  # a forked child never removes its parent's lock file
                try:  # removed while still held: no other writer holds it now, and any that opened it will open again
                    if self._names(fd):
                        os.unlink(self.path)
                except OSError as error:  # left behind, it is harmless: the next writer locks it as any other
                    log.warning("%s: lock file not removed (%s)", self.path, one_line(error))
            os.close(fd)  # closing the descriptor drops the lock


_HELD: set[StoreLock] = set()  # locks this process holds, let go (and their files removed) when it exits normally


@atexit.register
def _release_held() -> None:
    for lock in list(_HELD):
        lock.release()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ScanStore:
    """The writer side of one scan's store: zarr-python for its metadata, attributes and tables; tensorstore for
    the chunks and shapes of the per-frame arrays (pipeline.store.frame_arrays)."""

    def __init__(self, path: Path, group: zarr.Group, frame_shape: tuple[int, int], fsync: bool = False,
                 created: dict[str, Any] | None = None) -> None:
        """`created`: the nodes of a store just made (`_create`, path -> group or array): what they hold is known, so
        nothing is read back (each zarr-python lookup is a metadata read through its event loop, and a small scan's
        store cost the daemon ~80 ms of CPU, docs/performance.md)."""
        self.path = path
        self.group = group
        self.frame_shape = frame_shape
        self.expected_frames: int | None = None  # what the scan file says it will have, if anything (ensure_frames)
        self.detections: dict[int, list[Detection]] = {}
        self.lock: StoreLock | None = None
        self.frame_arrays = FrameArrays(path, PER_FRAME_ARRAYS, fsync)
        # the tables' groups and columns, found once (a new store's from its creation) and kept: only this writer
        # changes them, and only through these handles (write_columns). Never the per-frame arrays': tensorstore
        # resizes those, and zarr-python writes an array's whole metadata (its shape too) when an attribute changes.
        self._table_nodes: dict[str, Any] = {}
        # each table's columns as this writer knows them to be in the store: a new store's (empty, from the template),
        # then each rewrite's; unknown (a resumed store) until the first rewrite
        self._published: dict[str, dict[str, np.ndarray]] = {}
        # a new store's nodes' metadata as made (the per-frame arrays' before tensorstore resized them): what `finish`
        # consolidates, with what changed since
        self._created: dict[str, Any] | None = None
        if created is not None:
            self._created = {name: node.metadata for name, node in created.items()}
            self._table_nodes = {name: node for name, node in created.items() if _in_table(name)}
            self._published = _empty_tables()
            self.frames_allocated = int(created[schema.FRAMES_DONE].shape[0])
            self.worker_names: list[str] = list(created[schema.FRAMES_WORKER].attrs.get(schema.WORKER_NAMES_ATTR) or [])
            self.columns: dict[str, np.ndarray] = {name: np.full(self.frames_allocated, fill, dtype=created[name].dtype)
                                                   for name, fill in COLUMNS.items()}
            self.written = WrittenFrames(schema.FRAME_ARRAYS)  # a new store: nothing under any frame yet
            return
        self.frames_allocated = int(group[schema.FRAMES_DONE].shape[0])
        if schema.FRAMES_WORKER not in group:  # a store made before workers were recorded
            _create_worker_array(group, self.frames_allocated)
        self.worker_names = list(group[schema.FRAMES_WORKER].attrs.get(schema.WORKER_NAMES_ATTR) or [])
        # the 1-D per-frame arrays, held here whole (a few bytes a frame) so that a batch writes the chunks it touches
        # from memory: no read back, and tensorstore writes whole chunks without reading them first
        self.columns = {name: np.asarray(group[name][:]) for name in COLUMNS}
        # a full disk (or a kill) can stop a resize half way: each array has its own metadata, so some were grown and
        # others not; every array is grown to the longest before anything is written (the columns padded with fill)
        lengths = {name: shape[0] for name, shape in self.frame_arrays.shapes().items()}
        if len(set(lengths.values())) > 1 or self.frames_allocated != max(lengths.values()):
            log.warning("%s: its per-frame arrays have different lengths (%s; a resize cut short); growing all to %d",
                        path, ", ".join(f"{name} {n}" for name, n in sorted(lengths.items())), max(lengths.values()))
            self._resize_frames(max(lengths.values()))
        # what an earlier run wrote is not known frame by frame: every frame it allocated (and the rest of the last
        # shard, which a trim may have left holding frames past the end) is written even when empty
        self.written = WrittenFrames(schema.FRAME_ARRAYS, -(-self.frames_allocated // FRAME_SHARD) * FRAME_SHARD)

    # -- creating and resuming -------------------------------------------------------------

    @classmethod
    def create_or_resume(cls, path: Path, info: ScanInfo, frame_shape: tuple[int, int], attrs: dict[str, Any],
                         fsync: bool = False) -> ScanStore:
        """Resume a store of the same source; replace a store of another source; move an unreadable one aside.
        The store's lock is taken first and held by the returned writer until `close`. With `fsync`, every file
        is on the disk before it counts as written (pipeline.store.durable)."""
        refuse_symlink(path)
        lock = StoreLock(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        try:
            store = cls._create_or_resume(path, info, frame_shape, attrs, fsync)
        except BaseException:
            lock.release()
            raise
        store.lock = lock
        store.expected_frames = info.expected_frames
        return store

    def close(self) -> None:
        """Let another writer have the store (its lock is released)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @classmethod
    def _create_or_resume(cls, path: Path, info: ScanInfo, frame_shape: tuple[int, int], attrs: dict[str, Any],
                          fsync: bool = False) -> ScanStore:
        if path.exists():
            results = 0  # frames done in a store being replaced: kept, moved aside, when there are any
            try:
                group = zarr.open_group(store_for(path, fsync), mode="r+", use_consolidated=False)
                recorded = group.attrs.get(Attr.SOURCE_START_TIME)
                if schema.FRAMES_DONE in group:
                    results = int(np.count_nonzero(group[schema.FRAMES_DONE][:]))
                if group.attrs.get(Attr.SOURCE_FILE) == str(info.source_file) and schema.FRAMES_DONE in group:
                    if recorded and info.start_time and recorded != info.start_time:
                        log.warning("%s: made from an earlier file %s (start_time %s, now %s); replacing it with a fresh store",
                                    path, info.nexus_path, recorded, info.start_time)
                    else:
                        store = cls(path, group, frame_shape, fsync)
                        store._load_detections()
                        group.update_attributes({Attr.STATUS: STATUS_RUNNING, Attr.RESUMED_AT: now_iso()})
                        return store
                elif schema.FRAMES_DONE not in group:
                    log.info("%s: holds no frames (%s); making a fresh store", path, group.attrs.get(Attr.END_REASON, "empty"))
                else:
                    log.warning("%s: belongs to another source (%s); replacing it", path, group.attrs.get(Attr.SOURCE_FILE))
            except Exception as error:  # an unreadable store is never half-trusted, and never deleted: a passing
                # error (EMFILE, a network file system) must not cost hours of results
                if shortage_of(error) is not None:
                    raise  # a full disk or no descriptor says nothing about the store: the scan stalls, the store stays
                aside = path.with_name(f"{path.name}.unreadable-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
                os.rename(path, aside)
                log.warning("%s: unreadable store (%s); moved aside to %s, making a fresh one", path, one_line(error), aside.name)
                return cls._create(path, info, frame_shape, attrs, fsync)
            if results:  # the earlier scan's results are not ours to delete: a renamed-over scan's were lost so
                aside = path.with_name(f"{path.name}.replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
                os.rename(path, aside)
                log.warning("%s: the earlier store (%d frame(s) done) moved aside to %s", path, results, aside.name)
            else:
                shutil.rmtree(path)
        return cls._create(path, info, frame_shape, attrs, fsync)

    @classmethod
    def _create(cls, path: Path, info: ScanInfo, frame_shape: tuple[int, int], attrs: dict[str, Any], fsync: bool = False) -> ScanStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent}: output directory is not writable")
        # the template's metadata, each node with its own attributes: the nodes made from them are this writer's handles,
        # and zarr changes a node's attributes in place (shared, one store's attributes would be written into another's)
        nodes = {path: replace(meta, attributes=copy.deepcopy(meta.attributes)) for path, meta in _new_store_nodes(frame_shape).items()}
        nodes[schema.FRAMES_AXIS] = replace(nodes[schema.FRAMES_AXIS], attributes={schema.AXIS_NAME_ATTR: info.axis_name or ""})
        target = store_for(path, fsync)
        if isinstance(target, Path):
            target = LocalStore(target)
        # created concurrently, metadata only (no chunk yet); the nodes it hands back are used as they are, not looked up
        created: dict[str, Any] = dict(zarr.create_hierarchy(store=target, nodes=nodes, overwrite=True))
        group = created[""]
        group.update_attributes({  # last, as before: a store whose root says `running` has all its nodes
            Attr.SOFTWARE: schema.SOFTWARE,
            Attr.SOFTWARE_VERSION: __version__,
            Attr.SOURCE_NEXUS: str(info.nexus_path),
            Attr.SOURCE_FILE: str(info.source_file),
            Attr.SOURCE_DATASET: info.dataset,
            Attr.SOURCE_START_TIME: info.start_time,
            Attr.LAYOUT: info.layout,
            Attr.SCAN_COMMAND: info.scan_command,
            Attr.FRAMES_EXPECTED: info.expected_frames,
            Attr.AXIS_NAME: info.axis_name,
            Attr.AXIS_PATH: info.axis_path,
            Attr.AXIS_SOURCE: info.axis_source,
            Attr.DETECTOR_PATH: info.detector_path,
            Attr.FRAMES_EXPECTED_SOURCE: info.expected_frames_source,
            Attr.STATUS: STATUS_RUNNING,
            Attr.START_TIME: now_iso(),
            **attrs,
        })
        return cls(path, group, frame_shape, fsync, created)  # its empty tables are in the template

    def _load_detections(self) -> None:
        """The detections of frames already done, from their per-frame rows; later frames will be written again."""
        for frame in range(self.done_prefix()):
            rows = self.group[schema.TLM_BOXES][frame]
            self.detections[frame] = [
                Detection(box=(float(r[0]), float(r[1]), float(r[2]), float(r[3])), score=float(r[4]), instance_id=int(r[5]))
                for r in rows if np.isfinite(r[4])
            ]

    # -- reading back ------------------------------------------------------------------------

    def done_prefix(self) -> int:
        """How many frames from 0 on are done; frames are only ever done as a prefix (3D linking is in order)."""
        done = self.columns[schema.FRAMES_DONE]
        missing = np.flatnonzero(done == 0)
        return int(missing[0]) if missing.size else int(done.shape[0])

    def read_volume(self, index: int) -> np.ndarray:
        return self.group[schema.VOLUME_LABELS][index]

    def read_axis_value(self, index: int) -> float | None:
        value = float(self.columns[schema.FRAMES_AXIS][index])
        return None if np.isnan(value) else value

    def recorded_bad_frames(self) -> dict[str, list[int]]:
        """The `bad_frames` an earlier run recorded ("nan", "inf", "all_zero" -> frames), empty if none."""
        return dict(self.group.attrs.get(Attr.BAD_FRAMES) or {})

    # -- writing -------------------------------------------------------------------------------

    def ensure_frames(self, n: int) -> None:
        """Grow every frame-indexed array to hold `n` frames: by at least half again (at least MIN_GROW_FRAMES, at most
        GROW_FRAMES more), so that a long scan resizes its arrays a few dozen times, not once per batch; `finish` trims
        to the real count. Never past the frames the scan file expects while it has no more than that: a scan that
        ends as expected then needs no trim (8 more metadata writes and shard deletions). The claim only ever lowers
        the growth, so a file claiming millions of frames allocates no more than one claiming none."""
        if n > self.frames_allocated:
            grown = min(self.frames_allocated + GROW_FRAMES, max((3 * self.frames_allocated) // 2, self.frames_allocated + MIN_GROW_FRAMES))
            if self.expected_frames is not None and self.expected_frames >= n:
                grown = min(grown, self.expected_frames)
            self._resize_frames(max(n, grown))

    def _resize_frames(self, n: int) -> None:
        self.frame_arrays.resize({name: n for name in PER_FRAME_ARRAYS})
        for name, fill in COLUMNS.items():
            column = self.columns[name][:n]
            self.columns[name] = np.concatenate([column, np.full(n - column.size, fill, dtype=column.dtype)])
        self.frames_allocated = n

    def _column_write(self, name: str, block: slice) -> tuple[str, slice, np.ndarray]:
        """The write of every chunk of column `name` that `block` touches, whole, from memory."""
        start = block.start - block.start % schema.DONE_CHUNK
        stop = min(self.frames_allocated, -(-block.stop // schema.DONE_CHUNK) * schema.DONE_CHUNK)
        return name, slice(start, stop), self.columns[name][start:stop]

    def _check_present(self) -> None:
        """zarr makes missing directories on write: a store moved or deleted under us must not grow back piecemeal."""
        if not (self.path / schema.ROOT_METADATA).is_file():
            raise FileNotFoundError(f"{self.path}: store deleted or moved while being written")

    def write_predictions(self, predictions: dict[int, FramePrediction], workers: dict[int, str | None] | None = None) -> None:
        """Each frame's masks and boxes (and which worker made them), durable before any done flag; frames next to
        each other go in one write per array, and all the writes at once (tensorstore encodes their chunks in parallel,
        and one shard file takes many frames: ~10x less time per frame than zarr-python, README Speed)."""
        if not predictions:
            return
        self._check_present()
        self.ensure_frames(max(predictions) + 1)
        known = len(self.worker_names)
        writes: list[tuple[str, slice, np.ndarray]] = []
        worker_column = self.columns[schema.FRAMES_WORKER]
        for run in index_runs(sorted(predictions)):
            block = slice(run[0], run[-1] + 1)
            frames = [predictions[i] for i in run]
            writes += self.written.writes(schema.TLM_LABELS, run[0], [p.tlm_labels for p in frames])
            writes += self.written.writes(schema.SSL_CLUSTERS, run[0], [p.ssl_clusters for p in frames])
            writes += self.written.writes(schema.SSL_MASK, run[0], [p.ssl_mask for p in frames])
            writes.append((schema.TLM_BOXES, block, np.stack([self._boxes(i, p) for i, p in zip(run, frames)])))
            worker_column[block] = [self._worker_id((workers or {}).get(i)) for i in run]
        indices = sorted(predictions)
        writes.append(self._column_write(schema.FRAMES_WORKER, slice(indices[0], indices[-1] + 1)))
        self.frame_arrays.write(writes)
        if len(self.worker_names) != known:
            self.group[schema.FRAMES_WORKER].attrs[schema.WORKER_NAMES_ATTR] = self.worker_names

    def _worker_id(self, name: str | None) -> int:
        if not name:
            return 0
        if name not in self.worker_names:
            self.worker_names.append(name[:100])
        return self.worker_names.index(name[:100]) + 1

    def _boxes(self, index: int, prediction: FramePrediction) -> np.ndarray:
        detections = sorted(prediction.detections, key=lambda d: d.instance_id)[:MAX_DETECTIONS_PER_FRAME]
        boxes = np.full((MAX_DETECTIONS_PER_FRAME, len(BOX_FIELDS)), np.nan, dtype=np.float32)
        for row, d in enumerate(detections):
            boxes[row] = (*d.box, d.score, d.instance_id)
        self.detections[index] = detections
        return boxes

    def write_volumes(self, first: int, labels: list[np.ndarray], axis_values: list[float | None], done: list[bool]) -> None:
        """The last writes of frames `first`, `first + 1`, ...: their 3D labels and axis values, then their done
        flags, all in one write each, so a crash anywhere in between leaves no frame marked done too early."""
        if not labels:
            return
        self._check_present()
        block = slice(first, first + len(labels))
        self.ensure_frames(block.stop)
        writes = self.written.writes(schema.VOLUME_LABELS, first, labels)
        if any(value is not None for value in axis_values):
            axis = self.columns[schema.FRAMES_AXIS]
            for offset, value in enumerate(axis_values):
                if value is not None:
                    axis[first + offset] = value
            writes.append(self._column_write(schema.FRAMES_AXIS, block))
        self.frame_arrays.write(writes)
        if any(done):  # only once everything else of these frames is written
            flags = self.columns[schema.FRAMES_DONE]
            flags[block][np.asarray(done, dtype=bool)] = 1
            self.frame_arrays.write([self._column_write(schema.FRAMES_DONE, block)])

    def write_tables(self, peaks: dict[str, np.ndarray], done_frames: Iterable[int] | None = None) -> None:
        """Rewrite `peaks` and `tlm/detections` whole (they are small); readers see old or new columns."""
        self._check_present()
        done_set = None if done_frames is None else set(done_frames)
        rows = [
            (frame, *d.box, d.score, d.instance_id)
            for frame in sorted(self.detections)
            if done_set is None or frame in done_set
            for d in sorted(self.detections[frame], key=lambda d: d.instance_id)
        ]
        table = np.array(rows, dtype=np.float64).reshape(-1, len(DETECTION_COLUMNS))
        tables = {schema.TLM_DETECTIONS: {name: table[:, i].astype(dtype) for i, (name, dtype) in enumerate(DETECTION_COLUMNS.items())}}
        if peaks:
            tables[schema.PEAKS] = peaks
        for name, columns in tables.items():
            # a table the same as the one published (no new rows since: a scan with no peaks, a refresh between peaks)
            # is not rewritten: a rewrite is four metadata writes at least, and readers would see the same rows
            if _same_columns(self._published.get(name), columns):
                continue
            self._published.pop(name, None)  # unknown until written whole (a full disk may stop it half way)
            write_columns(self.group, name, columns, self._table_nodes)
            self._published[name] = {column: np.array(values, copy=True) for column, values in columns.items()}

    def record_disk_full(self, error: str) -> bool:
        """Note that writing stopped for want of space; best effort (the note needs a little space too): False if not."""
        events = [dict(event) for event in self.group.attrs.get(Attr.DISK_FULL, [])]
        events.append({"at": now_iso(), "error": error})
        try:
            self.group.attrs[Attr.DISK_FULL] = events
        except OSError as failure:
            log.warning("%s: could not note the full disk in the store either (%s)", self.path, one_line(failure))
            return False
        return True

    def record_resumed_after_disk_full(self, error: str) -> None:
        """Close the last disk-full note with when writing resumed (adding the note if it could not be written then)."""
        events = [dict(event) for event in self.group.attrs.get(Attr.DISK_FULL, [])]
        if not events or "resumed_at" in events[-1]:
            events.append({"at": None, "error": error})
        events[-1]["resumed_at"] = now_iso()
        self.group.attrs[Attr.DISK_FULL] = events

    def finish(self, status: str, reason: str, frames_total: int, extra: dict[str, Any] | None = None) -> None:
        """Trim to the frames the scan has, record how it ended, and consolidate the metadata."""
        self._check_present()
        if frames_total < self.frames_allocated:
            self._resize_frames(frames_total)
        attributes = {
            Attr.STATUS: status,
            Attr.END_REASON: reason,
            Attr.END_TIME: now_iso(),
            Attr.FRAMES_TOTAL: frames_total,
            Attr.FRAMES_DONE: self.done_prefix(),
            **(extra or {}),
        }
        consolidated = self._consolidated()
        if consolidated is not None:  # the ending and the consolidated metadata in one write of the root document
            self.group.metadata.attributes.update(attributes)
            zarr.Group(zarr.AsyncGroup(metadata=replace(self.group.metadata, consolidated_metadata=consolidated),
                                       store_path=self.group.store_path)).update_attributes({})
            return
        self.group.update_attributes(attributes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.path)

    def _consolidated(self) -> Any:
        """The consolidated metadata of a store this writer made, from what it knows (zarr.consolidate_metadata reads
        every node's document back: ~30 reads and 7 listings, the largest part of a small scan's end), or None for a
        resumed store (its nodes are read back, as zarr does). The same documents: the template's nodes, the per-frame
        arrays at their final length, the attributes this writer gave them, the tables as last written
        (tests/test_store_consolidated.py compares it with zarr.consolidate_metadata's)."""
        if self._created is None:
            return None
        try:
            from zarr.core.group import ConsolidatedMetadata, GroupMetadata

            # in path order: zarr nests the flat listing by runs of siblings, which the order of creation does not keep
            members = {path: meta for path, meta in sorted(self._created.items()) if path}
            for name in PER_FRAME_ARRAYS:
                meta = members[name]
                members[name] = replace(meta, shape=(self.frames_allocated, *meta.shape[1:]))
            worker = members[schema.FRAMES_WORKER]
            members[schema.FRAMES_WORKER] = replace(worker, attributes={**worker.attributes, schema.WORKER_NAMES_ATTR: self.worker_names})
            members.update((path, node.metadata) for path, node in self._table_nodes.items())
            for path, meta in members.items():  # as zarr.consolidate_metadata marks groups: their children are listed too
                if isinstance(meta, GroupMetadata) and meta.consolidated_metadata is None:
                    members[path] = replace(meta, consolidated_metadata=ConsolidatedMetadata(metadata={}))
            ConsolidatedMetadata._flat_to_nested(members)
            return ConsolidatedMetadata(metadata=members)
        except (AttributeError, TypeError, KeyError) as error:  # another zarr's internals: read back as zarr does
            log.debug("%s: consolidated metadata read back (%s)", self.path, error)
            return None


def write_columns(root: zarr.Group, group_name: str, columns: dict[str, np.ndarray], handles: dict[str, Any] | None = None) -> None:
    """Published as one generation: the group's `generation` turns odd, the columns are written, then `rows` and the
    next even `generation` are written together (readers retry a read that straddled a rewrite; see StoreReader.table).
    After a crash mid-rewrite, rows below `rows` are still valid (new rows only ever follow the old ones).

    `handles`, kept by the store's one writer between rewrites, holds the group and columns found the first time:
    looking them up again cost zarr-python a metadata read each (and one more to ask whether a column exists), most
    of the daemon's CPU per small scan (docs/performance.md). Only this writer changes them, so they stay true."""
    handles = {} if handles is None else handles
    group = handles.get(group_name)
    if group is None:
        group = handles[group_name] = root[group_name]
    published = int(group.attrs.get(schema.GENERATION_ATTR, 0))
    published += published % 2  # a rewrite that a crash interrupted counts as published
    group.attrs[schema.GENERATION_ATTR] = published + 1
    for name, values in columns.items():
        values = np.asarray(values)
        key = f"{group_name}/{name}"
        array = handles.get(key)
        if array is None and name in group:
            array = group[name]
        if array is not None and array.dtype == values.dtype:
            if array.shape != values.shape:  # a resize rewrites the column's zarr.json: not for the same shape
                array.resize(values.shape)
        else:
            array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(max(4096, values.shape[0]),),
                                       dimension_names=schema.ROW_DIMS, overwrite=True)
        handles[key] = array
        if values.size:
            array[:] = values
    group.update_attributes({schema.ROWS_ATTR: int(next(iter(columns.values())).shape[0]) if columns else 0,
                        schema.GENERATION_ATTR: published + 2})


@functools.lru_cache(maxsize=8)
def _new_store_nodes(frame_shape: tuple[int, int]) -> dict[str, Any]:
    """The metadata of every node of a new store of this frame shape (its arrays empty, its tables with no rows), made
    once per shape with zarr in memory. Why: creating the store node by node cost the daemon ~55 ms of CPU per scan
    (create_array checks and writes each node in turn); zarr.create_hierarchy writes these documents at once."""
    group = zarr.open_group(MemoryStore(), mode="w", zarr_format=schema.ZARR_FORMAT)
    n = 0  # grown with the frames that exist, never sized from what the file claims (scan_shape can say anything)
    height, width = frame_shape
    for name, dtype in FRAME_ARRAYS.items():
        group.create_array(name, shape=(n, height, width), chunks=(1, height, width), shards=(FRAME_SHARD, height, width),
                           dtype=dtype, fill_value=0, dimension_names=FRAME_DIMS)
    group.create_array(schema.TLM_BOXES, shape=(n, MAX_DETECTIONS_PER_FRAME, len(BOX_FIELDS)),
                       chunks=(1, MAX_DETECTIONS_PER_FRAME, len(BOX_FIELDS)),
                       shards=(FRAME_SHARD, MAX_DETECTIONS_PER_FRAME, len(BOX_FIELDS)), dtype="float32", fill_value=float("nan"),
                       dimension_names=schema.BOX_DIMS, attributes={schema.BOX_FIELDS_ATTR: list(BOX_FIELDS)})
    group.create_array(schema.FRAMES_DONE, shape=(n,), chunks=(schema.DONE_CHUNK,), dtype="uint8", fill_value=0,
                       dimension_names=FRAME_DIMS[:1])
    group.create_array(schema.FRAMES_AXIS, shape=(n,), chunks=(schema.DONE_CHUNK,), dtype="float64", fill_value=float("nan"),
                       dimension_names=FRAME_DIMS[:1], attributes={schema.AXIS_NAME_ATTR: ""})
    _create_worker_array(group, n)
    for table in schema.TABLES:
        group.require_group(table)
    # both tables' columns, with no rows (the peaks table's too: its rewrites then resize them, instead of creating each
    # one, an existence check and a metadata write apiece, the first time a scan's tables are written)
    for table, columns in _empty_tables().items():
        write_columns(group, table, columns)
    nodes: dict[str, Any] = {"": group.metadata}
    nodes.update((path, node.metadata) for path, node in group.members(max_depth=None))
    return nodes


def _empty_tables() -> dict[str, dict[str, np.ndarray]]:
    """The columns of both tables with no rows, as a new store holds them."""
    return {schema.TLM_DETECTIONS: {name: np.zeros(0, dtype) for name, dtype in DETECTION_COLUMNS.items()},
            schema.PEAKS: VolumeLinker(min_pixels=1).table()}


def _same_columns(known: dict[str, np.ndarray] | None, columns: dict[str, np.ndarray]) -> bool:
    """Whether `columns` are exactly `known` (names, order, dtypes, shapes and bytes: NaN equals NaN)."""
    if known is None or list(known) != list(columns):
        return False
    for name, values in columns.items():
        values, old = np.asarray(values), known[name]
        if values.dtype != old.dtype or values.shape != old.shape or values.tobytes() != old.tobytes():
            return False
    return True


def _in_table(path: str) -> bool:
    """Whether a node path is a table's group or one of its columns (`peaks`, `peaks/id`; not `tlm/labels`)."""
    return any(path == table or path.startswith(table + "/") for table in schema.TABLES)


def _create_worker_array(group: zarr.Group, n: int) -> None:
    group.create_array(schema.FRAMES_WORKER, shape=(n,), chunks=(schema.DONE_CHUNK,), dtype="uint16", fill_value=0,
                       dimension_names=FRAME_DIMS[:1], attributes={schema.WORKER_NAMES_ATTR: []})


def mark_failed(path: Path, reason: str, source: Path | None = None, start_time: str | None = None,
                make_parents: bool = False) -> bool:
    """Record in the scan's store that it failed, making a bare store if there was none, so a reader learns why.

    `source` (the scan file) and its NeXus `start_time` let `store_made_from` tell this file from a
    later one of the same name. The store's directory is made only with `make_parents`: a directory
    that has gone (renamed away, unmounted) is not brought back. False (and a log line) when no
    store can be written there.
    """
    path = Path(path)
    if path.is_symlink():
        log.error("%s: a symbolic link, not a store this daemon made; the failure is not recorded through it", path)
        return False
    if not make_parents and not path.parent.is_dir():
        log.error("%s: cannot record the failure in the store (its directory %s has gone)", path, path.parent)
        return False
    try:
        group = zarr.open_group(path, mode="a", use_consolidated=False)
        attrs: dict[str, Any] = {Attr.STATUS: STATUS_FAILED, Attr.END_REASON: reason, Attr.END_TIME: now_iso()}
        if source is not None:
            attrs.setdefault(Attr.SOURCE_NEXUS, str(source))
            attrs[Attr.SOURCE_STAT] = stat_identity(source)
            if start_time and not group.attrs.get(Attr.SOURCE_START_TIME):
                attrs[Attr.SOURCE_START_TIME] = start_time
        group.update_attributes(attrs)
    except Exception as error:  # e.g. an unwritable output directory: the log line is all we can leave
        log.error("%s: cannot record the failure in the store (%s)", path, one_line(error))
        return False
    return True
