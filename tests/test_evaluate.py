"""Evaluation metrics and the `evaluate` command on a tiny held-out set."""

import json

import numpy as np
import pytest
import torch

from pipeline.models import commands
from pipeline.models.card import ModelCard, save_weights
from pipeline.models.real_frames import REAL_MODULES, load_frames
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
    modules, sources = load_frames(REAL_MODULES)
    np.savez_compressed(tmp_path / "real.npz", frames=modules[[0, 7]], sources=np.array([sources[0], sources[7]]))
    code = commands.main([
        "evaluate", "--frames", "3", "--scans", "1", "--scan-frames", "3", "--tlm", str(tmp_path / "tlm.safetensors"),
        "--sslm", str(tmp_path / "sslm.safetensors"), "--json", str(tmp_path / "eval.json"),
        "--real-frames", str(tmp_path / "real.npz"),
    ])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("TLM", "SSLM", "joint (TLM | SSLM)", "baseline: log counts > ", "baseline: significance > ",
                "real frames: 2 frames of real.npz without outlines: counted against 81 reference spots"):
        assert row in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["methods"]["tlm"]["frames"] == 3
    assert 0.0 <= report["methods"]["baseline"]["mean_iou"] <= 1.0
    real = report["real_frames"]
    assert [row["reference_spots"] for row in real["per_frame"]] == [81, 0]
    assert real["tlm"]["detections"] == sum(row["tlm_detections"] for row in real["per_frame"])


def test_evaluate_counts_real_frames_at_the_cap() -> None:
    """The shipped TLM told to keep 8 detections: the crowded module reaches the cap, the blank one does not; with
    its defaults neither does, and what it finds lies on the classical finder's spots."""
    from pipeline.config import ModelSettings
    from pipeline.models.evaluate import real_frame_case
    from pipeline.models.joint import JointPredictor

    def case(**tlm: object) -> dict:
        predictor = JointPredictor.from_settings(ModelSettings.model_validate({"precision": "float32", "tlm": tlm}))
        return real_frame_case(predictor)

    capped = case(detections=8)
    assert capped["frames"] == 8 and capped["reference_spots"] == 390 and capped["tlm"]["caps"] == [8]
    at_cap = [row["tlm_capped"] for row in capped["per_frame"]]
    assert at_cap[:4] == [True] * 4 and at_cap[7] is False and capped["tlm"]["frames_at_cap"] == sum(at_cap)
    assert all(row["tlm_detections"] == 8 for row in capped["per_frame"] if row["tlm_capped"])
    shipped = case()
    assert shipped["tlm"]["frames_at_cap"] == 0 and shipped["tlm"]["caps"] == [100]
    assert shipped["tlm"]["max_detections"] > 16 and shipped["tlm"]["spots_covered"] > capped["tlm"]["spots_covered"]
    assert shipped["tlm"]["instances_on_spots"] > 0.9 and shipped["sslm"]["spots_covered"] > 0.8


def test_evaluate_real_frames_none_and_bad_file(tmp_path, capsys) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    assert commands.main(["evaluate", "--frames", "1", "--real-frames", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipeline evaluate:") and "bad.npz" in err and "\n" not in err
    assert commands.main(["evaluate", "--frames", "1", "--scans", "0", "--real-frames", "none", "--json", str(tmp_path / "e.json")]) == 0
    assert "real frames" not in capsys.readouterr().out and "real_frames" not in json.loads((tmp_path / "e.json").read_text())


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
