"""Evaluation metrics and the `evaluate` command on a tiny held-out set."""

import json

import numpy as np
import pytest
import torch

from pipeline.models import commands
from pipeline.models.card import ModelCard, save_weights
from pipeline.models.scoring import components, mask_iou, match_instances
from pipeline.models.sslm import SSLM
from pipeline.models.tlm import build_tlm, light_card


def test_mask_iou_counts_empty_frames_as_one() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    assert mask_iou(empty, empty) == 1.0
    a = empty.copy()
    a[:2] = True
    b = empty.copy()
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, empty) == 0.0


def test_greedy_matching_is_one_to_one() -> None:
    truth = np.zeros((10, 10), dtype=np.uint16)
    truth[0:4, 0:4] = 1
    truth[6:9, 6:9] = 2
    predicted = np.zeros_like(truth)
    predicted[0:4, 0:3] = 5  # IoU 0.75 with peak 1
    predicted[0:1, 3:4] = 6  # a sliver of peak 1: no match
    assert match_instances(predicted, truth) == (1, 2, 2)


def test_components_drop_specks() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:3, 0:3] = True
    mask[8, 8] = True
    labels = components(mask)
    assert labels.max() == 1 and labels[8, 8] == 0


def test_evaluate_command_prints_the_table(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    card = light_card()
    save_weights(tmp_path / "tlm.safetensors", build_tlm(card).state_dict(), card)
    save_weights(tmp_path / "sslm.safetensors", SSLM().state_dict(), ModelCard(architecture="sslm", peak_channels=[0]))
    code = commands.main([
        "evaluate", "--frames", "3", "--scans", "1", "--scan-frames", "3", "--tlm", str(tmp_path / "tlm.safetensors"),
        "--sslm", str(tmp_path / "sslm.safetensors"), "--json", str(tmp_path / "eval.json"),
    ])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("TLM", "SSLM", "joint (TLM | SSLM)", "baseline: log counts > ", "baseline: significance > "):
        assert row in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["methods"]["tlm"]["frames"] == 3
    assert 0.0 <= report["methods"]["baseline"]["mean_iou"] <= 1.0


def test_evaluate_command_bad_weights_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    assert commands.main(["evaluate", "--frames", "1", "--tlm", str(tmp_path / "broken.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipeline evaluate:") and "broken.safetensors" in err and "\n" not in err


def test_help_for_both_commands(capsys) -> None:
    for name in ("train", "evaluate"):
        with pytest.raises(SystemExit) as exit_:
            commands.main([name, "--help"])
        assert exit_.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_baseline_thresholds_are_tuned_per_input_on_training_frames() -> None:
    from pipeline.models.evaluate import tune_baseline_threshold
    from pipeline.models.preprocess import SIGNIFICANCE_SCALE

    log_threshold = tune_baseline_threshold(frames=6)
    significance_threshold = tune_baseline_threshold(frames=6, input_transform="significance")
    assert 0.1 <= log_threshold < 0.6
    # the best cut on the significance input sits a few noise sigmas above the background
    assert 2.0 < np.sinh(significance_threshold * SIGNIFICANCE_SCALE) < 20.0
