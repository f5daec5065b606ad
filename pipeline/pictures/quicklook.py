"""Pictures of a scan's store that a person opens first: the quick-look PNG and one frame's overlay.

The quick look (`<scan>.quicklook.png`, beside the store) shows where the 3D peaks are on the
detector (maximum projection of the raw counts, log scale, each peak's footprint outlined and
numbered) and how each peak rises and falls along the scan (its rocking curve). The frame overlay
is DiPID's viewer: one raw frame with the TLM instances, the SSLM mask and the TLM boxes on it.

Both read a store that may still be written, so they open it without consolidated metadata and
use only frames whose `frames/done` is 1. Raw frames come from the scan's own HDF5 file (the
store's `source_file` and `source_dataset` attributes), a block of frames at a time, so memory does
not grow with the scan. Figures use matplotlib's object API on the Agg canvas (no pyplot), so they can
be drawn from any thread without a display.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import h5py
import numpy as np
import zarr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke
from scipy import ndimage

from pipeline.store import schema
from pipeline.store.reader import QUICKLOOK_SUFFIX, StoreError, StoreReader, read_raw_frame, require_raw_frame

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.typing import ColorType

__all__ = ["StoreError"]  # re-exported: the pictures' commands report it

DPI = 100
QUICKLOOK_FIGSIZE = (10.0, 8.5)  # inches: a 1000 x 850 PNG
OVERLAY_FIGSIZE = (10.0, 4.7)  # inches: a 1000 x 470 PNG
VOLUME_FIGSIZE = (9.0, 7.0)  # inches: a 900 x 700 PNG
MAX_LABELLED_PEAKS = 40  # more than this many outlines and numbers make the projection unreadable
MAX_CURVES = 20  # rocking curves drawn (the brightest peaks); the legend stays readable
MAX_VOLUME_POINTS = 20_000  # voxels drawn in the static 3D picture
_READABLE = [withStroke(linewidth=2.5, foreground="black")]  # numbers stay legible on bright pixels


# -- the quick-look data -------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """A peak's footprint projected along the scan: `mask` is its bounding box, top-left at (y0, x0)."""

    y0: int
    x0: int
    mask: np.ndarray  # bool


@dataclass(frozen=True)
class RockingCurve:
    """A peak's summed raw intensity (dead pixels as 0) in each frame where it has voxels."""

    frames: np.ndarray  # int64 frame indices
    axis_values: np.ndarray  # float64, the scan axis at those frames
    sums: np.ndarray  # float64

    @property
    def total(self) -> float:
        return float(self.sums.sum())


@dataclass(frozen=True)
class QuicklookData:
    """Everything the quick look draws, computed in one pass over the done frames."""

    scan: str
    status: str
    frames_total: int  # frames the store holds (done or not)
    frames: np.ndarray  # the done frames used, ascending
    axis_name: str  # "frame" when the store has no usable scan axis
    axis_values: np.ndarray  # per used frame
    projection: np.ndarray  # float64 (y, x): max over used frames of the raw counts, clipped at 0
    footprints: dict[int, Footprint]  # peak id -> projected footprint
    curves: dict[int, RockingCurve]  # peak id -> rocking curve

    @property
    def peak_ids(self) -> list[int]:
        return sorted(self.curves)


class _FootprintBuilder:
    """Union of a peak's per-frame footprints, kept to its bounding box so memory follows peak size."""

    def __init__(self, window: tuple[slice, slice], piece: np.ndarray) -> None:
        self.y0, self.x0 = window[0].start, window[1].start
        self.mask = piece.copy()

    def add(self, window: tuple[slice, slice], piece: np.ndarray) -> None:
        y0, x0 = min(self.y0, window[0].start), min(self.x0, window[1].start)
        y1 = max(self.y0 + self.mask.shape[0], window[0].stop)
        x1 = max(self.x0 + self.mask.shape[1], window[1].stop)
        if (y0, x0, y1 - y0, x1 - x0) != (self.y0, self.x0, *self.mask.shape):
            grown = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            grown[self.y0 - y0:self.y0 - y0 + self.mask.shape[0], self.x0 - x0:self.x0 - x0 + self.mask.shape[1]] = self.mask
            self.mask, self.y0, self.x0 = grown, y0, x0
        oy, ox = window[0].start - self.y0, window[1].start - self.x0
        self.mask[oy:oy + piece.shape[0], ox:ox + piece.shape[1]] |= piece

    def footprint(self) -> Footprint:
        return Footprint(self.y0, self.x0, self.mask)


