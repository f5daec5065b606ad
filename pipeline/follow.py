"""Follow one scan file while the detector is still writing it, in any of I16's three layouts.

A frame is handed on once, and only when it is complete:
- GDA 9 (`entry/diamond_scan/keys/uniqueKeys`): when its key is non-zero, which the writer sets
  after the frame's data is flushed (the `swmr-tools` convention);
- without keys (GDA 8, frames inside the NeXus file): when a later frame exists, or the dataset's
  shape has held still for `settle_s`, or the scan's end marker is seen.
The scan ends at `scan_finished` (GDA 9) or a non-empty `end_time` (older layouts), else after
`idle_timeout_s` without a new frame, which leaves it incomplete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import FollowSettings

log = logging.getLogger(__name__)

REOPEN_INTERVAL_S = 1.0  # older layouts add their end marker as a new object: only a reopen shows it


class ScanError(Exception):
    """A scan that cannot be read; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class ScanInfo:
    """What the sink records about where the frames come from."""

    nexus_path: Path
    scan_id: str
    layout: str  # "gda9", "gda8" or "nexus"
    entry: str
    source_file: Path
    dataset: str
    scan_command: str | None
    expected_frames: int | None
    axis_name: str | None


@dataclass(frozen=True)
class Frame:
    index: int
    data: np.ndarray
    axis_value: float | None


def open_hdf5(path: Path) -> h5py.File:
    """Open for reading without ever blocking a writer: SWMR where the file allows it, no file lock."""
    try:
        return h5py.File(path, "r", swmr=True, locking=False)
    except OSError:
        return h5py.File(path, "r", locking=False)


