"""One scan's page: its details, its growing projection and rocking curves, its frames as pictures.

The projection and the curves are the quick look's (`QuicklookAccumulator`), kept in memory for
the scans someone is looking at (the `MAX_VIEWS` most recently asked for) and fed only the frames
that became done since the last look, a bounded amount of work per call: a 10,000-frame scan is
read once, in steps, while its page already shows what has been added so far. Raw pixels are read
only from files under the allowed roots (`StoreReader.raw_frames(roots=...)`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from pipeline.errors import one_line
from pipeline.pictures.quicklook import MAX_CURVES, MAX_LABELLED_PEAKS, QuicklookAccumulator, QuicklookData, done_blocks, peak_colour
from pipeline.store import schema
from pipeline.store.reader import QUICKLOOK_SUFFIX, StoreError, StoreReader
from pipeline.store.schema import Attr
from pipeline.web import render
from pipeline.web.summary import root_attributes

MAX_VIEWS = 8  # scans whose projection is kept in memory (about 1 MiB each, plus their peaks' footprints)
READ_BLOCK = 16  # frames read from the store and the raw file in one go
RETRY_S = 5.0  # a projection that could not read its raw frames tries again after this long (a link target may appear)
SHOWN_ATTRIBUTES = (Attr.SCAN_COMMAND, Attr.LAYOUT, Attr.SOURCE_NEXUS, Attr.SOURCE_FILE, Attr.SOURCE_DATASET, Attr.AXIS_NAME,
                    Attr.AXIS_PATH, Attr.AXIS_SOURCE, Attr.DETECTOR_PATH, Attr.FRAMES_EXPECTED, Attr.FRAMES_EXPECTED_SOURCE,
                    Attr.DEVICE, Attr.SOFTWARE_VERSION, Attr.START_TIME, Attr.END_TIME, Attr.RESUMED_AT, Attr.STATUS, Attr.END_REASON,
                    Attr.FAILED_FRAMES, Attr.BAD_FRAMES)


def jsonable(value: Any) -> Any:
    """numpy scalars and arrays as plain numbers and lists; NaN and infinities as null (JSON has neither)."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def done_ranges(done: np.ndarray) -> list[list[int]]:
    """Sorted frame indices as [first, last] runs: [0, 1, 2, 5] -> [[0, 2], [5, 5]] (a 10,000-frame scan in a few numbers)."""
    if not done.size:
        return []
    breaks = np.flatnonzero(np.diff(done) != 1)
    starts = np.concatenate([[done[0]], done[breaks + 1]])
    ends = np.concatenate([done[breaks], [done[-1]]])
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def hex_colour(peak_id: int) -> str:
    red, green, blue, _ = peak_colour(peak_id)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def peaks_table(reader: StoreReader) -> dict[str, Any]:
    """The peaks table as columns and rows; read again when caught in the middle of a rewrite (columns of unequal length)."""
    for _ in range(5):
        table = reader.table(schema.PEAKS)
        lengths = {len(values) for values in table.values()}
        if len(lengths) <= 1:
            rows = min(lengths) if lengths else 0
            columns = [name for name in schema.PEAK_COLUMNS if name in table]
            return {"columns": columns, "rows": jsonable([[table[name][row] for name in columns] for row in range(rows)])}
        time.sleep(0.05)
    raise StoreError(f"{reader.path.name}: the peaks table is being rewritten; try again")


