"""Reading a scan's store, also while it is still being written: the one reader every picture and tool uses.

Two rules make a live store safe to read: open it without consolidated metadata (the
consolidated copy is written only when the scan is over, and before that it shows the past),
and trust only frames whose `frames/done` is 1. Raw frames come from the scan's own HDF5 file
(the store's `source_file` and `source_dataset`), opened without locks so the detector's
writer is never blocked, one frame at a time so memory does not grow with the scan.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

import pipeline.store.schema as schema
from pipeline.common.shared_datasets import acquire_dataset, release_dataset
from pipeline.errors import PipelineError, one_line
from pipeline.store.schema import Attr

TABLE_READ_ATTEMPTS = 200  # a rewrite takes milliseconds; after this many tries (about 2 s) the writer is taken for dead
TABLE_RETRY_S = 0.01
# float32 model outputs (boxes in pixels, scores) of one frame differ in their last bits with the batch the frame was
# inferred in (the CPU's kernels block the work by batch size: a soak saw a box corner at 0.303759 px live, 0.303762
# offline); masks and labels must be equal exactly, table floats to this
TABLE_RTOL, TABLE_ATOL = 1e-5, 1e-4


class StoreError(PipelineError, ValueError):
    """A store, frame or raw file that cannot be shown; the message is one line for the user."""

    exit_code = 2


def read_attributes(store: Path, follow_symlinks: bool = True) -> dict[str, Any] | None:
    """The root group's attributes straight from its metadata document (cheap, no zarr), or None without one
    (or, with `follow_symlinks=False`, when the store path is a symbolic link: not a store of ours)."""
    if not follow_symlinks and Path(store).is_symlink():
        return None
    try:
        attributes = json.loads((Path(store) / schema.ROOT_METADATA).read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    return attributes if isinstance(attributes, dict) else None


def store_status(store: Path, follow_symlinks: bool = True) -> str | None:
    """The status recorded in an existing store, or None when there is no readable store."""
    attributes = read_attributes(store, follow_symlinks)
    return None if attributes is None else attributes.get(Attr.STATUS)


def open_live(path: Path, confined: bool = False) -> zarr.Group:
    """Open a store that may still be written: never trust consolidated metadata there. `confined`: a store someone
    else may have planted (the web view's): no link inside it followed, only regular files read, each no longer than
    its chunk can be (pipeline.store.confined)."""
    if confined:
        from pipeline.store.confined import ConfinedLocalStore

        return zarr.open_group(ConfinedLocalStore(path), mode="r", use_consolidated=False)
    return zarr.open_group(path, mode="r", use_consolidated=False)


def scan_name(store_path: Path) -> str:
    """`scan1` for `.../scan1.zarr`."""
    return Path(store_path).name.removesuffix(".zarr")


QUICKLOOK_SUFFIX = ".quicklook.png"


def beside_store(store_path: Path, suffix: str) -> Path:
    """`<scan><suffix>` in the folder that holds the store, e.g. `scan1.quicklook.png` for `.../scan1.zarr`."""
    return Path(store_path).parent / f"{scan_name(store_path)}{suffix}"


@dataclass(frozen=True)
class FrameDetections:
    """The TLM table rows of one frame."""

    boxes: np.ndarray  # float32 (n, 4): x0, y0, x1, y1
    scores: np.ndarray  # float32 (n,)
    instance_ids: np.ndarray  # (n,)


class StoreReader:
    """One scan store, opened as a live store; a clear StoreError if it is not a scan store. `confined`: see open_live."""

    def __init__(self, path: Path, confined: bool = False) -> None:
        self.path = Path(path)
        self.confined = confined
        if not (self.path / schema.ROOT_METADATA).is_file():
            raise StoreError(f"{self.path}: not a Zarr store (no {schema.ROOT_METADATA} there)")
        try:
            self.group = open_live(self.path, confined)
        except (ValueError, KeyError, OSError) as error:  # an array, not a group; a damaged zarr.json
            raise StoreError(f"{self.path}: not a scan store ({one_line(error)})") from None
        missing = [name for name in (schema.FRAMES_DONE, schema.VOLUME_LABELS) if name not in self.group]
        if missing:
            status = self.attrs.get(Attr.STATUS, "unknown")
            reason = self.attrs.get(Attr.END_REASON)
            why = f" (status {status}: {reason})" if reason else f" (status {status})"
            raise StoreError(f"{self.path}: a store without {', '.join(missing)}; nothing to show{why}")

    @property
    def name(self) -> str:
        return scan_name(self.path)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def status(self) -> str:
        return str(self.group.attrs.get(Attr.STATUS, "unknown"))

    def output_path(self, suffix: str) -> Path:
        """`<scan><suffix>` in the folder that holds the store, e.g. `scan1.quicklook.png`."""
        return beside_store(self.path, suffix)

    # -- frames ------------------------------------------------------------------------------

    @property
    def frames_total(self) -> int:
        """Frames the store holds, done or not."""
        return int(self.group[schema.FRAMES_DONE].shape[0])

    def done_frames(self) -> np.ndarray:
        """Indices of the frames whose every output is written (the only ones a live reader may trust)."""
        return np.flatnonzero(self.group[schema.FRAMES_DONE][:] == 1)

    def array(self, path: str) -> zarr.Array | None:
        """A per-frame array of the schema (`schema.TLM_LABELS`, ...), or None when this store has none."""
        return self.group[path] if path in self.group else None

    def check_frame(self, frame: int) -> None:
        """A StoreError naming the problem unless `frame` exists in the store and is done."""
        total = self.frames_total
        if not 0 <= frame < total:
            raise StoreError(f"{self.path.name}: frame {frame} is out of range (the store has frames 0..{total - 1})"
                             if total else f"{self.path.name}: frame {frame} is out of range (the store has no frames yet)")
        if self.group[schema.FRAMES_DONE][frame] != 1:
            raise StoreError(f"{self.path.name}: frame {frame} is not done yet (its outputs are not final)")

    def scan_axis(self, frames: np.ndarray) -> tuple[str, np.ndarray]:
        """The scan axis name and its value at `frames`; the frame index where the axis is missing."""
        axis = self.array(schema.FRAMES_AXIS)
        if axis is not None and frames.size:
            values = axis[:][frames]
            if np.isfinite(values).all():
                return str(axis.attrs.get(schema.AXIS_NAME_ATTR) or "scan axis"), values.astype(np.float64)
        return "frame", frames.astype(np.float64)

    # -- tables ------------------------------------------------------------------------------

    def table(self, name: str) -> dict[str, np.ndarray]:
        """A table (`schema.PEAKS`, `schema.TLM_DETECTIONS`) as column name -> values, one whole generation of it
        (never columns of two rewrites: see schema.GENERATION_ATTR); empty before its first write."""
        if name not in self.group:
            return {}
        for _ in range(TABLE_READ_ATTEMPTS):
            before = self._table_generation(name)
            if before is None:  # a store from before generations: as it is
                return self._table_columns(name)
            if before % 2 == 0:
                columns = self._table_columns(name)
                if self._table_generation(name) == before:
                    return columns
            time.sleep(TABLE_RETRY_S)
        # the mark stayed odd: a writer stopped mid-rewrite (killed); the rows below `rows` are still valid
        rows = self.table_rows(name)
        return {column: values[:rows] for column, values in self._table_columns(name).items()}

    def _table_generation(self, name: str) -> int | None:
        """The table's generation mark as on disk now (the group object's attributes are a copy from when it was opened)."""
        try:
            if self.confined:
                document = self.group.store.get_sync(f"{name}/zarr.json")
                attributes = json.loads(document.to_bytes() if document is not None else b"{}").get("attributes", {})
            else:
                attributes = json.loads((self.path / name / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            return None
        generation = attributes.get(schema.GENERATION_ATTR)
        return int(generation) if isinstance(generation, int) else None

    def _table_columns(self, name: str) -> dict[str, np.ndarray]:
        """Opened by name: listing the table's folder while the writer renames a `zarr.<uuid>.partial` into place
        made zarr warn (`not recognized as a component`) into the log of whoever reads a live store."""
        table = self.group[name]
        columns = {}
        for column in schema.TABLE_COLUMNS.get(name, ()):
            try:
                columns[column] = table[column][:]
            except KeyError:  # a column this store's version did not write
                continue
        return columns

    def table_rows(self, name: str) -> int:
        """How many rows of a table are valid (its `rows` attribute, written after the columns): cheap, no column read."""
        if name not in self.group:
            return 0
        return int(self.group[name].attrs.get(schema.ROWS_ATTR, 0) or 0)

    def frame_detections(self, frame: int) -> FrameDetections:
        """Rows of `tlm/detections` for `frame` (empty when the table is missing or has none)."""
        table = self.table(schema.TLM_DETECTIONS)
        if "frame" not in table:
            return FrameDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.uint16))
        rows = np.flatnonzero(table["frame"] == frame)
        boxes = np.stack([table[name][rows] for name in ("x0", "y0", "x1", "y1")], axis=1).astype(np.float32).reshape(-1, 4)
        return FrameDetections(boxes, table["score"][rows], table["instance_id"][rows])

    # -- the raw frames ------------------------------------------------------------------------

    def source_path(self) -> Path:
        """The raw frames' file; also found when scan and store were moved together to another folder."""
        recorded = self.group.attrs.get(Attr.SOURCE_FILE)
        if not recorded:
            raise StoreError(f"{self.path}: the store does not name its raw file (attribute {Attr.SOURCE_FILE})")
        recorded_path = Path(str(recorded))
        candidates = [recorded_path if recorded_path.is_absolute() else self.path.parent / recorded_path]
        nexus = self.group.attrs.get(Attr.SOURCE_NEXUS)
        if nexus and recorded_path.is_absolute():
            try:  # keep the raw file's place relative to the .nxs, next to where the store is now
                candidates.append(self.path.parent / recorded_path.relative_to(Path(str(nexus)).parent))
            except ValueError:
                pass
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise StoreError(f"{self.path}: raw file {recorded} not found (moved or deleted?)")

    @contextmanager
    def raw_frames(self, roots: Sequence[Path] | None = None) -> Iterator[h5py.Dataset]:
        """The raw frame dataset, opened without locks so the detector's writer is never blocked.

        With `roots` (a server that shows stores to others: anyone can plant a store, and a store names
        its raw file), pixels come only from files under them: the raw file, the file an external link
        led to, and any virtual source or external storage behind the dataset are checked before a pixel is read."""
        from pipeline.live.confinement import dataset_outside, is_inside, links_outside

        def check_links(handle: h5py.File) -> None:  # before HDF5 follows a link of the raw file to the frames
            problem = None if roots is None else links_outside(handle, path, roots)
            if problem is not None:
                raise StoreError(problem)

        path = self.source_path()
        if roots is not None and not is_inside(path, roots):
            raise StoreError(f"{self.path.name}: raw file {path} is outside the allowed roots; not read")
        dataset_name = self.group.attrs.get(Attr.SOURCE_DATASET)
        if not dataset_name:
            raise StoreError(f"{self.path}: the store does not name its raw dataset (attribute {Attr.SOURCE_DATASET})")
        try:
            # the daemon's follower may hold it: share, never open twice
            dataset = acquire_dataset(path, str(dataset_name), check=check_links)
        except OSError as error:
            raise StoreError(f"{path}: cannot read the raw file ({one_line(error)})") from None
        except LookupError:
            raise StoreError(f"{self.path}: raw dataset {dataset_name!r} not in {path}") from None
        try:
            if roots is not None:
                holder = Path(dataset.file.filename)  # another file when the dataset is an external link
                if not is_inside(holder, roots):
                    raise StoreError(f"{path}:{dataset_name} leads to {holder}, outside the allowed roots; not read")
                problem = dataset_outside(dataset, holder, roots)
                if problem is not None:
                    raise StoreError(problem)
            if dataset.file.swmr_mode:
                dataset.refresh()  # a file still being written: see its current length
            yield dataset
        finally:
            release_dataset(dataset)