def _text(node: h5py.Dataset) -> str:
    value = node[()]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class ScanFollower:
    """Yields the frames of one NeXus scan as they become complete; see the module docstring."""

    def __init__(self, nexus_path: Path, settings: FollowSettings, stop: threading.Event | None = None) -> None:
        self.nexus_path = Path(nexus_path)
        self.settings = settings
        self.stop = stop or threading.Event()
        self.info: ScanInfo | None = None
        self.end_reason: str | None = None  # finished | end_time | idle_timeout | stopped
        self._nexus: h5py.File | None = None
        self._source: h5py.File | None = None
        self._data: h5py.Dataset | None = None
        self._keys: h5py.Dataset | None = None
        self._axis_path: str | None = None

    # -- opening --------------------------------------------------------------------------

    def _wait(self, what: str, timeout_s: float, attempt):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return attempt()
            except (OSError, KeyError, RuntimeError) as error:  # RuntimeError: a file caught mid-creation
                if time.monotonic() > deadline:
                    raise ScanError(f"{self.nexus_path}: {what} within {timeout_s:g} s ({error})") from None
            if self.stop.wait(min(0.2, timeout_s / 10)):
                raise ScanError(f"{self.nexus_path}: stopped while waiting: {what}")

    def open(self) -> ScanInfo:
        """Find the layout and the frames; waits for the file and its link target to appear."""
        self._nexus = self._wait("could not open the file", self.settings.open_timeout_s, self._open_nexus)
        entry, data_path, link = self._find_detector(self._nexus)
        keys_path = f"{entry}/diamond_scan/keys/uniqueKeys"
        if isinstance(link, h5py.ExternalLink):
            layout = "gda9" if keys_path in self._nexus else "gda8"
            source_file = self._resolve_link_target(link.filename)
            self._source = self._wait(
                f"external link target {source_file} did not appear",
                self.settings.link_timeout_s,
                lambda: self._open_target(source_file, link.path),
            )
            dataset = link.path
        else:
            layout, source_file, dataset = "nexus", self.nexus_path, self._nexus[data_path].name
            self._source = self._nexus
        self._data = self._source[dataset]
        self._check_dataset(self._data, source_file, dataset)
        self._keys = self._nexus[keys_path] if layout == "gda9" else None
        self._axis_path = self._find_axis(self._nexus, entry, data_path)
        self.info = ScanInfo(
            nexus_path=self.nexus_path,
            scan_id=self.nexus_path.stem,
            layout=layout,
            entry=entry,
            source_file=source_file,
            dataset=dataset,
            scan_command=self._scan_command(entry),
            expected_frames=self._expected_frames(entry),
            axis_name=self._axis_path.rsplit("/", 1)[-1] if self._axis_path else None,
        )
        log.info("%s: %s layout, frames in %s:%s", self.nexus_path.name, layout, source_file.name, dataset)
        return self.info

    def _open_nexus(self) -> h5py.File:
        # A file still being created may lack its superblock for a moment; a large one without it never gets one.
        if self.nexus_path.is_file() and self.nexus_path.stat().st_size >= 2048 and not h5py.is_hdf5(self.nexus_path):
            raise ScanError(f"{self.nexus_path}: not an HDF5 file")
        return open_hdf5(self.nexus_path)

    def _find_detector(self, nexus: h5py.File) -> tuple[str, str, object]:
        detector = self.settings.detector
        for entry in self.settings.entries:
            for path in (f"{entry}/instrument/{detector}/data", f"{entry}/{detector}/data"):
                try:
                    link = nexus.get(path, getlink=True)
                except (KeyError, OSError):
                    link = None
                if link is not None:
                    return entry, path, link
        wanted = ", ".join(f"{e}/[instrument/]{detector}/data" for e in self.settings.entries)
        raise ScanError(f"{self.nexus_path}: no detector dataset ({wanted})")

    def _resolve_link_target(self, filename: str) -> Path:
        """Relative targets are relative to the NeXus file; absolute beamline paths fall back to it too."""
        target = Path(filename)
        if not target.is_absolute():
            return self.nexus_path.parent / target
        if target.exists():
            return target
        return self.nexus_path.parent / target.parent.name / target.name

    def _open_target(self, path: Path, dataset: str) -> h5py.File:
        handle = open_hdf5(path)
        if dataset not in handle:
            handle.close()
            raise KeyError(f"no dataset {dataset} yet")
        return handle

    def _check_dataset(self, data: h5py.Dataset, source: Path, dataset: str) -> None:
        height, width = self.settings.frame_shape
        if data.ndim != 3 or tuple(data.shape[1:]) != (height, width):
            raise ScanError(f"{source}:{dataset}: frames of shape {data.shape[1:]} (rank {data.ndim}), expected ({height}, {width})")
        if data.dtype.kind not in "iuf":
            raise ScanError(f"{source}:{dataset}: dtype {data.dtype} is not numeric")

    def _find_axis(self, nexus: h5py.File, entry: str, data_path: str) -> str | None:
        """The scan axis: a 1-D float dataset beside the frames (NXdata `axes`) or in `measurement`."""
        for group_path in (data_path.rsplit("/", 1)[0], f"{entry}/{self.settings.detector}", f"{entry}/measurement"):
            group = nexus.get(group_path)
            if not isinstance(group, h5py.Group):
                continue
            axes = group.attrs.get("axes")
            names = [a.decode() if isinstance(a, bytes) else str(a) for a in np.atleast_1d(axes)] if axes is not None else []
            names += sorted(group.keys())
            for name in names:
                if name in (".", "data"):
                    continue
                try:
                    node = group.get(name, getlink=True)
                    if isinstance(node, h5py.ExternalLink):
                        continue
                    node = group[name]
                except (KeyError, OSError):
                    continue
                if isinstance(node, h5py.Dataset) and node.ndim == 1 and node.dtype.kind == "f":
                    return node.name
        return None

    def _scan_command(self, entry: str) -> str | None:
        for path in (f"{entry}/diamond_scan/scan_command", f"{entry}/scan_command"):
            if path in self._nexus:
                return _text(self._nexus[path])
        return None

    def _expected_frames(self, entry: str) -> int | None:
        path = f"{entry}/diamond_scan/scan_shape"
        if path in self._nexus:
            return int(np.prod(self._nexus[path][()]))
        return None

    # -- following ------------------------------------------------------------------------

    def _reopen_nexus(self) -> None:
        """Close and reopen the NeXus file (not the detector file) so new objects become visible."""
        if self._source is self._nexus:
            return  # frames live in it: SWMR refresh already sees all we need
        keys_path = None if self._keys is None else self._keys.name
        self._nexus.close()
        self._nexus = open_hdf5(self.nexus_path)
        if keys_path is not None:
            self._keys = self._nexus[keys_path]

    def _end_marker(self) -> str | None:
        entry = self.info.entry
        finished = self._nexus.get(f"{entry}/diamond_scan/scan_finished")
        if isinstance(finished, h5py.Dataset):
            finished.refresh()
            if int(np.ravel(finished[()])[0]) != 0:
                return "finished"
            return None
        end_time = self._nexus.get(f"{entry}/end_time")
        if isinstance(end_time, h5py.Dataset):
            end_time.refresh()
            if _text(end_time).strip("\x00 "):
                return "end_time"
        return None

    def _ready_indices(self, n_rows: int, settled: bool, ended: bool) -> np.ndarray:
        if self._keys is not None:
            self._keys.refresh()
            keys = np.asarray(self._keys[()]).reshape(-1)[:n_rows]
            return np.flatnonzero(keys)
        complete = n_rows if (settled or ended) else n_rows - 1
        return np.arange(max(complete, 0))

    def _axis_value(self, index: int) -> float | None:
        if self._axis_path is None:
            return None
        axis = self._nexus.get(self._axis_path)
        if not isinstance(axis, h5py.Dataset):
            return None
        axis.refresh()
        if index >= axis.shape[0]:
            return None
        value = float(axis[index])
        return value if np.isfinite(value) else None

    def frames(self, start: int = 0) -> Iterator[Frame]:
        """Every complete frame from `start` on, once each, in index order of completion."""
        if self.info is None:
            self.open()
        sent: set[int] = set()
        next_index = start
        last_rows, last_change = -1, time.monotonic()
        last_progress = time.monotonic()
        last_reopen = time.monotonic()
        try:
            while True:
                ended = self._end_marker()
                self._data.refresh()
                n_rows = self._data.shape[0]
                now = time.monotonic()
                if n_rows != last_rows:
                    last_rows, last_change = n_rows, now
                settled = now - last_change >= self.settings.settle_s
                progressed = False
                for index in self._ready_indices(n_rows, settled, ended is not None):
                    index = int(index)
                    if index < next_index or index in sent:
                        continue
                    data = np.asarray(self._data[index])
                    yield Frame(index=index, data=data, axis_value=self._axis_value(index))
                    sent.add(index)
                    progressed = True
                # indices below next_index are done; keep `sent` small by advancing past a full prefix
                while next_index in sent:
                    sent.discard(next_index)
                    next_index += 1
                if progressed:
                    last_progress = time.monotonic()
                    continue
                if ended is not None:
                    self.end_reason = ended
                    return
                if self.stop.is_set():
                    self.end_reason = "stopped"
                    return
                idle = time.monotonic() - last_progress
                if idle >= self.settings.idle_timeout_s:
                    self.end_reason = "idle_timeout"
                    log.warning("%s: no new frame for %.0f s and no end marker: ending incomplete", self.nexus_path.name, idle)
                    return
                if time.monotonic() - last_reopen >= REOPEN_INTERVAL_S:
                    self._reopen_nexus()
                    last_reopen = time.monotonic()
                self.stop.wait(self.settings.poll_interval_s)
        except (OSError, KeyError, RuntimeError) as error:
            raise ScanError(f"{self.nexus_path}: read failed while following ({error})") from None

    def read_frame(self, index: int) -> np.ndarray:
        """One frame already known to be complete (used to replay a resumed scan)."""
        if self.info is None:
            self.open()
        return np.asarray(self._data[index])

    @property
    def frames_in_file(self) -> int:
        return 0 if self._data is None else int(self._data.shape[0])

    def close(self) -> None:
        for handle in (self._source, self._nexus):
            try:
                if handle is not None and handle.id.valid:
                    handle.close()
            except Exception:  # closing a file that vanished must not hide the real error
                pass
        self._source = self._nexus = None

    def __enter__(self) -> "ScanFollower":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
