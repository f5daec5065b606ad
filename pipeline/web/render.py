"""The web view's pictures: one frame with its masks over it, and the maximum projection with the 3D peaks.

Drawn with numpy and Pillow straight into pixels, not with matplotlib: a page steps through frames
with a slider and follows a running scan every second, so a picture must take milliseconds, not
the ~0.3 s of a matplotlib figure (`pipeline show` and the quick look stay the print-quality
versions). The colours are those of the other pictures: TLM instance outlines orange, the SSLM
mask's outline cyan, TLM boxes yellow, each 3D peak in its quick-look colour. Pixels are doubled
(`ZOOM`) so that outlines one pixel wide sit beside the pixels they enclose, not on them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.pictures.quicklook import Footprint
from pipeline.store.reader import FrameDetections

ZOOM = 2
TLM_COLOUR = (255, 165, 0)
SSL_COLOUR = (0, 255, 255)
BOX_COLOUR = (255, 255, 0)
SCALES = ("log", "linear")


@lru_cache(maxsize=2)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def grey(raw: np.ndarray, scale: str = "log") -> np.ndarray:
    """Counts (clipped at 0) as uint8 grey levels: log scale from 1 count to the maximum, or linear from 0."""
    if scale not in SCALES:
        raise ValueError(f"scale must be 'log' or 'linear', not {scale!r}")
    counts = np.clip(np.asarray(raw, dtype=np.float64), 0, None)
    if scale == "log":
        top = np.log(max(2.0, float(counts.max())))
        level = np.log(np.clip(counts, 1.0, None)) / top
    else:
        level = counts / max(1.0, float(counts.max()))
    return np.round(np.clip(level, 0, 1) * 255).astype(np.uint8)


def _zoom(image: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(image, ZOOM, axis=0), ZOOM, axis=1)


def boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label image (0 background) that touch a pixel of another label or the image's edge: its outlines."""
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] != centre
    return edge & (labels > 0)


def _to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)  # fast enough to follow a running scan, small enough to send
    return buffer.getvalue()


def frame_png(raw: np.ndarray, tlm_labels: np.ndarray | None, ssl_mask: np.ndarray | None, detections: FrameDetections | None,
              scale: str = "log") -> bytes:
    """One frame (grey, `scale`) with the TLM instances' outlines, the SSLM mask's outline and the TLM boxes with scores."""
    rgb = np.repeat(_zoom(grey(raw, scale))[:, :, None], 3, axis=2)
    if ssl_mask is not None and ssl_mask.any():
        rgb[boundary(_zoom((ssl_mask > 0).astype(np.uint8)))] = SSL_COLOUR
    if tlm_labels is not None and tlm_labels.any():
        rgb[boundary(_zoom(tlm_labels))] = TLM_COLOUR
    image = Image.fromarray(rgb, mode="RGB")
    if detections is not None and len(detections.scores):
        draw = ImageDraw.Draw(image)
        font = _font(11)
        for (x0, y0, x1, y1), score, instance in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.instance_ids.tolist()):
            draw.rectangle((x0 * ZOOM, y0 * ZOOM, max(x0 * ZOOM, x1 * ZOOM - 1), max(y0 * ZOOM, y1 * ZOOM - 1)), outline=BOX_COLOUR)
            draw.text((x0 * ZOOM, y0 * ZOOM - 2), f"{int(instance)}: {score:.2f}", fill=BOX_COLOUR, font=font, anchor="lb",
                      stroke_width=2, stroke_fill=(0, 0, 0))
    return _to_png(image)


def projection_png(projection: np.ndarray, outlines: Sequence[tuple[int, Footprint, tuple[float, float, float, float]]]) -> bytes:
    """The maximum projection (log scale) with each given peak's projected footprint outlined and its id beside it."""
    rgb = np.repeat(_zoom(grey(projection, "log"))[:, :, None], 3, axis=2)
    height, width = projection.shape
    labels: list[tuple[int, int, int, str]] = []
    for peak_id, footprint, colour in outlines:
        rgb_colour = tuple(round(channel * 255) for channel in colour[:3])
        y0, x0 = footprint.y0 * ZOOM, footprint.x0 * ZOOM
        edge = boundary(_zoom(footprint.mask.astype(np.uint8)))
        window = rgb[y0:y0 + edge.shape[0], x0:x0 + edge.shape[1]]
        window[edge[:window.shape[0], :window.shape[1]]] = rgb_colour
        labels.append((min(width * ZOOM - 4, x0 + edge.shape[1] + 4), y0 + edge.shape[0] // 2, peak_id,
                       "#{:02x}{:02x}{:02x}".format(*rgb_colour)))
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    font = _font(18)
    for x, y, peak_id, text_colour in labels:
        anchor = "lm" if x < width * ZOOM - 30 else "rm"
        draw.text((x, min(max(y, 8), height * ZOOM - 8)), str(peak_id), fill=text_colour, font=font, anchor=anchor, stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return _to_png(image)