class QuicklookAccumulator:
    """The quick look's projection, footprints and rocking curves, built up one done frame at a time.

    `quicklook_data` feeds it every done frame in one pass; a live view (the web view) keeps one per
    scan and feeds it only the frames that became done since it last looked, so a long scan is read once.
    """

    def __init__(self, frame_shape: tuple[int, int]) -> None:
        self.projection = np.zeros(frame_shape, dtype=np.float64)
        self.frames: list[int] = []
        self.axis_values: list[float] = []
        self._builders: dict[int, _FootprintBuilder] = {}
        self._curve_parts: dict[int, list[tuple[int, float, float]]] = {}

    def add(self, frame: int, axis_value: float, labels: np.ndarray, raw: np.ndarray) -> None:
        """One done frame: its raw counts (clipped at 0) and its 3D labels; frames may come in any order."""
        self.add_block(np.array([frame]), np.array([axis_value], dtype=np.float64), labels[None], raw[None])

    def add_block(self, frames: np.ndarray, axis_values: np.ndarray, labels: np.ndarray, raw: np.ndarray) -> None:
        """Done frames with their axis values, 3D labels (frames, y, x) and raw counts clipped at 0 (frames, y, x)."""
        if not frames.size:
            return
        np.maximum(self.projection, raw.max(axis=0), out=self.projection)
        for frame, axis_value, frame_labels, frame_raw in zip(frames.tolist(), axis_values.tolist(), labels, raw):
            self.frames.append(int(frame))
            self.axis_values.append(float(axis_value))
            _add_frame(int(frame), float(axis_value), frame_labels, frame_raw, self._builders, self._curve_parts)

    @property
    def peak_ids(self) -> list[int]:
        return sorted(self._curve_parts)

    def data(self, scan: str, status: str, frames_total: int, axis_name: str) -> QuicklookData:
        """What the quick look draws; the frame index stands in for the scan axis where any value is missing."""
        frames = np.array(self.frames, dtype=np.int64)
        order = np.argsort(frames, kind="stable")
        frames, axis_values = frames[order], np.array(self.axis_values, dtype=np.float64)[order]
        by_frame = axis_name == "frame" or not np.isfinite(axis_values).all()
        if by_frame:
            axis_name, axis_values = "frame", frames.astype(np.float64)
        curves = {}
        for peak_id, parts in sorted(self._curve_parts.items()):
            rows = sorted(parts)
            curve_frames = np.array([row[0] for row in rows], dtype=np.int64)
            curves[peak_id] = RockingCurve(curve_frames, curve_frames.astype(np.float64) if by_frame else np.array([row[1] for row in rows]),
                                           np.array([row[2] for row in rows]))
        return QuicklookData(
            scan=scan,
            status=status,
            frames_total=frames_total,
            frames=frames,
            axis_name=axis_name,
            axis_values=axis_values,
            projection=self.projection.copy(),
            footprints={peak_id: builder.footprint() for peak_id, builder in sorted(self._builders.items())},
            curves=curves,
        )