def require_raw_frame(dataset: h5py.Dataset, index: int) -> None:
    """StoreError unless the raw file holds frame `index` (a store can name more frames than its raw file has)."""
    if index >= dataset.shape[0]:
        raise StoreError(f"frame {index} is not in the raw file ({dataset.shape[0]} frames there)")


def read_raw_frame(dataset: h5py.Dataset, index: int) -> np.ndarray:
    """One raw frame as float64 counts, dead pixels (-2) and other negatives clipped to 0."""
    require_raw_frame(dataset, index)
    return np.clip(np.asarray(dataset[index], dtype=np.float64), 0, None)


def stores_difference(first: Path, second: Path) -> str | None:
    """None when two stores hold the same frames and tables; else the first difference, in words."""
    a, b = open_live(first), open_live(second)
    for name in schema.COMPARED_ARRAYS:
        x_array, y_array = a[name], b[name]
        if x_array.shape != y_array.shape:
            return f"{name}: shape {x_array.shape} != {y_array.shape}"
        for index in range(x_array.shape[0]):
            if not np.array_equal(x_array[index], y_array[index], equal_nan=x_array.dtype.kind == "f"):
                return f"{name}: frame {index} differs"
    for table in schema.TABLES:
        keys_a, keys_b = sorted(a[table].array_keys()), sorted(b[table].array_keys())
        if keys_a != keys_b:
            return f"{table}: columns {keys_a} != {keys_b}"
        for column in keys_a:
            x, y = a[table][column][:], b[table][column][:]
            if x.shape != y.shape or not np.allclose(x, y, rtol=TABLE_RTOL, atol=TABLE_ATOL, equal_nan=True):
                return f"{table}/{column} differs"
    return None
