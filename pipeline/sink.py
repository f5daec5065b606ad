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
from pipeline.follow import ScanInfo
from pipeline.models.prediction import Detection, FramePrediction

log = logging.getLogger(__name__)

FRAME_DIMS = ("frame", "y", "x")
FRAME_ARRAYS = {  # path -> dtype, all (frame, y, x), one frame per chunk
    "tlm/labels": "uint16",
    "ssl/clusters": "uint8",
    "ssl/mask": "uint8",
    "volume/labels": "uint32",
}
DETECTION_COLUMNS = {"frame": "int64", "x0": "float32", "y0": "float32", "x1": "float32", "y1": "float32", "score": "float32", "instance_id": "uint16"}
STATUS_RUNNING, STATUS_COMPLETE, STATUS_INCOMPLETE, STATUS_FAILED = "running", "complete", "incomplete", "failed"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_path_for(nexus_path: Path, output_root: Path | None) -> Path:
    """`<scan>.zarr` beside the scan, or under the configured root."""
    name = Path(nexus_path).with_suffix(".zarr").name
    return (Path(output_root) / name) if output_root is not None else Path(nexus_path).with_suffix(".zarr")


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
                if group.attrs.get("source_file") == str(info.source_file) and "frames/done" in group:
                    store = cls(path, group, frame_shape)
                    store._load_detections()
                    group.attrs.update({"status": STATUS_RUNNING, "resumed_at": now_iso()})
                    return store
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
        """Keep the detections of frames already done; later frames will be written again."""
        done = self.done_prefix()
        table = self.group["tlm/detections"]
        rows = int(table.attrs.get("rows", 0))  # rows past this may be from a write the crash cut short
        if rows == 0:
            return
        columns = {name: table[name][:rows] for name in DETECTION_COLUMNS}
        for row in range(rows):
            frame = int(columns["frame"][row])
            if frame < done:
                box = tuple(float(columns[k][row]) for k in ("x0", "y0", "x1", "y1"))
                self.detections.setdefault(frame, []).append(
                    Detection(box=box, score=float(columns["score"][row]), instance_id=int(columns["instance_id"][row]))
                )

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
        if n <= self.frames_allocated:
            return
        height, width = self.frame_shape
        for name in FRAME_ARRAYS:
            self.group[name].resize((n, height, width))
        self.group["frames/done"].resize((n,))
        self.group["frames/axis"].resize((n,))
        self.frames_allocated = n

    def write_prediction(self, index: int, prediction: FramePrediction) -> None:
        self.ensure_frames(index + 1)
        self.group["tlm/labels"][index] = prediction.tlm_labels
        self.group["ssl/clusters"][index] = prediction.ssl_clusters
        self.group["ssl/mask"][index] = prediction.ssl_mask
        self.detections[index] = list(prediction.detections)

    def write_volume(self, index: int, labels: np.ndarray, axis_value: float | None, done: bool = True) -> None:
        """The last writes of a frame: its 3D labels, its axis value, then its done flag."""
        self.ensure_frames(index + 1)
        self.group["volume/labels"][index] = labels
        if axis_value is not None:
            self.group["frames/axis"][index] = axis_value
        if done:
            self.group["frames/done"][index] = 1

    def write_tables(self, peaks: dict[str, np.ndarray], done_frames: Iterable[int] | None = None) -> None:
        """Rewrite `peaks` and `tlm/detections` whole (they are small); readers see old or new columns."""
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
        if frames_total < self.frames_allocated:
            height, width = self.frame_shape
            for name in FRAME_ARRAYS:
                self.group[name].resize((frames_total, height, width))
            self.group["frames/done"].resize((frames_total,))
            self.group["frames/axis"].resize((frames_total,))
            self.frames_allocated = frames_total
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


def mark_failed(path: Path, reason: str) -> None:
    """Record in the scan's store that it failed, making a bare store if there was none, so a reader learns why."""
    try:
        group = zarr.open_group(path, mode="a", use_consolidated=False)
    except Exception as error:  # e.g. an unwritable output directory: the log line is all we can leave
        log.error("%s: cannot record the failure in the store (%s)", path, str(error).splitlines()[0])
        return
    group.attrs.update({"status": STATUS_FAILED, "end_reason": reason, "end_time": now_iso()})


def jsonable(value: Any) -> Any:
    """Config and provenance as plain JSON for the store's attributes."""
    return json.loads(json.dumps(value, default=str))