def quicklook_data(store_path: Path) -> QuicklookData:
    """Projection, footprints and rocking curves of a (possibly live) store, reading a block of frames at a time."""
    store = StoreReader(store_path)
    volume = cast(zarr.Array, store.group[schema.VOLUME_LABELS])
    frames = store.done_frames()
    axis_name, axis_values = store.scan_axis(frames)
    height, width = volume.shape[1:]
    accumulator = QuicklookAccumulator((height, width))
    if frames.size:
        with store.raw_frames() as dataset:
            if tuple(dataset.shape[1:]) != (height, width):
                raise StoreError(f"{store.path}: raw frames are {tuple(dataset.shape[1:])}, the store's are {(height, width)}")
            require_raw_frame(dataset, int(frames[-1]))
            position = 0
            for block, labels, raw in done_blocks(volume, dataset, frames):
                accumulator.add_block(block, axis_values[position:position + block.size], labels, raw)
                position += block.size
    return accumulator.data(store.name, store.status, store.frames_total, axis_name)


def done_blocks(volume: zarr.Array, dataset: h5py.Dataset, frames: np.ndarray,
                block_frames: int = schema.FRAME_SHARD) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(frames, their 3D labels, their raw counts clipped at 0, in the file's dtype) for sorted `frames` within the raw
    file, a block at a time: each block lies in one shard of the store and is one zarr read and one HDF5 read. Read
    frame by frame, as float64, a 2,000-frame scan's quick look took 2.6-5 s of CPU, about what the daemon spent on the
    scan itself (docs/performance.md)."""
    if not frames.size:
        return
    for block in np.split(frames, np.flatnonzero(np.diff(frames // block_frames)) + 1):
        first, last = int(block[0]), int(block[-1])
        labels = np.asarray(volume[first:last + 1])
        raw = np.asarray(dataset[first:last + 1])
        np.maximum(raw, 0, out=raw)  # dead pixels (-2) count as nothing
        if block.size != last + 1 - first:  # frames not done in between are left out
            labels, raw = labels[block - first], raw[block - first]
        yield block, labels, raw


def _add_frame(frame: int, axis_value: float, labels: np.ndarray, raw: np.ndarray, builders: dict[int, _FootprintBuilder],
               curve_parts: dict[int, list[tuple[int, float, float]]]) -> None:
    """One frame's contribution to every peak present in it: its intensity sum and its footprint."""
    present = labels > 0
    if not present.any():
        return
    ids, inverse = np.unique(labels[present], return_inverse=True)
    sums = np.bincount(inverse, weights=raw[present], minlength=ids.size)
    compact = np.zeros(labels.shape, dtype=np.int32)  # 1..k: the k peaks of this frame
    compact[present] = inverse + 1
    for k, window in enumerate(ndimage.find_objects(compact)):
        peak_id = int(ids[k])
        piece = compact[window] == k + 1
        if peak_id in builders:
            builders[peak_id].add(window, piece)
        else:
            builders[peak_id] = _FootprintBuilder(window, piece)
        curve_parts.setdefault(peak_id, []).append((frame, axis_value, float(sums[k])))


# -- drawing -------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> Figure:
    figure = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out: Path) -> Path:
    """Write the PNG next to its final name, then rename: a reader never opens half a picture. Made with the mode the
    umask gives, as the store's own files are (tempfile's 0600 kept a web view under another account from reading it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.{secrets.token_hex(8)}.png"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
    try:
        figure.savefig(temporary, format="png", dpi=DPI)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


def _log_norm(image: np.ndarray) -> LogNorm:
    return LogNorm(vmin=1.0, vmax=max(2.0, float(image.max())), clip=True)


def peak_colour(peak_id: int) -> tuple[float, float, float, float]:
    """A peak's colour (RGBA, 0..1) in every picture of it: the quick look, the 3D picture, the web view."""
    from matplotlib import colormaps

    return colormaps["tab10"](peak_id % 10)


def quicklook_title(data: QuicklookData) -> str:
    """Scan, status (with progress while running) and peak count: the first line a person reads."""
    progress = "" if data.frames.size == data.frames_total else f", {data.frames.size}/{data.frames_total} frames done"
    peaks = "no peaks found" if not data.curves else f"{len(data.curves)} peak{'s' if len(data.curves) != 1 else ''}"
    return f"{data.scan}: {data.status}{progress}, {peaks}"


