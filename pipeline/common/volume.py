"""Link per-frame peak masks into 3D peaks, one frame at a time, without holding the scan in memory.

Frames must be linked in index order. A 2D component (8-connected, at least `min_pixels` pixels:
single hot pixels and specks are not peaks) of frame k continues the 3D peak of frame k-1 that it
overlaps most (ties: the lower id); a component that overlaps nothing starts a new peak. Ids are assigned in order of first appearance, so the same
masks always give the same ids, whether linked live or offline or resumed half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.common.zeros import shared_zeros
from pipeline.store.schema import PEAK_COLUMNS

__all__ = ["PEAK_COLUMNS", "VolumeLinker", "volume_components"]

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
MIN_PEAK_PIXELS = 5
"""2D components smaller than this are dropped before linking (the evaluation counts instances the same way)."""


@dataclass
class PeakStats:
    """Running sums from which the peaks table is derived; centroids are intensity-weighted."""

    id: int
    first_frame: int
    last_frame: int
    voxels: int = 0
    intensity_sum: float = 0.0
    intensity_max: float = 0.0
    weighted_frame: float = 0.0
    weighted_y: float = 0.0
    weighted_x: float = 0.0
    plain_frame: float = 0.0
    plain_y: float = 0.0
    plain_x: float = 0.0

    def centroid(self) -> tuple[float, float, float]:
        if self.intensity_sum > 0:
            w = self.intensity_sum
            return self.weighted_frame / w, self.weighted_y / w, self.weighted_x / w
        n = max(self.voxels, 1)
        return self.plain_frame / n, self.plain_y / n, self.plain_x / n


def volume_components(mask: np.ndarray, min_pixels: int = MIN_PEAK_PIXELS) -> tuple[np.ndarray, int]:
    """(int32 labels 1..count, count) of the 8-connected components of `mask` with at least `min_pixels` pixels."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    if count == 0 or min_pixels <= 1:
        return labels, count
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    new_ids = np.zeros(count + 1, dtype=labels.dtype)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return np.take(new_ids, labels), int(keep.sum())


