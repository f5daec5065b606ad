"""Training: a few steps, a checkpoint, and a resume that continues with identical losses."""

import json

import numpy as np

from pipeline.models import train
from pipeline.models.card import load_weights


def _losses(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / train.LOSS_LOG_NAME).read_text().splitlines()]


def _same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"], (x, y)


def test_training_data_is_seeded_per_step() -> None:
    a, labels = train.training_frames(3, 5, 2)
    b, _ = train.training_frames(3, 5, 2)
    assert np.array_equal(a, b) and a.dtype == np.float32 and labels.dtype == np.uint16
    target = train.targets_from_labels(labels[0])
    assert target["boxes"].shape == (len(target["labels"]), 4)


def test_tlm_resume_gives_the_same_losses(tmp_path) -> None:
    kwargs = dict(steps=4, batch_size=1, seed=1, device="cpu", checkpoint_every=2, progress=False, calibration_frames=2)
    whole = tmp_path / "whole"
    weights = train.train_tlm(whole, **kwargs)
    parted = tmp_path / "parted"
    assert train.train_tlm(parted, stop_after=2, **kwargs) is None
    assert [r["step"] for r in _losses(parted)] == [0, 1]
    train.train_tlm(parted, resume=True, **kwargs)
    _same_losses(_losses(whole), _losses(parted))
    _, card, _ = load_weights(weights)
    assert card.architecture == "tlm" and card.backbone == "resnet18_fpn" and card.steps == 4
    assert (card.min_size, card.max_size) == (195, 487)


def test_sslm_resume_gives_the_same_losses_and_picks_channels(tmp_path) -> None:
    kwargs = dict(steps=4, batch_size=2, seed=2, device="cpu", checkpoint_every=3, progress=False, crop=32,
                  channel_frames=2, select_every=2, select_frames=2)
    whole = tmp_path / "whole"
    weights = train.train_sslm(whole, **kwargs)
    parted = tmp_path / "parted"
    train.train_sslm(parted, stop_after=3, **kwargs)
    train.train_sslm(parted, resume=True, **kwargs)
    _same_losses(_losses(whole), _losses(parted))
    _, card, _ = load_weights(weights)
    assert card.architecture == "sslm" and isinstance(card.peak_channels, list)
    assert card.input_transform == "significance" and card.final_relu is True
    assert (whole / train.CHECKPOINT_NAME).exists()
    assert "snapshot of step" in card.notes
