"""The reference docs say everything the code takes: every option of every command (docs/commands.md, whose option
list is made from the parser) and every config key (docs/configuration.md). Both had fallen behind: whole commands'
options and models.backend / models.onnx_cache were missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.config import Config
from pipeline.tools.command_reference import COMMANDS_MD, rewritten

CONFIGURATION_MD = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_option_reference_is_what_the_parser_makes() -> None:
    text = COMMANDS_MD.read_text()
    assert text == rewritten(text), "docs/commands.md is behind the command line: run `python -m pipeline.tools.command_reference`"
    for option in ("--no-progress", "--distinct-frames", "--force", "--precision", "--memory-trace", "--host"):
        assert f"`{option}" in text, option


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the config, sections included only through their keys."""
    keys = []
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        keys += config_keys(section, f"{prefix}{name}.") if section is not None else [f"{prefix}{name}"]
    return keys


def _section(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]  # `SlurmSettings | None` too
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def test_every_config_key_is_in_the_configuration_reference() -> None:
    text = CONFIGURATION_MD.read_text()
    missing = [key for key in config_keys(Config) if f"`{key}`" not in text]
    assert missing == [], f"keys docs/configuration.md does not describe: {missing}"
    assert "models.backend" in config_keys(Config) and "workers.slurm.partition" in config_keys(Config)