class VolumeLinker:
    """Incremental 3D labelling; see the module docstring for the rule."""

    def __init__(self, min_pixels: int = 1) -> None:
        self.min_pixels = min_pixels
        self.next_frame = 0
        self.next_id = 1
        self.previous: np.ndarray | None = None
        self.peaks: dict[int, PeakStats] = {}
        self.axis_values: dict[int, float] = {}

    def link(self, index: int, mask: np.ndarray, raw: np.ndarray, axis_value: float | None = None) -> np.ndarray:
        """The uint32 3D labels of frame `index`, which must be the next frame in order."""
        if index != self.next_frame:
            raise ValueError(f"frame {index} linked out of order (expected {self.next_frame})")
        mask = np.asarray(mask, dtype=bool)
        # the work is done at the masked pixels only (a few thousand of a frame's 95,000): whole-frame gathers and
        # scans cost more than the labelling itself at ~1,000 frames/s (docs/performance.md)
        at = np.flatnonzero(mask)
        labels = shared_zeros(mask.shape, "uint32")  # a frame without peaks (pipeline.common.zeros)
        if at.size:  # most frames of a scan hold no peak: no labelling to do
            component_at, count = self._components_at(mask, at)
            if count:
                kept = component_at > 0
                at, component_at = at[kept], component_at[kept]
                ids_at = self._assign(at, component_at, count)[component_at]
                labels = np.zeros(mask.shape, dtype=np.uint32)
                labels.reshape(-1)[at] = ids_at
                self._add(index, at, ids_at, raw, mask.shape[-1])
        self._advance(index, labels, axis_value)
        return labels

    def _components_at(self, mask: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, int]:
        """The component (1..count, 0 = too small) of each masked pixel at `at`, as `volume_components` numbers them."""
        # labelled within the masked pixels' bounding box: the same components, numbered the same (raster order is
        # kept), and the labelling, the largest cost of a frame with peaks, scans only that box
        width = mask.shape[-1]
        columns = at % width
        box = mask[at[0] // width:at[-1] // width + 1, columns.min():columns.max() + 1]  # `at` is in raster order
        components, count = ndimage.label(box, structure=EIGHT_CONNECTED)
        component_at = components[box]  # in the order of `at`: row by row, as np.flatnonzero
        if count == 0 or self.min_pixels <= 1:
            return component_at, count
        keep = np.bincount(component_at, minlength=count + 1) >= self.min_pixels
        keep[0] = False
        new_ids = np.zeros(count + 1, dtype=component_at.dtype)
        new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=component_at.dtype)
        return new_ids[component_at], int(keep.sum())

    def _assign(self, at: np.ndarray, component_at: np.ndarray, count: int) -> np.ndarray:
        """The 3D id of each component 0..count (0 stays 0): the previous frame's it overlaps most, or a new one."""
        ids = np.zeros(count + 1, dtype=np.uint32)
        if self.previous is not None:
            previous_at = self.previous.reshape(-1)[at]
            overlap = previous_at > 0
            if overlap.any():
                # each (component, previous id) pair as one integer: np.unique over an (n, 2) array sorts structured
                # rows one comparison call at a time, the largest cost of a frame with peaks; the order is the same
                component_of = component_at[overlap].astype(np.int64)
                previous_of = previous_at[overlap].astype(np.int64)
                span = int(previous_of.max()) + 1
                keys, counts = np.unique(component_of * span + previous_of, return_counts=True)
                unique_component, unique_previous = np.divmod(keys, span)
                # most overlap first, then lowest previous id: np.lexsort sorts by the last key first
                order = np.lexsort((unique_previous, -counts))
                for component, previous_id in zip(unique_component[order].tolist(), unique_previous[order].tolist()):
                    if ids[component] == 0:
                        ids[component] = previous_id
        for component in range(1, count + 1):
            if ids[component] == 0:
                ids[component] = self.next_id
                self.next_id += 1
        return ids

    def record(self, index: int, labels: np.ndarray, raw: np.ndarray, axis_value: float | None) -> None:
        """Add a frame's already-assigned labels to the running sums (also used to replay on resume)."""
        at = np.flatnonzero(labels != 0)  # ~5x faster than flatnonzero on the uint32 labels themselves
        if at.size:
            self._add(index, at, labels.reshape(-1)[at], raw, labels.shape[-1])
        self._advance(index, labels, axis_value)

    def _advance(self, index: int, labels: np.ndarray, axis_value: float | None) -> None:
        if axis_value is not None:
            self.axis_values[index] = axis_value
        self.previous = labels
        self.next_frame = index + 1

    def _add(self, index: int, at: np.ndarray, ids_at: np.ndarray, raw: np.ndarray, width: int) -> None:
        """Add the labelled pixels at flat positions `at` (ids `ids_at`) of frame `index` to their peaks' sums."""
        ids = ids_at.astype(np.intp)
        present = np.unique(ids)
        self.next_id = max(self.next_id, int(present[-1]) + 1)
        ys, xs = np.divmod(at, width)
        # the weights at the labelled pixels only: the whole frame as float64 is 760 KB a frame for nothing
        w = np.clip(np.asarray(raw).reshape(-1)[at].astype(np.float64), 0, None)
        n_max = int(present[-1]) + 1
        voxels = np.bincount(ids, minlength=n_max)
        w_sum = np.bincount(ids, weights=w, minlength=n_max)
        wy = np.bincount(ids, weights=w * ys, minlength=n_max)
        wx = np.bincount(ids, weights=w * xs, minlength=n_max)
        py = np.bincount(ids, weights=ys, minlength=n_max)
        px = np.bincount(ids, weights=xs, minlength=n_max)
        w_max = np.zeros(n_max)
        np.maximum.at(w_max, ids, w)
        for peak_id in present.tolist():
            stats = self.peaks.setdefault(peak_id, PeakStats(peak_id, index, index))
            stats.last_frame = index
            stats.voxels += int(voxels[peak_id])
            stats.intensity_sum += float(w_sum[peak_id])
            stats.intensity_max = max(stats.intensity_max, float(w_max[peak_id]))
            stats.weighted_frame += float(w_sum[peak_id]) * index
            stats.weighted_y += float(wy[peak_id])
            stats.weighted_x += float(wx[peak_id])
            stats.plain_frame += float(voxels[peak_id]) * index
            stats.plain_y += float(py[peak_id])
            stats.plain_x += float(px[peak_id])

    def table(self) -> dict[str, np.ndarray]:
        """The peaks table, one row per 3D peak, ordered by id."""
        rows = [self.peaks[k] for k in sorted(self.peaks)]
        centroids = np.array([p.centroid() for p in rows], dtype=np.float64).reshape(-1, 3)
        axis = [self.axis_values.get(int(round(c[0])), np.nan) for c in centroids]
        return {
            "id": np.array([p.id for p in rows], dtype=np.uint32),
            "first_frame": np.array([p.first_frame for p in rows], dtype=np.int64),
            "last_frame": np.array([p.last_frame for p in rows], dtype=np.int64),
            "centroid_frame": centroids[:, 0],
            "centroid_y": centroids[:, 1],
            "centroid_x": centroids[:, 2],
            "voxels": np.array([p.voxels for p in rows], dtype=np.int64),
            "intensity_sum": np.array([p.intensity_sum for p in rows], dtype=np.float64),
            "intensity_max": np.array([p.intensity_max for p in rows], dtype=np.float64),
            "axis_value": np.array(axis, dtype=np.float64),
        }
