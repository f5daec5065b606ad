"""What every store records about the models that made it: weights file, SHA-256 and settings."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config import ModelSettings
from pipeline.models.card import default_weights_path, read_card, sha256_of


def describe_models(settings: ModelSettings) -> dict[str, Any]:
    """Computed once per daemon from the files alone, without building the models."""
    described: dict[str, Any] = {"precision": settings.precision}
    for name in ("tlm", "sslm"):
        model = getattr(settings, name)
        if not model.enabled:
            described[name] = {"enabled": False}
            continue
        path = model.weights or default_weights_path(name)
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
