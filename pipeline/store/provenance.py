"""What every store records about the models that made it: weights file, SHA-256 and settings.

Also the one place that says where an enabled model's weights are and whether they are there,
so that the daemon, the benchmark and the soak describe and check weights the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ModelSettings
from pipeline.models.card import default_weights_path, read_card, sha256_of

MODELS: tuple[Literal["tlm"], Literal["sslm"]] = ("tlm", "sslm")


def weights_path(settings: ModelSettings, name: Literal["tlm", "sslm"]) -> Path:
    """The configured weights of model `name`, else the shipped ones."""
    configured = getattr(settings, name).weights
    return Path(configured) if configured is not None else default_weights_path(name)


def missing_weights(settings: ModelSettings) -> str | None:
    """One line naming the first enabled model whose weights file is not there, or None when all are."""
    for name in MODELS:
        path = weights_path(settings, name)
        if getattr(settings, name).enabled and not path.is_file():
            return (f"no {name.upper()} weights at {path}: train them (`pipeline train {name}`) "
                    f"or give --config with models.{name}.weights")
    return None


def describe_models(settings: ModelSettings) -> dict[str, Any]:
    """Computed once per daemon from the files alone (torch-free: cards come from the safetensors header)."""
    described: dict[str, Any] = {"precision": settings.precision}
    for name in MODELS:
        model = getattr(settings, name)
        if not model.enabled:
            described[name] = {"enabled": False}
            continue
        path = weights_path(settings, name)
        entry: dict[str, Any] = {"enabled": True, "weights": str(path)}
        if path.is_file():
            entry["sha256"] = sha256_of(path)
            card = read_card(path) if path.suffix == ".safetensors" else None
            entry["card"] = dataclasses.asdict(card) if card is not None else None
        else:
            entry["sha256"] = None
        entry["overrides"] = model.model_dump(mode="json", exclude={"enabled", "weights"}, exclude_none=True)
        described[name] = entry
    return described
