"""The reference docs say everything the code takes: every option of every command (docs/commands.md, whose option
list is made from the parser) and every config key (docs/configuration.md). Both had fallen behind: whole commands'
options and models.backend / models.onnx_cache were missing."""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.cli import build_parser
from pipeline.config import Config
from pipeline.tools.command_reference import COMMANDS_MD, rewritten

REPO = Path(__file__).resolve().parents[1]
CONFIGURATION_MD = REPO / "docs" / "configuration.md"
PIPELINE_YAML = REPO / "pipeline.yaml"


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


def config_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config with its default as YAML gives it; an optional section (`workers.slurm`, off
    unless set) is a key of its own, default null, besides its keys with their defaults once it is set."""
    defaults = model().model_dump(mode="json")
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if section is None:
            keys[f"{prefix}{name}"] = defaults[name]
            continue
        if defaults[name] is None:
            keys[f"{prefix}{name}"] = None
        keys.update(config_defaults(section, f"{prefix}{name}."))
    return keys


DOCUMENTED_KEY = re.compile(r"^\| `([a-z_]+(?:\.[a-z0-9_]+)+)` \| `([^`]*)` \|", flags=re.M)


def test_the_configuration_reference_names_only_real_keys_with_their_real_defaults() -> None:
    """Its rows cannot outlive a key that is gone or a default that changed."""
    defaults = config_defaults(Config)
    rows = DOCUMENTED_KEY.findall(CONFIGURATION_MD.read_text())
    assert len(rows) >= len(config_keys(Config))
    assert [key for key, _ in rows if key not in defaults] == [], "docs/configuration.md names keys the config does not have"
    wrong = [(key, cell, defaults[key]) for key, cell in rows if key in defaults and yaml.safe_load(cell) != defaults[key]]
    assert wrong == [], f"docs/configuration.md gives defaults the config does not have: {wrong}"
    assert sorted(key for key, _ in rows) == sorted(set(defaults)), "a key has no row of its own, or two"


def yaml_keys(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in mapping.items():
        keys += yaml_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"]
    return keys


def test_every_key_the_repository_s_pipeline_yaml_sets_is_a_documented_key() -> None:
    spelled_out = yaml_keys(yaml.safe_load(PIPELINE_YAML.read_text()))
    assert "models.backend" in spelled_out and "models.onnx_cache" in spelled_out
    text = CONFIGURATION_MD.read_text()
    assert [key for key in spelled_out if key not in config_defaults(Config)] == []
    assert [key for key in spelled_out if f"`{key}`" not in text] == []


def leaf_commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """('run', its parser), ('keys generate', ...), ... walked here, apart from the generator's own walk."""
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subparsers:
        yield " ".join(words), parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, (*words, name))


def option_section(text: str, command: str) -> str:
    """The part of docs/commands.md's option reference under `### \\`pipeline COMMAND\\``, up to the next heading."""
    heading = f"### `pipeline {command}`\n"
    assert heading in text, f"docs/commands.md has no section for `pipeline {command}`"
    rest = text.split(heading, 1)[1]
    return re.split(r"^#{1,3} |^<!-- end of every option -->", rest, maxsplit=1, flags=re.M)[0]


def test_every_option_of_every_command_is_in_that_command_s_section() -> None:
    """Each option string (`--no-progress`, `-e`), every positional argument, of every command and sub-command that
    `--help` shows, in a row of that command's own section of docs/commands.md."""
    text = COMMANDS_MD.read_text()
    commands = dict(leaf_commands(build_parser()))
    assert {"run", "worker", "process", "status", "keys generate", "simulate", "demo", "train", "evaluate", "labels export",
            "labels check", "bench", "soak", "show", "view", "quicklook", "web", "zocalo-service"} <= set(commands)
    assert "--distinct-frames" in commands["simulate"]._option_string_actions  # the whole parser, not stand-ins
    missing = []
    for command, parser in commands.items():
        # the words of each row's first cell: `--environment, -e NAME` -> --environment, -e, NAME
        documented = {word for row in re.findall(r"^\| `([^`]*)` \|", option_section(text, command), flags=re.M)
                      for word in re.split(r"[ ,]+", row)}
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            names = action.option_strings or [str(action.metavar or action.dest)]
            missing += [f"pipeline {command} {name}" for name in names if name not in documented]
    assert missing == [], f"options docs/commands.md does not list under their command: {missing}"


def test_every_command_is_in_the_summary_table() -> None:
    text = COMMANDS_MD.read_text()
    table = text.split("## Every option", 1)[0]
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [name for name in top.choices if f"`pipeline {name}" not in table] == []
    assert "`pipeline --version`" in table


def config_examples(text: str) -> list[str]:
    """The pipeline configs a document shows: indented or fenced YAML blocks whose first key is a config section."""
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    blocks += [textwrap.dedent(block) for block in re.findall(r"\n\n((?: {4}[^\n]*\n)+)", text)]
    sections = tuple(f"{name}:" for name in Config.model_fields)
    return [block for block in blocks if block.lstrip().startswith(sections)]


# README: SLURM's, Zocalo's (the daemon's side) and Kubernetes'; cluster.md: SLURM's
@pytest.mark.parametrize("document, shown", [("README.md", 3), ("docs/cluster.md", 1)])
def test_the_cluster_configs_a_facility_copies_are_valid_configs(document: str, shown: int) -> None:
    examples = config_examples((REPO / document).read_text())
    assert len(examples) >= shown, examples
    for example in examples:
        Config.model_validate(yaml.safe_load(example))  # a misspelt or moved key fails here, as the daemon would at start


def test_the_readme_s_zocalo_configuration_is_one_zocalo_loads_and_activates() -> None:
    import zocalo.configuration

    text = (REPO / "README.md").read_text()
    (example,) = [textwrap.dedent(block) for block in re.findall(r"\n\n((?: {4}[^\n]*\n)+)", text) if block.lstrip().startswith("version:")]
    configuration = zocalo.configuration.from_string(example)
    configuration.activate_environment("default")  # every plugin it names is one zocalo has, with the fields it needs
    assert configuration.storage["zocalo.recipe_directory"] and configuration.active_environments == ("default",)
