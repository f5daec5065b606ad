"""Frame clean-up and the two normalisations the models see.

Pilatus frames carry dead pixels (read as -2) and counts spanning 0..1e6. The TLM and the
classical baseline see `to_model_input` (log counts). An SSLM whose card says
`input_transform: significance` sees `to_significance` instead: counts above a smooth local background in
units of its Poisson noise. The SSLM only looks 5x5 pixels around a pixel, so on log counts it
cannot tell a faint peak from the top of a broad diffuse hump; after background subtraction it can.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage, special

from pipeline.common.detector import SATURATION

_LOG_SCALE = float(np.log1p(SATURATION))
BACKGROUND_BLOCK = 24
"""Side of the square blocks whose low percentile estimates the local background (pixels)."""
BACKGROUND_PERCENTILE = 30.0
"""Low enough that a peak covering most of a block does not lift its background estimate."""
SIGNIFICANCE_SCALE = float(np.arcsinh(1000.0))
"""`to_significance` maps 1000 sigma to 1.0; asinh keeps the noise (|s| ~ 1) linear."""
_OFFSETS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])  # the 8 neighbours (row, column)


def fix_dead_pixels(frame: np.ndarray) -> np.ndarray:
    """Pixels < 0 replaced by the mean of their positive 8-neighbours (0 if none), as DiPID did.

    Vectorised over the dead pixels only (a frame has tens of them): their 8 neighbours gathered at
    once, instead of DiPID's per-pixel loop or two whole-frame convolutions (3 ms a frame). Non-finite
    pixels count as dead. Returns a float64 copy; the input is untouched.
    """
    values = np.asarray(frame, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {values.shape}")
    finite = np.isfinite(values)
    dead = (values < 0) | ~finite
    fixed = np.where(finite, values, 0.0)
    rows, cols = np.nonzero(dead)
    if rows.size == 0:
        return fixed
    height, width = values.shape
    neighbour_rows = rows[:, None] + _OFFSETS[:, 0]  # (dead pixels, 8)
    neighbour_cols = cols[:, None] + _OFFSETS[:, 1]
    inside = (neighbour_rows >= 0) & (neighbour_rows < height) & (neighbour_cols >= 0) & (neighbour_cols < width)
    neighbours = fixed[np.clip(neighbour_rows, 0, height - 1), np.clip(neighbour_cols, 0, width - 1)]  # non-finite: 0 here
    positive = inside & (neighbours > 0)
    total = np.where(positive, neighbours, 0.0).sum(axis=1)
    count = positive.sum(axis=1)
    fixed[rows, cols] = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return fixed


def fix_dead_pixels_slow(frame: np.ndarray) -> np.ndarray:
    """DiPID's per-pixel Python loop, kept only as the benchmark baseline for `fix_dead_pixels`.

    Gives the same result as the vectorised version (up to float summation order); do not use it
    in the pipeline: its cost grows with the number of dead pixels at Python speed.
    """
    values = np.asarray(frame, dtype=np.float64)
    finite = np.isfinite(values)
    source = np.where(finite, values, -1.0)
    fixed = np.where(finite, values, 0.0)
    rows, cols = values.shape
    for y in range(rows):
        for x in range(cols):
            if source[y, x] >= 0:
                continue
            neighbours = []
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if (dy or dx) and 0 <= ny < rows and 0 <= nx < cols and source[ny, nx] > 0:
                        neighbours.append(source[ny, nx])
            fixed[y, x] = sum(neighbours) / len(neighbours) if neighbours else 0.0
    return fixed


def to_model_input(frame: np.ndarray) -> np.ndarray:
    """Counts -> float32 in [0, 1]: log1p(clip(x, 0, 1e6)) / log1p(1e6); NaN and -inf -> 0, +inf -> 1.

    A log scale because counts span six decades: a linear scale would leave weak peaks at ~1e-5.
    """
    values = np.asarray(frame, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=SATURATION, neginf=0.0)
    return (np.log1p(np.clip(values, 0.0, SATURATION)) / _LOG_SCALE).astype(np.float32)


def prepare(frame: np.ndarray) -> np.ndarray:
    """Raw counts -> model input: dead pixels fixed, then normalised."""
    return to_model_input(fix_dead_pixels(frame))


def local_background(frame: np.ndarray, block: int = BACKGROUND_BLOCK,
                     percentile: float = BACKGROUND_PERCENTILE) -> np.ndarray:
    """Smooth expected background counts of a dead-pixel-fixed frame, same shape as the frame.

    The `percentile` of each `block` x `block` tile (edges reflected), moved up to the mean as for
    Poisson noise (normal quantile times sqrt), a 3x3 median over the tiles (one tile full
    of peak does not count), then bilinear interpolation between tile centres.
    A few ms per frame; broad diffuse scatter and powder rings are followed, peaks are not.
    """
    values = np.asarray(frame, dtype=np.float64)
    height, width = values.shape
    padded = np.pad(values, ((0, -height % block), (0, -width % block)), mode="reflect")
    rows, cols = padded.shape[0] // block, padded.shape[1] // block
    tiles = padded.reshape(rows, block, cols, block).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    low = np.maximum(np.percentile(tiles, percentile, axis=2), 0.0)
    low = low - special.ndtri(percentile / 100.0) * np.sqrt(low)  # the 30th percentile is 0.52 sigma low
    grid = ndimage.median_filter(low, size=3, mode="nearest")
    # bilinear between tile centres, held at the edges: what map_coordinates(order=1, mode="nearest") gives, as two small
    # matrix products (0.3 ms instead of 4 ms a frame)
    return _interpolation_weights(height, rows, block) @ grid @ _interpolation_weights(width, cols, block).T


@functools.lru_cache(maxsize=16)
def _interpolation_weights(pixels: int, tiles: int, block: int) -> np.ndarray:
    """(pixels, tiles): each pixel's linear weights on the two tile centres either side of it, clamped at the ends."""
    position = np.clip((np.arange(pixels, dtype=np.float64) - (block - 1) / 2.0) / block, 0.0, tiles - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, tiles - 1)
    weights = np.zeros((pixels, tiles))
    np.add.at(weights, (np.arange(pixels), below), 1.0 - (position - below))
    np.add.at(weights, (np.arange(pixels), above), position - below)
    weights.flags.writeable = False
    return weights


def to_significance(fixed_frame: np.ndarray) -> np.ndarray:
    """Dead-pixel-fixed counts -> float32 asinh((counts - background) / sqrt(background + 1)) / asinh(1000)."""
    values = np.nan_to_num(np.asarray(fixed_frame, dtype=np.float64), nan=0.0, posinf=SATURATION, neginf=0.0)
    values = np.clip(values, 0.0, SATURATION)
    background = np.maximum(local_background(values), 0.0)
    significance = (values - background) / np.sqrt(background + 1.0)
    return (np.arcsinh(significance) / SIGNIFICANCE_SCALE).astype(np.float32)


def prepare_significance(frame: np.ndarray) -> np.ndarray:
    """Raw counts -> the significance input: dead pixels fixed, then `to_significance`."""
    return to_significance(fix_dead_pixels(frame))


INPUT_TRANSFORMS = {"log": prepare, "significance": prepare_significance}
"""Raw counts -> model input, by the name a model card gives (`input_transform`; None means "log")."""
