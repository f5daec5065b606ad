"""Training frames: synthetic frames with their instance labels, the same for a step whenever it is asked for.

Data for step `s` comes from `np.random.default_rng([seed, s])`, so a resumed run sees exactly the
frames an uninterrupted run would. Generator settings are randomised per frame (background,
diffuse scatter, streaks, dead pixels) so that the models do not learn one background level.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.preprocess import INPUT_TRANSFORMS
from pipeline.simulator import synth

TRAINING_DATA = (
    "pipeline.simulator.synth.training_sample, rng default_rng([seed, step]); per frame randomised "
    "SynthSettings: background log-uniform 0.5..8, diffuse_amplitude 0..15, streak_probability 0.2..0.6, "
    "dead_pixel_fraction 0..1e-3"
)


def randomised_settings(rng: np.random.Generator) -> synth.SynthSettings:
    """Generator settings for one training frame: backgrounds from faint to busy."""
    return synth.SynthSettings(
        background=float(np.exp(rng.uniform(np.log(0.5), np.log(8.0)))),
        diffuse_amplitude=float(rng.uniform(0.0, 15.0)),
        streak_probability=float(rng.uniform(0.2, 0.6)),
        dead_pixel_fraction=float(rng.uniform(0.0, 1e-3)),
    )


def training_frames(seed: int, step: int, count: int, input_transform: str = "log") -> tuple[np.ndarray, np.ndarray]:
    """(model inputs float32 (count, H, W), instance labels uint16 (count, H, W)) for one step.

    `input_transform` "log" gives `prepare` (TLM, DiPID's SSLM), "significance" `prepare_significance`.
    """
    transform = INPUT_TRANSFORMS[input_transform]
    rng = np.random.default_rng([seed, step])
    inputs, labels = [], []
    for _ in range(count):
        counts, instance_labels = synth.training_sample(rng, randomised_settings(rng))
        inputs.append(transform(counts))
        labels.append(instance_labels)
    return np.stack(inputs), np.stack(labels)


def targets_from_labels(labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Instance labels (H, W) -> a torchvision detection target (boxes x0 y0 x1 y1, labels, masks)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    masks = labels[None] == ids[:, None, None]
    boxes = np.zeros((len(ids), 4), dtype=np.float32)
    for index, mask in enumerate(masks):
        rows, cols = np.nonzero(mask)
        boxes[index] = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.ones(len(ids), dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }
