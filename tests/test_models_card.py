"""Weights files: safetensors with the card, torch state dicts, and one-line errors."""

import hashlib

import pytest
import torch

from pipeline.models.card import ModelCard, WeightsError, default_weights_path, load_into, load_weights, save_weights
from pipeline.models.sslm import SSLM


def test_safetensors_round_trip_keeps_card_and_sha256(tmp_path) -> None:
    model = SSLM()
    card = ModelCard(architecture="sslm", peak_channels=[3, 7], training_command="pipeline train sslm",
                     evaluation={"mean_iou": 0.5})
    path = tmp_path / "sslm.safetensors"
    digest = save_weights(path, model.state_dict(), card)
    state_dict, loaded_card, sha256 = load_weights(path)
    assert loaded_card == card
    assert sha256 == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(state_dict) == set(model.state_dict())
    assert torch.equal(state_dict["conv1.weight"], model.state_dict()["conv1.weight"])


def test_torch_state_dict_has_no_card(tmp_path) -> None:
    path = tmp_path / "dipid.pt"
    torch.save(SSLM().state_dict(), path)
    state_dict, card, _ = load_weights(path)
    assert card is None and "conv2.0.weight" in state_dict


def test_card_replace_ignores_none() -> None:
    card = ModelCard(architecture="tlm", min_size=195, score_threshold=0.5)
    assert card.replace(min_size=None, score_threshold=0.7) == ModelCard(
        architecture="tlm", min_size=195, score_threshold=0.7)


@pytest.mark.parametrize("content", [b"", b"not a weights file at all"])
def test_invalid_files_give_one_line(tmp_path, content) -> None:
    for name in ("bad.safetensors", "bad.pt"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightsError) as error:
            load_weights(path)
        assert "\n" not in str(error.value) and name in str(error.value)


def test_missing_file_and_wrong_keys_give_one_line(tmp_path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "nothing.safetensors")
    model = SSLM()
    state_dict = model.state_dict()
    state_dict["conv1.weight"] = torch.zeros(5, 1, 3, 3)
    with pytest.raises(WeightsError, match="conv1.weight has shape") as error:
        load_into(tmp_path / "x.pt", model, state_dict)
    assert "\n" not in str(error.value)
    with pytest.raises(WeightsError, match="missing keys"):
        load_into(tmp_path / "x.pt", model, {"conv1.weight": torch.zeros(100, 1, 3, 3)})


def test_weights_dir_env_override(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path))
    assert default_weights_path("tlm") == tmp_path / "tlm.safetensors"
