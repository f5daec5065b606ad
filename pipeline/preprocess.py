"""Frame clean-up and the one normalisation every model shares.

Pilatus frames carry dead pixels (read as -2) and counts spanning 0..1e6. Both models and the
classical baseline see the same `to_model_input` output, so a change here changes them all.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SATURATION = 1_000_000
_LOG_SCALE = float(np.log1p(SATURATION))
_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=np.float64)


def fix_dead_pixels(frame: np.ndarray) -> np.ndarray:
    """Pixels < 0 replaced by the mean of their positive 8-neighbours (0 if none), as DiPID did.

    Vectorised: two 3x3 convolutions (sum and count of positive neighbours) instead of DiPID's
    per-pixel loop. Non-finite pixels count as dead. Returns a float64 copy; the input is untouched.
    """
    values = np.asarray(frame, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {values.shape}")
    finite = np.isfinite(values)
    dead = (values < 0) | ~finite
    if not dead.any():
        return values.copy()
    positive = np.where(finite & (values > 0), values, 0.0)
    total = ndimage.convolve(positive, _NEIGHBOURS, mode="constant", cval=0.0)
    count = ndimage.convolve((positive > 0).astype(np.float64), _NEIGHBOURS, mode="constant", cval=0.0)
    fixed = np.where(finite, values, 0.0)
    fixed[dead] = np.divide(total, count, out=np.zeros_like(total), where=count > 0)[dead]
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
