"""Shared fixtures: small model weights and configs for tests that run the real daemon and workers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def untrained_weights(tmp_path_factory) -> dict[str, Path]:
    """Freshly initialised models in the shipped formats: for tests of the plumbing, not of accuracy."""
    import torch

    from pipeline.models import sslm, tlm
    from pipeline.models.card import ModelCard, save_weights

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("weights")
    paths = {"tlm": directory / "tlm.safetensors", "sslm": directory / "sslm.safetensors"}
    save_weights(paths["tlm"], tlm.build_tlm(tlm.light_card(score_threshold=0.9)).state_dict(), tlm.light_card(score_threshold=0.9))
    save_weights(paths["sslm"], sslm.SSLM().state_dict(), ModelCard(architecture="sslm", peak_channels=[1, 2]))
    return paths


def write_config(path: Path, weights: dict[str, Path] | None = None, **sections: dict) -> Path:
    """A YAML config for a test: fast timeouts, one local worker, the given weights, free ports."""
    config: dict = {
        "follow": {"idle_timeout_s": 5.0, "settle_s": 0.3, "link_timeout_s": 20.0, "open_timeout_s": 20.0},
        "workers": {"local": 1, "device": "cpu", "batch_size": 4, "credit": 4, "threads": 1, "timeout_s": 20.0},
        "watch": {"rescan_interval_s": 1.0, "poll_interval_s": 0.5},
        "daemon": {"control": f"tcp://127.0.0.1:{free_port()}", "log_level": "INFO"},
    }
    if weights is not None:
        config["models"] = {"tlm": {"weights": str(weights["tlm"])}, "sslm": {"weights": str(weights["sslm"])}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path