def _outline(axes: Axes, y0: int, x0: int, mask: np.ndarray, colour: ColorType, linewidth: float = 1.0) -> None:
    """Contour of a cropped mask placed at (y0, x0); padded so one-pixel masks get an outline too."""
    padded = np.pad(mask.astype(np.float32), 1)
    ys = np.arange(y0 - 1, y0 + mask.shape[0] + 1)
    xs = np.arange(x0 - 1, x0 + mask.shape[1] + 1)
    axes.contour(xs, ys, padded, levels=[0.5], colors=[colour], linewidths=linewidth)


def draw_quicklook(data: QuicklookData, out: Path) -> Path:
    """The quick-look PNG of `data`: projection with numbered peak outlines above, rocking curves below."""
    figure = _new_figure(QUICKLOOK_FIGSIZE)
    figure.suptitle(quicklook_title(data), fontsize=13)
    image_axes = figure.add_axes((0.06, 0.47, 0.82, 0.42))
    colorbar_axes = figure.add_axes((0.90, 0.52, 0.015, 0.32))
    curve_axes = figure.add_axes((0.08, 0.07, 0.70, 0.31))

    brightest = sorted(data.curves, key=lambda peak_id: -data.curves[peak_id].total)
    labelled = set(brightest[:MAX_LABELLED_PEAKS])
    shown = np.clip(data.projection, 1.0, None)
    picture = image_axes.imshow(shown, cmap="gray", norm=_log_norm(shown), interpolation="nearest", aspect="equal")
    figure.colorbar(picture, cax=colorbar_axes, label="counts (max over frames)")
    for peak_id, footprint in data.footprints.items():
        if peak_id not in labelled:
            continue
        _outline(image_axes, footprint.y0, footprint.x0, footprint.mask, peak_colour(peak_id))
        image_axes.text(footprint.x0 + footprint.mask.shape[1] + 3, footprint.y0 + footprint.mask.shape[0] / 2, str(peak_id),
                        color=peak_colour(peak_id), fontsize=10, fontweight="bold", va="center", ha="left", path_effects=_READABLE)
    more = f"; outlined: the {MAX_LABELLED_PEAKS} brightest" if len(data.curves) > MAX_LABELLED_PEAKS else ""
    image_axes.set_title(f"maximum projection of the raw counts over {data.frames.size} frames (log scale){more}", fontsize=10)
    image_axes.set_xlabel("x (pixel)")
    image_axes.set_ylabel("y (pixel)")

    for peak_id in brightest[:MAX_CURVES]:
        curve = data.curves[peak_id]
        curve_axes.plot(curve.axis_values, curve.sums, "o-", markersize=3, color=peak_colour(peak_id), label=f"peak {peak_id}")
    if len(data.curves) > MAX_CURVES:
        curve_axes.set_title(f"rocking curves of the {MAX_CURVES} brightest of {len(data.curves)} peaks", fontsize=10)
    else:
        curve_axes.set_title("rocking curve of each peak: summed raw counts inside its voxels", fontsize=10)
    if data.curves:
        many = len(data.curves) > 10
        curve_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7 if many else 8, ncols=2 if many else 1,
                          frameon=False, handlelength=1.2, columnspacing=0.8)
        peak_maxima = [float(c.sums.max()) for c in data.curves.values() if c.sums.max() > 0]
        if peak_maxima and max(peak_maxima) > 100 * min(peak_maxima):
            curve_axes.set_yscale("log")  # peaks of very different brightness all stay visible
    else:
        curve_axes.text(0.5, 0.5, "no peaks found", transform=curve_axes.transAxes, ha="center", va="center", fontsize=12)
    if data.axis_values.size:
        low, high = float(data.axis_values.min()), float(data.axis_values.max())
        pad = (high - low) * 0.02 or 0.5
        curve_axes.set_xlim(low - pad, high + pad)
    curve_axes.set_xlabel(data.axis_name)
    curve_axes.set_ylabel("summed counts")
    curve_axes.grid(alpha=0.3)
    return _save(figure, out)


