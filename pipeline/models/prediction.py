"""What a model pair says about one frame: the contract between models, workers and the sink."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Detection:
    """One TLM instance: box in pixel coordinates (x0, y0, x1, y1), its score and its id in `tlm_labels`."""

    box: tuple[float, float, float, float]
    score: float
    instance_id: int


@dataclass
class FramePrediction:
    """Both models' output for one frame, all arrays of the frame's (y, x) shape."""

    tlm_labels: np.ndarray  # uint16, instance id per pixel, 0 = background
    detections: list[Detection]
    ssl_clusters: np.ndarray  # uint8, argmax channel per pixel
    ssl_mask: np.ndarray  # uint8, 1 where the cluster is a peak channel
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, per frame
    # the TLM returned as many detections as it may for this frame (`detection_cap`, per 195 x 487 of frame area, at
    # most 256): more peaks may have been cut; the daemon warns and marks the store. detection_cap is 0 without a TLM.
    detections_capped: bool = False
    detection_cap: int = 0


def as_frame_batch(frames: np.ndarray) -> np.ndarray:
    """What every predictor's `predict_batch` takes: (B, H, W); one (H, W) frame is a batch of one."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"expected frames of shape (B, H, W), got {frames.shape}")
    return frames


def empty_predictions(count: int, shape: tuple[int, ...]) -> list[FramePrediction]:
    """What a predictor with both models off says of `count` frames (`pipeline bench --models none`): nothing, at once."""
    return [FramePrediction(tlm_labels=np.zeros(shape, dtype=np.uint16), detections=[], ssl_clusters=np.zeros(shape, np.uint8),
                            ssl_mask=np.zeros(shape, np.uint8), timings={"preprocess": 0.0, "tlm": 0.0, "sslm": 0.0})
            for _ in range(count)]


class FramePredictor(Protocol):
    """What a worker runs on the frames it is sent: the joint predictor, or anything that answers like it."""

    def predict_batch(self, frames: np.ndarray) -> list[FramePrediction]:
        """Raw (B, H, W) counts -> one prediction per frame, in order."""
        ...
