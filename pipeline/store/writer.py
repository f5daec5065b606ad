"""One Zarr v3 store per scan, in the layout of the design notes, written by one thread only.

Write order is what makes a live store trustworthy: a frame's masks and its 3D labels are written
first, `frames/done[frame] = 1` last, so a reader (or a resumed daemon) can take every done frame
as final. The tables (`tlm/detections`, `peaks`) are rewritten whole from memory, sorted, holding
done frames only; metadata is consolidated only once the scan is over, so live readers must open
with `use_consolidated=False`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import __version__
from pipeline.live.follow import ScanInfo, read_scan_identity
from pipeline.models.prediction import Detection, FramePrediction

log = logging.getLogger(__name__)

FRAME_DIMS = ("frame", "y", "x")
FRAME_ARRAYS = {  # path -> dtype, all (frame, y, x), one frame per chunk
    "tlm/labels": "uint16",
    "ssl/clusters": "uint8",
    "ssl/mask": "uint8",
    "volume/labels": "uint32",
}
MAX_DETECTIONS_PER_FRAME = 256
BOX_FIELDS = ("x0", "y0", "x1", "y1", "score", "instance_id")  # tlm/boxes: per frame, NaN-padded rows
DETECTION_COLUMNS = {"frame": "int64", "x0": "float32", "y0": "float32", "x1": "float32", "y1": "float32", "score": "float32", "instance_id": "uint16"}
STATUS_RUNNING, STATUS_COMPLETE, STATUS_INCOMPLETE, STATUS_FAILED = "running", "complete", "incomplete", "failed"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_path_for(nexus_path: Path, output_root: Path | None, roots: Iterable[Path] | None = None) -> Path:
    """Where a scan's store goes: the same answer every time, for the daemon, `pipeline process` and a resume.

    - Without `output.root`: `<scan>.zarr` beside `<scan>.nxs`.
    - With `output.root`: `<root>/<dir>/<scan>.zarr`, where `<dir>` is the scan's directory relative to
      the watched directories `roots` (`watch.dirs`; with several, relative to the deepest directory
      they all lie in), so that two scans of the same name in different directories never share a
      store. Watching `/data/cm1` with output root `/out`: `/data/cm1/1234.nxs` -> `/out/1234.zarr`,
      `/data/cm1/sample2/1234.nxs` -> `/out/sample2/1234.zarr`. Watching `/data/cm1` and `/data/cm2`:
      `/data/cm2/1234.nxs` -> `/out/cm2/1234.zarr`. A scan outside every watched directory (or with no
      `roots` given) goes to `<root>/<scan>.zarr`.
    """
    nexus_path = Path(nexus_path)
    if output_root is None:
        return nexus_path.with_suffix(".zarr")
    name = nexus_path.with_suffix(".zarr").name
    relative = _relative_dir(nexus_path.parent, [Path(r) for r in roots or []])
    return Path(output_root) / relative / name


def _relative_dir(directory: Path, roots: list[Path]) -> Path:
    """`directory` relative to the common base of `roots`, or `.` when it is not inside it."""
    if not roots:
        return Path(".")
    for resolve in (os.path.abspath, os.path.realpath):  # as configured first, then with links resolved
        base = Path(os.path.commonpath([resolve(r) for r in roots]))
        try:
            return Path(resolve(directory)).relative_to(base)
        except ValueError:
            continue
    return Path(".")


def store_made_from(store: Path, nexus_path: Path) -> bool:
    """Whether the existing store was made from the file now at `nexus_path`, not from an earlier file of the same
    name that has since been replaced: by the NeXus `start_time` and `scan_command` it recorded, else by the file's
    inode, size and modification time recorded when it failed. A store that records neither counts as made from it."""
    try:
        attrs = json.loads((Path(store) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    if attrs.get("source_start_time"):
        now = read_scan_identity(nexus_path)
        return now is not None and now["start_time"] == attrs["source_start_time"] and (
            not attrs.get("scan_command") or now["scan_command"] == attrs["scan_command"])
    if attrs.get("source_stat"):
        return attrs["source_stat"] == _stat_identity(nexus_path)
    return True


def _stat_identity(path: Path) -> list[int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_ino, status.st_size, status.st_mtime_ns]


def open_live(path: Path) -> zarr.Group:
    """Open a store that may still be written: never trust consolidated metadata there."""
    return zarr.open_group(path, mode="r", use_consolidated=False)


class ScanStore:
    """The writer side of one scan's store."""

    def __init__(self, path: Path, group: zarr.Group, frame_shape: tuple[int, int]) -> None:
        self.path = path
        self.group = group
        self.frame_shape = frame_shape
        self.frames_allocated = int(group["frames/done"].shape[0])
        self.detections: dict[int, list[Detection]] = {}

    # -- creating and resuming -------------------------------------------------------------

    @classmethod
    def create_or_resume(cls, path: Path, info: ScanInfo, frame_shape: tuple[int, int], attrs: dict[str, Any]) -> "ScanStore":
        """Resume a store of the same source; replace a store of another source or a broken one."""
        if path.exists():
            try:
                group = zarr.open_group(path, mode="r+", use_consolidated=False)
                recorded = group.attrs.get("source_start_time")
                if group.attrs.get("source_file") == str(info.source_file) and "frames/done" in group:
                    if recorded and info.start_time and recorded != info.start_time:
                        log.warning("%s: made from an earlier file %s (start_time %s, now %s); replacing it with a fresh store",
                                    path, info.nexus_path, recorded, info.start_time)
                    else:
                        store = cls(path, group, frame_shape)
                        store._load_detections()
                        group.attrs.update({"status": STATUS_RUNNING, "resumed_at": now_iso()})
                        return store
                elif "frames/done" not in group:
                    log.info("%s: holds no frames (%s); making a fresh store", path, group.attrs.get("end_reason", "empty"))
                else:
                    log.warning("%s: belongs to another source (%s); replacing it", path, group.attrs.get("source_file"))
            except Exception as error:  # an unreadable store is rebuilt, never half-trusted
                log.warning("%s: unreadable store (%s); replacing it", path, str(error).splitlines()[0])
            shutil.rmtree(path)
        return cls._create(path, info, frame_shape, attrs)

    @classmethod
    def _create(cls, path: Path, info: ScanInfo, frame_shape: tuple[int, int], attrs: dict[str, Any]) -> "ScanStore":
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent}: output directory is not writable")
        group = zarr.open_group(path, mode="w", zarr_format=3)
        n = info.expected_frames or 0
        height, width = frame_shape
        for name, dtype in FRAME_ARRAYS.items():
            group.create_array(name, shape=(n, height, width), chunks=(1, height, width), dtype=dtype, fill_value=0, dimension_names=FRAME_DIMS)
        group.create_array("tlm/boxes", shape=(n, MAX_DETECTIONS_PER_FRAME, len(BOX_FIELDS)), chunks=(1, MAX_DETECTIONS_PER_FRAME, len(BOX_FIELDS)),
                           dtype="float32", fill_value=float("nan"), dimension_names=("frame", "detection", "field"),
                           attributes={"fields": list(BOX_FIELDS)})
        group.create_array("frames/done", shape=(n,), chunks=(4096,), dtype="uint8", fill_value=0, dimension_names=("frame",))
        group.create_array("frames/axis", shape=(n,), chunks=(4096,), dtype="float64", fill_value=float("nan"), dimension_names=("frame",),
                           attributes={"name": info.axis_name or ""})
        group.require_group("peaks")
        group.require_group("tlm/detections")
        group.attrs.update({
            "software": "beamline-peak-pipeline",
            "software_version": __version__,
            "source_nexus": str(info.nexus_path),
            "source_file": str(info.source_file),
            "source_dataset": info.dataset,
            "source_start_time": info.start_time,
            "layout": info.layout,
            "scan_command": info.scan_command,
            "frames_expected": info.expected_frames,
            "axis_name": info.axis_name,
            "status": STATUS_RUNNING,
            "start_time": now_iso(),
            **attrs,
        })
        store = cls(path, group, frame_shape)
        store.write_tables({}, [])
        return store

    def _load_detections(self) -> None:
        """The detections of frames already done, from their per-frame rows; later frames will be written again."""
        for frame in range(self.done_prefix()):
            rows = self.group["tlm/boxes"][frame]
            self.detections[frame] = [
                Detection(box=(float(r[0]), float(r[1]), float(r[2]), float(r[3])), score=float(r[4]), instance_id=int(r[5]))
                for r in rows if np.isfinite(r[4])
            ]

    # -- reading back ------------------------------------------------------------------------

    def done_prefix(self) -> int:
        """How many frames from 0 on are done; frames are only ever done as a prefix (3D linking is in order)."""
        done = self.group["frames/done"][:]
        missing = np.flatnonzero(done == 0)
        return int(missing[0]) if missing.size else int(done.shape[0])

    def read_volume(self, index: int) -> np.ndarray:
        return self.group["volume/labels"][index]

    # -- writing -------------------------------------------------------------------------------

    def ensure_frames(self, n: int) -> None:
        """Grow every frame-indexed array to hold `n` frames (scans without a known length)."""
        if n > self.frames_allocated:
            self._resize_frames(n)

    def _resize_frames(self, n: int) -> None:
        height, width = self.frame_shape
        for name in FRAME_ARRAYS:
            self.group[name].resize((n, height, width))
        self.group["tlm/boxes"].resize((n, MAX_DETECTIONS_PER_FRAME, len(BOX_FIELDS)))
        self.group["frames/done"].resize((n,))
        self.group["frames/axis"].resize((n,))
        self.frames_allocated = n

    def _check_present(self) -> None:
        """zarr makes missing directories on write: a store moved or deleted under us must not grow back piecemeal."""
        if not (self.path / "zarr.json").is_file():
            raise FileNotFoundError(f"{self.path}: store deleted or moved while being written")

    def write_predictions(self, predictions: dict[int, FramePrediction]) -> None:
        """Each frame's masks and boxes, durable before any done flag; frames next to each other go in one
        write per array (zarr then encodes their chunks together: ~4x less time per frame than one by one)."""
        if not predictions:
            return
        self._check_present()
        self.ensure_frames(max(predictions) + 1)
        for run in _runs(sorted(predictions)):
            block = slice(run[0], run[-1] + 1)
            frames = [predictions[i] for i in run]
            self.group["tlm/labels"][block] = np.stack([p.tlm_labels for p in frames])
            self.group["ssl/clusters"][block] = np.stack([p.ssl_clusters for p in frames])
            self.group["ssl/mask"][block] = np.stack([p.ssl_mask for p in frames])
            self.group["tlm/boxes"][block] = np.stack([self._boxes(i, p) for i, p in zip(run, frames)])

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
        self.group["volume/labels"][block] = np.stack(labels)
        if any(value is not None for value in axis_values):
            axis = self.group["frames/axis"][block]
            for offset, value in enumerate(axis_values):
                if value is not None:
                    axis[offset] = value
            self.group["frames/axis"][block] = axis
        if any(done):
            flags = self.group["frames/done"][block]
            flags[np.asarray(done, dtype=bool)] = 1
            self.group["frames/done"][block] = flags

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
        self._write_columns("tlm/detections", {name: table[:, i].astype(dtype) for i, (name, dtype) in enumerate(DETECTION_COLUMNS.items())})
        if peaks:
            self._write_columns("peaks", peaks)

    def _write_columns(self, group_name: str, columns: dict[str, np.ndarray]) -> None:
        """Columns first, then the group's `rows` attribute: rows below it are always valid, even after a crash
        (new rows only ever follow the old ones, because done frames only grow)."""
        group = self.group[group_name]
        for name, values in columns.items():
            values = np.asarray(values)
            if name in group and group[name].dtype == values.dtype:
                array = group[name]
                array.resize(values.shape)
            else:
                array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(max(4096, values.shape[0]),),
                                           dimension_names=("row",), overwrite=True)
            if values.size:
                array[:] = values
        group.attrs["rows"] = int(next(iter(columns.values())).shape[0]) if columns else 0

    def finish(self, status: str, reason: str, frames_total: int, extra: dict[str, Any] | None = None) -> None:
        """Trim to the frames the scan has, record how it ended, and consolidate the metadata."""
        self._check_present()
        if frames_total < self.frames_allocated:
            self._resize_frames(frames_total)
        self.group.attrs.update({
            "status": status,
            "end_reason": reason,
            "end_time": now_iso(),
            "frames_total": frames_total,
            "frames_done": self.done_prefix(),
            **(extra or {}),
        })
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.path)


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted frame indices as runs of neighbours: [1, 2, 3, 7, 8] -> [[1, 2, 3], [7, 8]]."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def mark_failed(path: Path, reason: str, source: Path | None = None, start_time: str | None = None,
                make_parents: bool = False) -> bool:
    """Record in the scan's store that it failed, making a bare store if there was none, so a reader learns why.

    `source` (the scan file) and its NeXus `start_time` let `store_made_from` tell this file from a
    later one of the same name. The store's directory is made only with `make_parents`: a directory
    that has gone (renamed away, unmounted) is not brought back. False (and a log line) when no
    store can be written there.
    """
    path = Path(path)
    if not make_parents and not path.parent.is_dir():
        log.error("%s: cannot record the failure in the store (its directory %s has gone)", path, path.parent)
        return False
    try:
        group = zarr.open_group(path, mode="a", use_consolidated=False)
        attrs: dict[str, Any] = {"status": STATUS_FAILED, "end_reason": reason, "end_time": now_iso()}
        if source is not None:
            attrs.setdefault("source_nexus", str(source))
            attrs["source_stat"] = _stat_identity(source)
            if start_time and not group.attrs.get("source_start_time"):
                attrs["source_start_time"] = start_time
        group.attrs.update(attrs)
    except Exception as error:  # e.g. an unwritable output directory: the log line is all we can leave
        log.error("%s: cannot record the failure in the store (%s)", path, str(error).splitlines()[0])
        return False
    return True


def jsonable(value: Any) -> Any:
    """Config and provenance as plain JSON for the store's attributes."""
    return json.loads(json.dumps(value, default=str))