def write_quicklook(store_path: Path, out: Path | None = None) -> Path:
    """Make `<scan>.quicklook.png` beside the store (or at `out`) and return its path."""
    data = quicklook_data(store_path)
    return draw_quicklook(data, out if out is not None else StoreReader(store_path).output_path(QUICKLOOK_SUFFIX))


# -- one frame's overlay -------------------------------------------------------------------


def save_frame_overlay(store_path: Path, frame: int, out: Path, scale: Literal["linear", "log"] = "log") -> Path:
    """One raw frame with TLM instance outlines, the SSLM mask outline and TLM boxes with scores, as a PNG."""
    if scale not in ("linear", "log"):
        raise StoreError(f"scale must be 'linear' or 'log', not {scale!r}")
    store = StoreReader(store_path)
    store.check_frame(frame)
    with store.raw_frames() as dataset:
        raw = read_raw_frame(dataset, frame)
    tlm_array, ssl_array = store.array(schema.TLM_LABELS), store.array(schema.SSL_MASK)
    tlm_labels = cast(np.ndarray, tlm_array[frame]) if tlm_array is not None else np.zeros(raw.shape, np.uint16)
    ssl_mask = cast(np.ndarray, ssl_array[frame]) if ssl_array is not None else np.zeros(raw.shape, np.uint8)
    detections = store.frame_detections(frame)
    axis_name, axis_values = store.scan_axis(np.array([frame]))

    figure = _new_figure(OVERLAY_FIGSIZE)
    axes = figure.add_axes((0.07, 0.10, 0.82, 0.74))
    colorbar_axes = figure.add_axes((0.91, 0.13, 0.015, 0.68))
    if scale == "log":
        shown = np.clip(raw, 1.0, None)
        norm: Normalize = _log_norm(shown)
    else:
        shown, norm = raw, Normalize(vmin=0.0, vmax=max(1.0, float(raw.max())))
    picture = axes.imshow(shown, cmap="gray", norm=norm, interpolation="nearest", aspect="equal")
    figure.colorbar(picture, cax=colorbar_axes, label=f"counts ({scale})")
    instances = [int(i) for i in np.unique(tlm_labels) if i]
    for window_index, window in enumerate(ndimage.find_objects(tlm_labels.astype(np.int64))):
        instance = window_index + 1
        if window is not None and instance in instances:
            _outline(axes, window[0].start, window[1].start, tlm_labels[window] == instance, "orange", linewidth=1.2)
    if ssl_mask.any():
        axes.contour(ssl_mask > 0, levels=[0.5], colors=["cyan"], linewidths=0.8)
    for (x0, y0, x1, y1), score, instance in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.instance_ids.tolist()):
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=0.9))
        axes.text(x0, y0 - 1, f"{instance}: {score:.2f}", color="yellow", fontsize=8, va="bottom", path_effects=_READABLE)
    where = "" if axis_name == "frame" else f", {axis_name} = {axis_values[0]:.6g}"
    figure.suptitle(f"{store.name} frame {frame}{where} ({scale} scale)", fontsize=12)
    axes.set_title(f"TLM: {len(instances)} instance outlines (orange), {len(detections.scores)} boxes with scores (yellow); "
                   f"SSLM mask outline (cyan)", fontsize=9)
    axes.set_xlabel("x (pixel)")
    axes.set_ylabel("y (pixel)")
    return _save(figure, out)


def busiest_frame(store_path: Path) -> tuple[int, str]:
    """The done frame with the most peak pixels in `volume/labels` (the brightest raw frame if none has any), and why."""
    store = StoreReader(store_path)
    frames = store.done_frames()
    if not frames.size:
        raise StoreError(f"{store.path.name}: no frame is done yet")
    volume = cast(zarr.Array, store.group[schema.VOLUME_LABELS])
    counts = [int(np.count_nonzero(cast(np.ndarray, volume[frame]))) for frame in frames.tolist()]
    best = int(np.argmax(counts))
    if counts[best] > 0:
        return int(frames[best]), f"the most peak pixels ({counts[best]})"
    with store.raw_frames() as dataset:
        maxima = [float(read_raw_frame(dataset, frame).max()) for frame in frames.tolist()]
    best = int(np.argmax(maxima))
    return int(frames[best]), f"no peak pixels in any frame; the brightest raw frame (max {maxima[best]:.0f} counts)"


