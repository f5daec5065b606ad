"""Configs and weights for tests that run the real daemon and workers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

MODELS_OFF = {"tlm": {"enabled": False}, "sslm": {"enabled": False}}
"""The `models` section for tests of the data path that need no predictions: workers answer with empty masks at once."""


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(path: Path, weights: dict[str, Path] | None = None, **sections: dict[str, Any]) -> Path:
    """A YAML config for a test: fast timeouts, one local worker, the given weights, free ports."""
    config: dict[str, Any] = {
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


def control_endpoint(config: Path) -> str:
    """The control endpoint a config file names (where `pipeline status` asks)."""
    endpoint: str = yaml.safe_load(Path(config).read_text())["daemon"]["control"]
    return endpoint


def write_untrained_weights(directory: Path, score_threshold: float = 0.9, peak_channels: tuple[int, ...] = (1, 2)) -> dict[str, Path]:
    """Freshly initialised models in the shipped formats: for tests of the plumbing, not of accuracy. A low
    `score_threshold` makes the untrained TLM detect plenty (tests of batching and padding want detections)."""
    import torch

    from pipeline.models import sslm, tlm
    from pipeline.models.card import ModelCard, save_weights

    torch.manual_seed(0)
    paths = {"tlm": directory / "tlm.safetensors", "sslm": directory / "sslm.safetensors"}
    card = tlm.light_card(score_threshold=score_threshold)
    save_weights(paths["tlm"], tlm.build_tlm(card).state_dict(), card)
    save_weights(paths["sslm"], sslm.SSLM().state_dict(), ModelCard(architecture="sslm", peak_channels=list(peak_channels)))
    return paths
