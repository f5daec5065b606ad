"""Masks drawn over a frame, as a PNG (DiPID's "show masks over the image", linear or log scale).

Uses matplotlib's object API with the Agg canvas, not pyplot: no display needed and no global
figure state, so workers and threads can render at the same time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline.models.prediction import FramePrediction
from pipeline.models.preprocess import fix_dead_pixels


def render_overlay(
    frame: np.ndarray, prediction: FramePrediction, path: Path, scale: Literal["linear", "log"] = "log"
) -> Path:
    """Write the overlay PNG to `path` and return it."""
    if scale not in ("linear", "log"):
        raise ValueError(f"scale must be 'linear' or 'log', not {scale!r}")
    image = fix_dead_pixels(frame)
    height, width = image.shape
    figure = Figure(figsize=(width / 50, height / 50 + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, height / (height + 20)))
    axes.set_axis_off()
    norm: Normalize
    if scale == "log":
        norm = LogNorm(vmin=1, vmax=max(2.0, float(image.max())), clip=True)
        shown = np.clip(image, 1, None)
    else:
        norm = Normalize(vmin=0, vmax=max(1.0, float(image.max())))
        shown = image
    axes.imshow(shown, cmap="gray", norm=norm, interpolation="nearest")
    labels = prediction.tlm_labels
    if labels.any():
        layer = np.ma.masked_equal(labels.astype(np.float64), 0)
        axes.imshow(layer, cmap="tab10", vmin=1, vmax=10, alpha=0.45, interpolation="nearest")
    if prediction.ssl_mask.any():
        axes.contour(prediction.ssl_mask, levels=[0.5], colors="cyan", linewidths=0.8)
    for detection in prediction.detections:
        x0, y0, x1, y1 = detection.box
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=0.8))
        axes.text(x0, y0, f"{detection.instance_id}: {detection.score:.2f}", color="yellow", fontsize=7, va="bottom")
    figure.text(
        0.01, 0.99, f"{scale} scale | TLM instances filled, boxes yellow | SSLM mask cyan outline",
        fontsize=7, va="top",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