# -- the static 3D picture of the peak volume ------------------------------------------------


@dataclass(frozen=True)
class VolumeSample:
    """Voxels of the 3D peaks, every `stride`-th one in frame order (so the sample stays small)."""

    frame: np.ndarray
    y: np.ndarray
    x: np.ndarray
    peak_id: np.ndarray
    stride: int
    voxels_total: int
    peak_ids: list[int]  # every 3D peak id in the done frames, also those the sample skipped


def sample_volume(store_path: Path, max_points: int = MAX_VOLUME_POINTS) -> VolumeSample:
    """Every `stride`-th peak voxel of the done frames; the stride doubles whenever the sample outgrows `max_points`."""
    store = StoreReader(store_path)
    volume = cast(zarr.Array, store.group[schema.VOLUME_LABELS])
    parts: list[np.ndarray] = []  # rows of (frame, y, x, id), for voxel numbers 0, stride, 2 * stride, ...
    kept, stride, total = 0, 1, 0
    ids: set[int] = set()
    for frame in store.done_frames().tolist():
        labels = cast(np.ndarray, volume[frame])
        ys, xs = np.nonzero(labels)
        if not ys.size:
            continue
        take = (np.arange(total, total + ys.size) % stride) == 0
        ids.update(np.unique(labels[ys, xs]).tolist())
        rows = np.stack([np.full(ys.size, frame), ys, xs, labels[ys, xs]], axis=1).astype(np.int64)[take]
        parts.append(rows)
        kept += rows.shape[0]
        total += ys.size
        while kept > max_points:  # voxel numbers that are multiples of 2 * stride: every other row kept so far
            merged = np.concatenate(parts)[::2]
            parts, kept, stride = [merged], merged.shape[0], stride * 2
    rows = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    return VolumeSample(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], stride, total, sorted(ids))


def draw_volume(store_path: Path, out: Path | None = None) -> Path:
    """A static 3D scatter of the peak voxels (frame, y, x), coloured by peak id: the viewer without napari."""
    store = StoreReader(store_path)
    sample = sample_volume(store_path)
    n_frames, height, width = cast(zarr.Array, store.group[schema.VOLUME_LABELS]).shape
    figure = _new_figure(VOLUME_FIGSIZE)
    axes = figure.add_subplot(projection="3d")
    if sample.frame.size:
        for peak_id in np.unique(sample.peak_id).tolist():
            here = sample.peak_id == peak_id
            label = f"peak {peak_id}" if peak_id in sample.peak_ids[:MAX_CURVES] else None
            axes.scatter(sample.x[here], sample.frame[here], sample.y[here], color=peak_colour(peak_id), s=2, depthshade=False, label=label)
        more = f" (first {MAX_CURVES} of {len(sample.peak_ids)})" if len(sample.peak_ids) > MAX_CURVES else ""
        axes.legend(loc="upper left", fontsize=8, frameon=False, markerscale=4, title=f"3D peak id{more}")
    else:
        axes.text2D(0.5, 0.5, "no peaks found", transform=axes.transAxes, ha="center", fontsize=12)
    axes.set_xlim(0, width)
    axes.set_ylim(0, max(n_frames - 1, 1))
    axes.set_zlim(height, 0)  # detector row 0 at the top, as in the frame pictures
    axes.set_xlabel("x (pixel)")
    axes.set_ylabel("frame")
    axes.set_zlabel("y (pixel)")
    peaks = len(sample.peak_ids)
    drawn = "" if sample.stride == 1 else f", every {sample.stride}th voxel drawn"
    figure.suptitle(f"{store.name}: 3D peaks ({peaks} ids, {sample.voxels_total} voxels{drawn})", fontsize=12)
    return _save(figure, out if out is not None else store.output_path(".volume3d.png"))
