"""Synthetic Pilatus3 100K frames with known ground truth, whose peaks look like real ones.

Models are trained and the pipeline is tested on frames made here, so realism matters:
peak shapes are real hand-drawn outlines from DiPID's I16 labels (``data/peak_outlines.npz``),
intensities are smooth and Poisson-noisy, and backgrounds carry diffuse scatter, faint
non-peak streaks, hot and dead pixels, so that a plain threshold is not a segmentation.

Two entry points:
- :func:`training_sample`: one independent frame and its instance labels (fast, for training).
- :class:`RockingScan`: a deterministic rocking scan; peaks rise and fall over consecutive
  frames and may drift; any frame can be made on its own, in any order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from matplotlib.path import Path as _PolygonPath
from scipy import ndimage

from pipeline.common.detector import DEAD_PIXEL, FRAME_SHAPE, SATURATION

DEAD_PIXEL_VALUE = DEAD_PIXEL

_PAD = 2  # pixels of margin around each peak image, room for the smoothed rim


@dataclass(frozen=True)
class SynthSettings:
    """Generator knobs; the defaults give realistic I16-like frames."""

    background: float = 2.0
    """Mean flat background counts per pixel."""
    diffuse_amplitude: float = 5.0
    """Peak counts of smooth diffuse scatter (broad blobs, powder-like rings)."""
    streak_probability: float = 0.35
    """Chance per frame (per scan for :class:`RockingScan`) of faint non-peak streaks."""
    peak_max_counts: tuple[float, float] = (30.0, 2e5)
    """Log-uniform range of a peak's maximum counts above background."""
    dead_pixel_fraction: float = 5e-4
    drift_pixels: float = 3.0
    """Largest drift of a peak centre across its rocking curve (pixels)."""
    saturated_peak_probability: float = 0.03
    """Chance that a peak is bright enough to saturate (max counts 1-4 x SATURATION)."""
    hot_pixels_mean: float = 2.0
    """Mean number of isolated hot pixels per frame (per scan for :class:`RockingScan`)."""
    scale_range: tuple[float, float] = (0.8, 1.25)
    """Log-uniform rescaling of a bank outline; keeps sizes within the real range."""
    transpose_probability: float = 0.25
    """Chance that an outline is rotated by 90 degrees (flips are always 50/50)."""
    real_position_probability: float = 0.5
    """Chance that a peak is placed near where its outline was drawn, else uniformly."""
    rocking_sigma_frames: tuple[float, float] = (0.7, 2.5)
    """Log-uniform range of the rocking curve's Gaussian sigma, in frames."""
    detection_sigma: float = 5.0
    """A peak counts as present where its max exceeds this many background sigmas..."""
    detection_min_counts: float = 10.0
    """...and at least this many counts."""
    edge_sigma: float = 1.5
    """Counts above background at a peak's outline, in background sigmas."""
    peaks_per_frame: tuple[float, ...] | None = None
    """Weights for 0, 1, 2, ... peaks per training frame; None = the real DiPID histogram."""

    def __post_init__(self) -> None:
        low, high = self.peak_max_counts
        if not 0 < low <= high:
            raise ValueError(f"peak_max_counts must be 0 < low <= high, got {self.peak_max_counts}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        if not 0 < self.rocking_sigma_frames[0] <= self.rocking_sigma_frames[1]:
            raise ValueError(f"rocking_sigma_frames must be 0 < low <= high, got {self.rocking_sigma_frames}")
        for name in ("background", "diffuse_amplitude", "drift_pixels", "hot_pixels_mean"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("streak_probability", "dead_pixel_fraction", "saturated_peak_probability",
                     "transpose_probability", "real_position_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1]")


# --------------------------------------------------------------------------- outline bank


@dataclass(frozen=True)
class OutlineBank:
    """Real peak outlines: polygons in frame coordinates, their rasters and the peaks-per-frame histogram."""

    points: np.ndarray
    """float32 (N, 2): (x = column, y = row) of all polygons, concatenated."""
    offsets: np.ndarray
    """int64 (P + 1,): polygon i is points[offsets[i]:offsets[i + 1]]."""
    peaks_per_frame: np.ndarray
    """int64 (9,): number of labelled frames with 0..8 peaks."""
    origins: np.ndarray
    """float64 (P, 2): (x, y) of each polygon's bounding-box corner."""
    sizes: np.ndarray
    """float64 (P, 2): (width, height) of each polygon's bounding box, pixels."""
    masks: tuple[np.ndarray, ...] = field(repr=False)
    """Per polygon, bool (h, w): pixels whose centre lies inside it, on its bounding-box grid."""
    levels: tuple[np.ndarray, ...] = field(repr=False)
    """Per polygon, float32 (h, w): distance to the outline / largest such distance, in [0, 1]."""
    raster_origins: np.ndarray = field(repr=False)
    """int64 (P, 2): (row, col) of each raster's top-left pixel in the frame it was drawn on."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def polygon(self, index: int) -> np.ndarray:
        """The outline normalised to its bounding box, (k, 2) (x, y) in [0, 1]; multiply by ``sizes[index]``."""
        xy = self.points[self.offsets[index]:self.offsets[index + 1]].astype(np.float64)
        return (xy - self.origins[index]) / np.maximum(self.sizes[index], 1e-6)


def _rasterise(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Fill a polygon on the pixel grid of its bounding box (pixel centres at +0.5)."""
    col0, row0 = np.floor(xy.min(axis=0)).astype(int)
    col1, row1 = np.ceil(xy.max(axis=0)).astype(int)
    width, height = max(col1 - col0, 1), max(row1 - row0, 1)
    cols, rows = np.meshgrid(np.arange(width) + col0 + 0.5, np.arange(height) + row0 + 0.5)
    inside = _PolygonPath(xy).contains_points(np.column_stack([cols.ravel(), rows.ravel()]))
    mask = inside.reshape(height, width)
    if not mask.any():  # a sliver thinner than a pixel: keep the pixel under its centroid
        centre = xy.mean(axis=0)
        mask[min(int(centre[1] - row0), height - 1), min(int(centre[0] - col0), width - 1)] = True
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    level = (distance / distance.max()).astype(np.float32)
    return mask, level, (int(row0), int(col0))


@functools.lru_cache(maxsize=1)
def load_outline_bank() -> OutlineBank:
    """Load ``pipeline/simulator/data/peak_outlines.npz`` once (no pickle) and rasterise every outline."""
    with resources.files("pipeline.simulator").joinpath("data/peak_outlines.npz").open("rb") as handle:
        with np.load(handle, allow_pickle=False) as data:
            points = np.asarray(data["points"], dtype=np.float32)
            offsets = np.asarray(data["offsets"], dtype=np.int64)
            histogram = np.asarray(data["peaks_per_frame"], dtype=np.int64)
    origins, sizes, masks, levels, raster_origins = [], [], [], [], []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        xy = points[start:stop].astype(np.float64)
        origins.append(xy.min(axis=0))
        sizes.append(np.ptp(xy, axis=0))
        mask, level, origin = _rasterise(xy)
        for array in (mask, level):
            array.setflags(write=False)
        masks.append(mask)
        levels.append(level)
        raster_origins.append(origin)
    return OutlineBank(points=points, offsets=offsets, peaks_per_frame=histogram,
                       origins=np.array(origins), sizes=np.array(sizes), masks=tuple(masks),
                       levels=tuple(levels), raster_origins=np.array(raster_origins, dtype=np.int64))


# --------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class _Shape:
    """A transformed outline: mask and normalised depth, plus where it sat on its real frame."""

    mask: np.ndarray
    level: np.ndarray
    hint: tuple[int, int]
    outline: int


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _draw_shape(rng: np.random.Generator, settings: SynthSettings) -> _Shape:
    """A random real outline, flipped / rotated by 90 degrees / rescaled (nearest neighbour)."""
    bank = load_outline_bank()
    index = int(rng.integers(len(bank)))
    mask, level = bank.masks[index], bank.levels[index]
    if rng.random() < 0.5:
        mask, level = mask[:, ::-1], level[:, ::-1]
    if rng.random() < 0.5:
        mask, level = mask[::-1, :], level[::-1, :]
    if rng.random() < settings.transpose_probability:
        mask, level = mask.T, level.T
    scale = _log_uniform(rng, *settings.scale_range)
    height, width = mask.shape
    new_height = int(min(max(round(height * scale), 1), FRAME_SHAPE[0]))
    new_width = int(min(max(round(width * scale), 1), FRAME_SHAPE[1]))
    if (new_height, new_width) != (height, width):
        rows = ((np.arange(new_height) + 0.5) * height / new_height).astype(np.intp)
        cols = ((np.arange(new_width) + 0.5) * width / new_width).astype(np.intp)
        scaled_mask = mask[np.ix_(rows, cols)]
        if scaled_mask.any():
            mask, level = scaled_mask, level[np.ix_(rows, cols)]
    row0, col0 = bank.raster_origins[index]
    return _Shape(np.ascontiguousarray(mask), np.ascontiguousarray(level), (int(row0), int(col0)), index)


def _draw_peak_max(rng: np.random.Generator, settings: SynthSettings) -> float:
    if rng.random() < settings.saturated_peak_probability:
        return _log_uniform(rng, SATURATION, 4.0 * SATURATION)
    return _log_uniform(rng, *settings.peak_max_counts)


def _detection_level(local_background: float, settings: SynthSettings) -> float:
    """Counts above background a peak's maximum must reach to be called present."""
    return max(settings.detection_sigma * math.sqrt(max(local_background, 0.0)), settings.detection_min_counts)


def _peak_image(rng: np.random.Generator, shape: _Shape, peak_max: float, edge_counts: float,
                row: int, col: int) -> np.ndarray:
    """Expected counts of one peak on its padded bounding box: brightest at a core, down to ~edge at the outline.

    Log-intensity interpolates between the outline level and the maximum along the normalised
    distance from the outline, modulated by a broad Gaussian around a random core so that streaks
    are not uniformly bright along their length; a light blur softens the outline. The core is
    chosen inside the frame (the peak placed with its padded top-left at ``row``, ``col``) so that a
    peak cut by the frame edge still shows its maximum.
    """
    mask, level = shape.mask, shape.level
    height, width = mask.shape
    rows_in = (np.arange(height) + row + _PAD >= 0) & (np.arange(height) + row + _PAD < FRAME_SHAPE[0])
    cols_in = (np.arange(width) + col + _PAD >= 0) & (np.arange(width) + col + _PAD < FRAME_SHAPE[1])
    candidates = mask & np.outer(rows_in, cols_in)
    if not candidates.any():
        candidates = mask
    weights = level[candidates].astype(np.float64) ** 4 + 1e-9
    core = np.flatnonzero(candidates.ravel())[int(rng.choice(weights.size, p=weights / weights.sum()))]
    core_row, core_col = divmod(int(core), width)
    sigma_row = height * rng.uniform(0.25, 0.8) + 1.0
    sigma_col = width * rng.uniform(0.25, 0.8) + 1.0
    along_rows = np.exp(-0.5 * ((np.arange(height) - core_row) / sigma_row) ** 2)
    along_cols = np.exp(-0.5 * ((np.arange(width) - core_col) / sigma_col) ** 2)
    modulation = 0.3 + 0.7 * np.outer(along_rows, along_cols)
    depth = level.astype(np.float64) ** rng.uniform(0.6, 1.6) * modulation
    depth /= depth.max()
    edge_counts = min(edge_counts, peak_max / 3.0)
    image = np.zeros((height + 2 * _PAD, width + 2 * _PAD), dtype=np.float64)
    inner = image[_PAD:_PAD + height, _PAD:_PAD + width]
    inner[mask] = edge_counts * (peak_max / edge_counts) ** depth[mask]
    image = ndimage.gaussian_filter(image, 0.7, truncate=3.0)
    image *= peak_max / image.max()
    return image.astype(np.float32)


def _frame_slices(row: int, col: int, shape: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices into the frame and into a (h, w) patch whose top-left sits at (row, col); None if off-frame."""
    height, width = shape
    top, left = max(row, 0), max(col, 0)
    bottom, right = min(row + height, FRAME_SHAPE[0]), min(col + width, FRAME_SHAPE[1])
    if top >= bottom or left >= right:
        return None
    return ((slice(top, bottom), slice(left, right)),
            (slice(top - row, bottom - row), slice(left - col, right - col)))


def _padded(mask: np.ndarray) -> np.ndarray:
    return np.pad(mask, _PAD)


def _place(rng: np.random.Generator, mask: np.ndarray, hint: tuple[int, int], occupied: np.ndarray,
           settings: SynthSettings, margin: int = 2, tries: int = 40) -> tuple[int, int] | None:
    """Top-left (row, col) of the padded patch so the peak is mostly in the frame and clear of ``occupied``.

    Peaks may cross the frame edge like real ones, but keep at least 40 % of their area inside.
    """
    padded = _padded(mask)
    height, width = padded.shape
    area = int(mask.sum())
    footprint = ndimage.binary_dilation(padded, iterations=margin) if margin > 0 else padded
    for _ in range(tries):
        if rng.random() < settings.real_position_probability:
            row = hint[0] - _PAD + int(rng.integers(-15, 16))
            col = hint[1] - _PAD + int(rng.integers(-40, 41))
        else:
            row = int(rng.integers(-height // 4, FRAME_SHAPE[0] - 3 * height // 4 + 1))
            col = int(rng.integers(-width // 4, FRAME_SHAPE[1] - 3 * width // 4 + 1))
        slices = _frame_slices(row, col, padded.shape)
        if slices is None:
            continue
        in_frame, in_patch = slices
        if padded[in_patch].sum() < max(1, 0.4 * area):
            continue
        if (occupied[in_frame] & footprint[in_patch]).any():
            continue
        return row, col
    return None


def _background(rng: np.random.Generator, settings: SynthSettings) -> np.ndarray:
    """Expected counts without peaks: flat + smooth diffuse scatter + faint streaks + hot pixels."""
    height, width = FRAME_SHAPE
    rows = np.arange(height, dtype=np.float64)
    cols = np.arange(width, dtype=np.float64)
    expected = np.full(FRAME_SHAPE, settings.background * rng.uniform(0.7, 1.3))
    if settings.diffuse_amplitude > 0:
        for _ in range(int(rng.integers(1, 4))):  # broad blobs, separable so cheap
            centre_row, centre_col = rng.uniform(-60, height + 60), rng.uniform(-100, width + 100)
            sigma_row, sigma_col = rng.uniform(30, 200), rng.uniform(40, 300)
            amplitude = settings.diffuse_amplitude * rng.uniform(0.2, 1.0)
            expected += amplitude * np.outer(np.exp(-0.5 * ((rows - centre_row) / sigma_row) ** 2),
                                             np.exp(-0.5 * ((cols - centre_col) / sigma_col) ** 2))
        if rng.random() < 0.4:  # a broad powder-like ring whose centre is off the detector
            centre_row, centre_col = rng.uniform(-600, height + 600), rng.uniform(-600, width + 600)
            radius = math.hypot(rng.uniform(0, height) - centre_row, rng.uniform(0, width) - centre_col)
            distance = np.hypot(rows[:, None] - centre_row, cols[None, :] - centre_col)
            ring_width = rng.uniform(4, 25)
            expected += settings.diffuse_amplitude * rng.uniform(0.2, 1.0) * np.exp(
                -0.5 * ((distance - radius) / ring_width) ** 2)
    if rng.random() < settings.streak_probability:
        for _ in range(int(rng.integers(1, 3))):
            _add_streak(rng, expected, settings)
    n_hot = int(rng.poisson(settings.hot_pixels_mean))
    if n_hot:
        flat = rng.integers(0, expected.size, n_hot)
        expected.ravel()[flat] += np.exp(rng.uniform(math.log(30), math.log(3000), n_hot))
    return expected


def _add_streak(rng: np.random.Generator, expected: np.ndarray, settings: SynthSettings) -> None:
    """A faint, thin, non-peak line segment (air scatter, a powder-ring arc): not part of the truth."""
    length = rng.uniform(20, 300)
    angle = rng.uniform(0, math.pi)
    centre = np.array([rng.uniform(0, FRAME_SHAPE[0]), rng.uniform(0, FRAME_SHAPE[1])])
    direction = np.array([math.sin(angle), math.cos(angle)])
    start, stop = centre - direction * length / 2, centre + direction * length / 2
    sigma = rng.uniform(0.6, 1.5)
    margin = 4 * sigma + 1
    top = int(max(min(start[0], stop[0]) - margin, 0))
    bottom = int(min(max(start[0], stop[0]) + margin, FRAME_SHAPE[0]))
    left = int(max(min(start[1], stop[1]) - margin, 0))
    right = int(min(max(start[1], stop[1]) + margin, FRAME_SHAPE[1]))
    if top >= bottom or left >= right:
        return
    rows, cols = np.mgrid[top:bottom, left:right].astype(np.float64)
    along = np.clip((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1], 0, length)
    distance = np.hypot(rows - (start[0] + along * direction[0]), cols - (start[1] + along * direction[1]))
    amplitude = _log_uniform(rng, 2.0, 12.0)
    taper = np.sqrt(np.clip(np.sin(np.pi * along / length), 0.0, None))
    expected[top:bottom, left:right] += amplitude * taper * np.exp(-0.5 * (distance / sigma) ** 2)


def _dead_pixels(rng: np.random.Generator, settings: SynthSettings) -> np.ndarray:
    """(k, 2) int (row, col) of dead pixels, sorted."""
    size = FRAME_SHAPE[0] * FRAME_SHAPE[1]
    count = int(rng.binomial(size, settings.dead_pixel_fraction)) if settings.dead_pixel_fraction > 0 else 0
    flat = np.sort(rng.choice(size, count, replace=False)) if count else np.zeros(0, dtype=np.int64)
    return np.column_stack(np.unravel_index(flat, FRAME_SHAPE)).astype(np.int64).reshape(-1, 2)


def _observe(rng: np.random.Generator, expected: np.ndarray, dead_pixels: np.ndarray) -> np.ndarray:
    """Detector counts: Poisson noise, saturation clip, then dead pixels at -2 (as the Pilatus reports them)."""
    counts = rng.poisson(np.maximum(expected, 0.0))
    np.minimum(counts, SATURATION, out=counts)
    counts = counts.astype(np.int32)
    if len(dead_pixels):
        counts[dead_pixels[:, 0], dead_pixels[:, 1]] = DEAD_PIXEL_VALUE
    return counts


def _peaks_per_frame_weights(settings: SynthSettings) -> np.ndarray:
    source: tuple[float, ...] | np.ndarray | None = settings.peaks_per_frame
    if source is None:
        source = load_outline_bank().peaks_per_frame
    weights = np.asarray(source, dtype=np.float64)
    return weights / weights.sum()


def _local_background(expected: np.ndarray, mask: np.ndarray, row: int, col: int) -> float:
    """Mean expected background under a peak's (padded) mask placed at (row, col)."""
    padded = _padded(mask)
    slices = _frame_slices(row, col, padded.shape)
    if slices is None:
        return float(expected.mean())
    in_frame, in_patch = slices
    values = expected[in_frame][padded[in_patch]]
    return float(values.mean()) if values.size else float(expected.mean())


def _edge_counts(local_background: float, settings: SynthSettings) -> float:
    return max(settings.edge_sigma * math.sqrt(local_background + 1.0), 2.0)


# --------------------------------------------------------------------------- public generators


def training_sample(rng: np.random.Generator, settings: SynthSettings = SynthSettings()) -> tuple[np.ndarray, np.ndarray]:
    """One independent frame: (counts int32 (195, 487), instance labels uint16 (195, 487)).

    Labels are 0 for background and 1..n, one id per peak; the number of peaks follows the real
    per-frame distribution (0..8). Peaks never overlap and are always above the detection level.
    """
    expected = _background(rng, settings)
    labels = np.zeros(FRAME_SHAPE, dtype=np.uint16)
    occupied = np.zeros(FRAME_SHAPE, dtype=bool)
    weights = _peaks_per_frame_weights(settings)
    n_peaks = int(rng.choice(len(weights), p=weights))
    next_id = 1
    for _ in range(n_peaks):
        shape = _draw_shape(rng, settings)
        position = _place(rng, shape.mask, shape.hint, occupied, settings)
        if position is None:
            continue
        row, col = position
        local = _local_background(expected, shape.mask, row, col)
        peak_max = max(_draw_peak_max(rng, settings), 1.5 * _detection_level(local, settings))
        image = _peak_image(rng, shape, peak_max, _edge_counts(local, settings), row, col)
        padded = _padded(shape.mask)
        slices = _frame_slices(row, col, padded.shape)
        assert slices is not None  # _place only returns positions that overlap the frame
        in_frame, in_patch = slices
        expected[in_frame] += image[in_patch]
        labels[in_frame][padded[in_patch]] = next_id
        occupied[in_frame] |= padded[in_patch]
        next_id += 1
    return _observe(rng, expected, _dead_pixels(rng, settings)), labels


@dataclass(frozen=True)
class TruePeak:
    """Ground truth of one 3D peak of a :class:`RockingScan`."""

    id: int
    first_frame: int
    """First frame where the peak is present (its max is above the detection level)."""
    last_frame: int
    centre_frame: int
    """Frame nearest to the rocking-curve maximum."""
    rocking_centre: float
    rocking_sigma: float
    max_counts: float
    """Expected counts above background at the core, at the rocking-curve maximum."""
    row: int
    """Top-left row of the peak's bounding box at the rocking-curve maximum (may be < 0 at an edge)."""
    col: int
    height: int
    width: int
    drift_per_frame: tuple[float, float]
    """(rows, cols) the peak moves per frame."""
    outline: int
    """Index of its outline in :func:`load_outline_bank`."""

    def offset(self, frame: int) -> tuple[int, int]:
        """Integer (row, col) drift of the peak at a frame, relative to its position at the rocking maximum."""
        steps = frame - self.rocking_centre
        return int(round(steps * self.drift_per_frame[0])), int(round(steps * self.drift_per_frame[1]))


class RockingScan:
    """A deterministic simulated rocking scan (eta), any frame computable on its own.

    The scene (background, dead pixels, peaks, their rocking curves and drifts) comes from
    ``seed``; frame ``i``'s noise comes from ``(seed, i)``, so frames are reproducible in any order.
    Truth ids are the 3D peak ids 1..n; a peak's truth in a frame is its outline at that frame's
    drifted position, in the consecutive frames first_frame..last_frame where it is detectable.
    """

    axis_name = "eta"
    AXIS_START = 10.0
    AXIS_STEP = 0.02

    @classmethod
    def axis_for(cls, n_frames: int) -> np.ndarray:
        """The eta of every frame, without placing the scan's peaks (which takes seconds for a long scan)."""
        return cls.AXIS_START + cls.AXIS_STEP * np.arange(n_frames, dtype=np.float64)

    def __init__(self, n_frames: int, seed: int, settings: SynthSettings = SynthSettings(),
                 n_peaks: int | None = None) -> None:
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        if n_peaks is not None and n_peaks < 0:
            raise ValueError(f"n_peaks must be >= 0, got {n_peaks}")
        self.n_frames = int(n_frames)
        self.seed = int(seed)
        self.settings = settings
        self.axis_values = self.axis_for(self.n_frames)
        rng = np.random.default_rng([self.seed, 0])
        self._background = _background(rng, settings)
        self._background_low = float(self._background.min())
        self._background_high = float(np.quantile(self._background, 0.999))
        self.dead_pixels = _dead_pixels(rng, settings)
        if n_peaks is None:  # about 1.6 peaks present per frame, as in the real labels (spans ~9 frames)
            n_peaks = max(1, int(rng.poisson(1.6 * self.n_frames / 9.0)))
        self.peaks: list[TruePeak] = []
        self._images: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._footprints: list[np.ndarray] = []
        self._lit: list[tuple[int, int]] = []  # frames where a peak adds any counts at all
        for _ in range(n_peaks):
            self._add_peak(rng)

    def _add_peak(self, rng: np.random.Generator) -> None:
        settings = self.settings
        shape = _draw_shape(rng, settings)
        centre = float(rng.uniform(0, self.n_frames - 1))
        sigma = _log_uniform(rng, *settings.rocking_sigma_frames)
        angle = rng.uniform(0, 2 * math.pi)
        drift = rng.uniform(0, settings.drift_pixels)
        # The detection level depends on where the peak lands; bound it by the background's range
        # (hot pixels aside) so that the frames it may be present in are known before placing it.
        peak_max = max(_draw_peak_max(rng, settings),
                       1.5 * _detection_level(self._background_high, settings))
        frames = np.arange(self.n_frames)
        curve = peak_max * np.exp(-0.5 * ((frames - centre) / sigma) ** 2)
        may_be_present = np.flatnonzero(curve >= _detection_level(self._background_low, settings))
        # Peaks present in overlapping frames must not overlap in space.
        occupied = np.zeros(FRAME_SHAPE, dtype=bool)
        for other, footprint in zip(self.peaks, self._footprints):
            if other.first_frame <= may_be_present[-1] + 1 and other.last_frame >= may_be_present[0] - 1:
                occupied |= footprint
        position = _place(rng, shape.mask, shape.hint, occupied, settings, margin=2 + int(math.ceil(drift)))
        if position is None:
            return
        row, col = position
        local = _local_background(self._background, shape.mask, row, col)
        present = np.flatnonzero(curve >= _detection_level(local, settings))
        lit = np.flatnonzero(curve >= 0.05)
        first, last = int(present[0]), int(present[-1])
        span = max(last - first, 1)
        drift_per_frame = (drift * math.sin(angle) / span, drift * math.cos(angle) / span)
        padded = _padded(shape.mask)
        peak = TruePeak(id=len(self.peaks) + 1, first_frame=first, last_frame=last,
                        centre_frame=int(np.clip(round(centre), first, last)), rocking_centre=centre,
                        rocking_sigma=sigma, max_counts=peak_max, row=row, col=col,
                        height=padded.shape[0], width=padded.shape[1],
                        drift_per_frame=drift_per_frame, outline=shape.outline)
        footprint = np.zeros(FRAME_SHAPE, dtype=bool)
        for frame in range(first, last + 1):
            slices = self._patch_slices(peak, frame)
            if slices is not None:
                footprint[slices[0]] |= padded[slices[1]]
        self.peaks.append(peak)
        self._images.append(_peak_image(rng, shape, peak_max, _edge_counts(local, settings), row, col))
        self._masks.append(padded)
        self._footprints.append(ndimage.binary_dilation(footprint, iterations=2))
        self._lit.append((int(lit[0]), int(lit[-1])))

    @staticmethod
    def _patch_slices(peak: TruePeak, frame: int) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
        d_row, d_col = peak.offset(frame)
        return _frame_slices(peak.row + d_row, peak.col + d_col, (peak.height, peak.width))

    def expected(self, index: int) -> np.ndarray:
        """Noise-free expected counts of frame ``index`` (float64), e.g. for checking a model against the signal."""
        self._check_index(index)
        expected = self._background.copy()
        for peak, image, (lit_first, lit_last) in zip(self.peaks, self._images, self._lit):
            if lit_first <= index <= lit_last:
                slices = self._patch_slices(peak, index)
                if slices is not None:
                    gain = math.exp(-0.5 * ((index - peak.rocking_centre) / peak.rocking_sigma) ** 2)
                    expected[slices[0]] += gain * image[slices[1]]
        return expected

    def truth(self, index: int) -> np.ndarray:
        """uint16 (195, 487): 3D peak id per pixel in frame ``index``."""
        self._check_index(index)
        truth = np.zeros(FRAME_SHAPE, dtype=np.uint16)
        for peak, mask in zip(self.peaks, self._masks):
            if peak.first_frame <= index <= peak.last_frame:
                slices = self._patch_slices(peak, index)
                if slices is not None:
                    truth[slices[0]][mask[slices[1]]] = peak.id
        return truth

    def frame(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(counts int32, truth uint16 with the 3D peak id per pixel); same seed + index, same arrays."""
        rng = np.random.default_rng([self.seed, 1, int(index)])
        return _observe(rng, self.expected(index), self.dead_pixels), self.truth(index)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.n_frames:
            raise IndexError(f"frame {index} outside 0..{self.n_frames - 1}")

    def __len__(self) -> int:
        return self.n_frames