class ScanView:
    """What one scan's page shows; every method may be called from any thread (one lock)."""

    def __init__(self, scan_id: str, path: Path, raw_roots: Sequence[Path]) -> None:
        self.scan_id = scan_id
        self.path = path
        self.raw_roots = list(raw_roots)
        self._lock = threading.Lock()  # the accumulated data
        self._advancing = threading.Lock()  # one caller adds frames at a time
        self._identity: tuple[Any, ...] | None = None
        self._accumulator: QuicklookAccumulator | None = None
        self._covered = np.zeros(0, dtype=bool)
        self._axis_name = "frame"
        self.version = 0  # grows whenever the projection or the curves do
        self.problem: str | None = None  # why the projection cannot grow (raw file missing, outside the roots)
        self.nothing_to_show: str | None = None  # why a scan that failed before it had frames has no pictures
        self._problem_at = 0.0
        self._projection: tuple[int, bytes] | None = None
        self.last_used = time.monotonic()

    # -- the projection and the curves ----------------------------------------------------------

    def _reset_if_replaced(self, reader: StoreReader) -> None:
        attributes = reader.attrs
        identity = (attributes.get(Attr.START_TIME), attributes.get(Attr.SOURCE_START_TIME), attributes.get(Attr.SOURCE_FILE))
        if identity != self._identity:  # a new store at the same path (a replaced scan file): start again
            self._identity = identity
            self._accumulator = None
            self._covered = np.zeros(0, dtype=bool)
            self.problem = None
            self.version += 1

    def advance(self, budget_s: float = 0.5, wait: bool = True) -> bool:
        """Add done frames not yet in the projection, for about `budget_s`; True when none is left to add.
        With `wait=False` it returns False at once when another caller is adding frames already (a request
        then answers with what is there, instead of waiting for the scan's stream to finish its step)."""
        if not self._advancing.acquire(blocking=wait):
            return False
        try:
            return self._advance(budget_s)
        finally:
            self._advancing.release()

    def _advance(self, budget_s: float) -> bool:
        """Frames are read without the data lock and added under it, a block at a time: pictures and curves
        are answered between blocks."""
        self.last_used = time.monotonic()
        try:
            reader = StoreReader(self.path, confined=True)
        except StoreError as error:
            attributes = root_attributes(self.path)
            if attributes is None or attributes.get(Attr.STATUS) != schema.STATUS_FAILED:
                raise
            with self._lock:  # failed before it had frames: why is the scan's reason, said once on its page, not a problem here
                self.nothing_to_show, self.problem = one_line(error), None
            return True
        self.nothing_to_show = None
        done = reader.done_frames()
        with self._lock:
            self._reset_if_replaced(reader)
            if self._covered.size < reader.frames_total:
                self._covered = np.concatenate([self._covered, np.zeros(reader.frames_total - self._covered.size, dtype=bool)])
            covered = self._covered
            todo = done[~covered[done]] if done.size else done
            if not todo.size:
                self.problem = None  # every done frame is in: whatever went wrong before has passed
                return True
            if self.problem is not None and time.monotonic() - self._problem_at < RETRY_S:
                return True
        volume = cast(zarr.Array, reader.group[schema.VOLUME_LABELS])
        axis_array = reader.array(schema.FRAMES_AXIS)
        axis = axis_array[:] if axis_array is not None else np.full(reader.frames_total, np.nan)
        deadline = time.monotonic() + budget_s
        added = 0
        try:
            with reader.raw_frames(roots=self.raw_roots) as dataset:
                if tuple(dataset.shape[1:]) != tuple(volume.shape[1:]):
                    raise StoreError(f"{self.path.name}: raw frames are {tuple(dataset.shape[1:])}, the store's are {tuple(volume.shape[1:])}")
                with self._lock:
                    if self._accumulator is None:  # only once pixels may be read: no picture of nothing
                        self._accumulator = QuicklookAccumulator(tuple(volume.shape[1:]))
                        self._axis_name = reader.scan_axis(done[:1])[0]
                    accumulator = self._accumulator
                for block, labels, raw in done_blocks(volume, dataset, todo[todo < dataset.shape[0]], READ_BLOCK):
                    with self._lock:
                        accumulator.add_block(block, axis[block].astype(np.float64), labels, raw)
                        covered[block] = True
                    added += block.size
                    if time.monotonic() > deadline:
                        break
            with self._lock:
                self.problem = None
        except StoreError as error:  # the raw file is missing or outside the roots: said, and tried again later
            with self._lock:
                self.problem, self._problem_at = one_line(error), time.monotonic()
        if added:
            with self._lock:
                self.version += 1
        return added == todo.size

    def _data(self) -> QuicklookData | None:
        if self._accumulator is None:
            return None  # the status is the summary's business: the pictures only need the scan's name
        return self._accumulator.data(self.path.name.removesuffix(".zarr"), "", int(self._covered.size), self._axis_name)

    def progress(self) -> dict[str, Any]:
        """How far the projection and the curves are: the page asks again for them when `version` changes."""
        with self._lock:
            covered = int(self._covered.sum())
            peaks = 0 if self._accumulator is None else len(self._accumulator.peak_ids)
            return {"version": self.version, "frames_covered": covered, "peaks_seen": peaks, "problem": self.problem}

    def curves(self, limit: int = MAX_CURVES) -> dict[str, Any]:
        """The rocking curves of the `limit` brightest peaks, aligned on one scan axis for the chart (null where a peak is absent)."""
        with self._lock:
            data = self._data()
            if data is None:
                return {"axis_name": self._axis_name, "x": [], "series": [], "peak_count": 0, "frames_covered": 0, "version": self.version,
                        "problem": self.problem}
            brightest = sorted(data.curves, key=lambda peak_id: -data.curves[peak_id].total)[:limit]
            frames = sorted({int(frame) for peak_id in brightest for frame in data.curves[peak_id].frames.tolist()})
            position = {frame: i for i, frame in enumerate(frames)}
            axis_of = dict(zip(data.frames.tolist(), data.axis_values.tolist()))
            order = sorted(range(len(frames)), key=lambda i: (axis_of[frames[i]], frames[i]))
            series = []
            for peak_id in sorted(brightest):
                values: list[float | None] = [None] * len(frames)
                curve = data.curves[peak_id]
                for frame, total in zip(curve.frames.tolist(), curve.sums.tolist()):
                    values[position[frame]] = total
                series.append({"id": peak_id, "label": f"peak {peak_id}", "colour": hex_colour(peak_id), "total": curve.total,
                               "y": [values[i] for i in order]})
            return jsonable({"axis_name": data.axis_name, "x": [axis_of[frames[i]] for i in order], "frames": [frames[i] for i in order],
                             "series": series, "peak_count": len(data.curves), "frames_covered": int(data.frames.size),
                             "version": self.version, "problem": self.problem})

    def projection_png(self) -> bytes | None:
        """The maximum projection so far with the brightest peaks outlined and numbered (None before any frame is in it)."""
        with self._lock:
            if self._projection is not None and self._projection[0] == self.version:
                return self._projection[1]
            data = self._data()
            if data is None or not self._covered.any():  # no frame read yet (or none could be): no picture of nothing
                return None
            brightest = sorted(data.curves, key=lambda peak_id: -data.curves[peak_id].total)[:MAX_LABELLED_PEAKS]
            outlines = [(peak_id, data.footprints[peak_id], peak_colour(peak_id)) for peak_id in sorted(brightest)]
            png = render.projection_png(data.projection, outlines)
            self._projection = (self.version, png)
            return png

    # -- the rest of the page ----------------------------------------------------------------

    def detail(self, summary: dict[str, Any] | None) -> dict[str, Any]:
        """The scan's summary, the attributes a person asks about, the done frames as runs, and the peaks table; for a scan
        that failed before its store had arrays, its status and why with no frames."""
        try:
            reader = StoreReader(self.path, confined=True)
        except StoreError:
            attributes = root_attributes(self.path)
            if attributes is None or attributes.get(Attr.STATUS) != schema.STATUS_FAILED:
                raise
            # a scan that failed before its store had arrays (not a scan file, no frames): its status and why, once
            return jsonable({**(summary or {}), "status": schema.STATUS_FAILED, "end_reason": attributes.get(Attr.END_REASON),
                             "attributes": {name: attributes.get(name) for name in SHOWN_ATTRIBUTES if name in attributes},
                             "axis_name": attributes.get(Attr.AXIS_NAME) or "frame", "done": [], "frames_done": 0, "newest_done": None,
                             "peaks_table": {"columns": [], "rows": []}, "quicklook": False})
        attributes = reader.attrs
        done = reader.done_frames()
        quicklook = reader.output_path(QUICKLOOK_SUFFIX)
        return jsonable({
            **(summary or {}),
            "attributes": {name: attributes.get(name) for name in SHOWN_ATTRIBUTES if name in attributes},
            "axis_name": reader.scan_axis(done[:1])[0] if done.size else attributes.get(Attr.AXIS_NAME) or "frame",
            "done": done_ranges(done),
            "frames_done": int(done.size),
            "newest_done": int(done[-1]) if done.size else None,
            "peaks_table": peaks_table(reader),
            "quicklook": quicklook.is_file() and not quicklook.is_symlink(),
        })

    def frame_png(self, frame: int, scale: str, layers: set[str]) -> tuple[bytes, dict[str, str]]:
        """One done frame with the chosen layers drawn over it, and what the picture shows (for the page's caption)."""
        reader = StoreReader(self.path, confined=True)
        reader.check_frame(frame)
        with reader.raw_frames(roots=self.raw_roots) as dataset:
            if frame >= dataset.shape[0]:
                raise StoreError(f"frame {frame} is not in the raw file ({dataset.shape[0]} frames there)")
            raw = np.clip(np.asarray(dataset[frame], dtype=np.float64), 0, None)
        tlm_array, ssl_array = reader.array(schema.TLM_LABELS), reader.array(schema.SSL_MASK)
        tlm = np.asarray(tlm_array[frame]) if tlm_array is not None and "tlm" in layers else None
        ssl = np.asarray(ssl_array[frame]) if ssl_array is not None and "ssl" in layers else None
        detections = reader.frame_detections(frame) if "boxes" in layers else None
        axis_name, axis_values = reader.scan_axis(np.array([frame]))
        png = render.frame_png(raw, tlm, ssl, detections, scale=scale)
        return png, {"X-Frame": str(frame), "X-Counts-Max": f"{raw.max():.0f}", "X-Axis-Name": axis_name,
                     "X-Axis-Value": f"{axis_values[0]:.6g}", "X-Instances": str(0 if tlm is None else len(np.unique(tlm[tlm > 0]))),
                     "X-Boxes": str(0 if detections is None else len(detections.scores))}


class ScanViews:
    """The views kept in memory, the least recently used dropped first."""

    def __init__(self, raw_roots: Sequence[Path], limit: int = MAX_VIEWS) -> None:
        self.raw_roots = list(raw_roots)
        self.limit = limit
        self._views: OrderedDict[str, ScanView] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, scan_id: str, path: Path) -> ScanView:
        with self._lock:
            view = self._views.get(scan_id)
            if view is None or view.path != path:
                view = ScanView(scan_id, path, self.raw_roots)
                self._views[scan_id] = view
            self._views.move_to_end(scan_id)
            while len(self._views) > self.limit:
                self._views.popitem(last=False)
            return view
