"""The preprocessing of `pipeline.models.preprocess` in torch, so that on a GPU it runs where the models run.

Why: on the H200 a worker spent ~11 ms of CPU per frame on dead pixels, the log scale and the
significance input before the GPU saw the frame (docs/performance.md), more than the SSLM itself took.
Here the raw counts go to the device once and everything after happens there, in float64 as the
NumPy version does, for a batch of frames at a time. The NumPy version stays the reference (and
what a CPU worker runs): `tests/test_preprocess.py` checks both give the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy import special

from pipeline.common.detector import SATURATION
from pipeline.models.preprocess import (
    _LOG_SCALE,
    BACKGROUND_BLOCK,
    BACKGROUND_PERCENTILE,
    SIGNIFICANCE_SCALE,
    _interpolation_weights,
)

_POISSON_SHIFT = float(special.ndtri(BACKGROUND_PERCENTILE / 100.0))  # the low percentile is this many sigma below the mean


def fix_dead_pixels(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W) counts -> float64: pixels < 0 (or non-finite) replaced by the mean of their positive 8-neighbours."""
    values = frames.to(torch.float64)
    finite = torch.isfinite(values)
    fixed = torch.where(finite, values, torch.zeros_like(values))
    dead = (values < 0) | ~finite
    positive = torch.where(fixed > 0, fixed, torch.zeros_like(fixed))
    kernel = torch.ones((1, 1, 3, 3), dtype=torch.float64, device=values.device)
    kernel[0, 0, 1, 1] = 0.0
    total = F.conv2d(positive[:, None], kernel, padding=1)[:, 0]
    count = F.conv2d((positive > 0).to(torch.float64)[:, None], kernel, padding=1)[:, 0]
    mean = torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))
    return torch.where(dead, mean, fixed)


def to_model_input(fixed: torch.Tensor) -> torch.Tensor:
    """Fixed counts -> float32 log1p(clip(x, 0, 1e6)) / log1p(1e6), as `preprocess.to_model_input`."""
    values = torch.nan_to_num(fixed, nan=0.0, posinf=float(SATURATION), neginf=0.0)
    return (torch.log1p(values.clamp(0.0, float(SATURATION))) / _LOG_SCALE).to(torch.float32)


def local_background(fixed: torch.Tensor, block: int = BACKGROUND_BLOCK, percentile: float = BACKGROUND_PERCENTILE) -> torch.Tensor:
    """(B, H, W) -> the smooth background of each frame, as `preprocess.local_background`."""
    count, height, width = fixed.shape
    padded = _reflect_pad(fixed[:, None], -height % block, -width % block)[:, 0]
    rows, cols = padded.shape[1] // block, padded.shape[2] // block
    tiles = padded.reshape(count, rows, block, cols, block).permute(0, 1, 3, 2, 4).reshape(count, rows, cols, block * block)
    low = torch.quantile(tiles, percentile / 100.0, dim=-1).clamp(min=0.0)  # linear interpolation, as NumPy's default
    low = low - _POISSON_SHIFT * torch.sqrt(low)
    edged = F.pad(low[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]  # scipy's mode="nearest"
    grid = edged.unfold(1, 3, 1).unfold(2, 3, 1).reshape(count, rows, cols, 9).median(dim=-1).values
    row_weights = torch.tensor(_interpolation_weights(height, rows, block), device=fixed.device)
    col_weights = torch.tensor(_interpolation_weights(width, cols, block), device=fixed.device)
    return row_weights @ grid @ col_weights.T


def _reflect_pad(images: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """NumPy's `np.pad(mode="reflect")` at the bottom and right of (B, C, H, W), for pads of any size.

    torch's reflect pad must be smaller than the dimension: a frame narrower than a background block (a strip, a
    small crop) would fail. NumPy reflects again and again (at most size - 1 each time), and repeats a single row.
    """
    for dim, amount in ((2, bottom), (3, right)):
        while amount > 0:
            size = images.shape[dim]
            if size == 1:
                shape = list(images.shape)
                shape[dim] = 1 + amount
                images, amount = images.expand(shape).contiguous(), 0
                continue
            step = min(amount, size - 1)
            images = F.pad(images, (0, 0, 0, step) if dim == 2 else (0, step, 0, 0), mode="reflect")
            amount -= step
    return images


def to_significance(fixed: torch.Tensor) -> torch.Tensor:
    """Fixed counts -> float32 asinh((counts - background) / sqrt(background + 1)) / asinh(1000)."""
    values = torch.nan_to_num(fixed, nan=0.0, posinf=float(SATURATION), neginf=0.0).clamp(0.0, float(SATURATION))
    background = local_background(values).clamp(min=0.0)
    significance = (values - background) / torch.sqrt(background + 1.0)
    return (torch.asinh(significance) / SIGNIFICANCE_SCALE).to(torch.float32)
