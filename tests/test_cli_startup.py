"""The command line on a user's first day: commands that run no model start without torch, and every --help explains itself.

Each check runs `pipeline` as the user does, in a fresh interpreter, and looks at what that process imported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import OTHER_COMMANDS, build_parser
from pipeline.testing.configs import write_config

# what the commands that run no model must not import: torch, and what the other commands' modules pull in (seconds of
# start-up on a busy machine: `pipeline --version` took 1.2-2.4 s here while it imported scipy and matplotlib)
HEAVY = ("torch", "torchvision", "scipy", "matplotlib", "h5py", "zarr", "tensorstore")

# `pipeline ARGS` in a fresh interpreter; at exit (after argparse's SystemExit too) it prints which heavy modules it imported
PROBE = """
import atexit, json, sys
atexit.register(lambda: print("IMPORTED " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})), file=sys.stderr))
sys.argv = ["pipeline", *{argv!r}]
from pipeline.cli import main
sys.exit(main())
"""


def run_probe(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, argv=argv)], capture_output=True, text=True,
                            timeout=120, cwd=cwd)
    [line] = [line for line in result.stderr.splitlines() if line.startswith("IMPORTED ")]
    return result, json.loads(line.removeprefix("IMPORTED "))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["status"], ["status", "--json"], ["run", "--help"],
                                  ["process", "--help"], ["worker", "--help"], ["keys", "generate", "--help"]])
def test_commands_that_run_no_model_import_no_torch_nor_plotting(tmp_path: Path, argv: list[str]) -> None:
    config = write_config(tmp_path / "config.yaml")  # a control port nobody listens on: status answers "no daemon"
    if argv[0] == "status":
        argv = [*argv, "--config", str(config)]
    result, imported = run_probe(argv, tmp_path)
    assert result.returncode == (1 if argv[0] == "status" else 0), result.stderr
    assert imported == [], f"pipeline {' '.join(argv)} imported {imported}"
    if argv == ["--version"]:
        assert result.stdout.startswith("pipeline 0.")


def test_the_probe_sees_what_a_command_imports(tmp_path: Path) -> None:
    """The check above can fail: a command whose module imports heavy modules is seen doing so."""
    result, imported = run_probe(["show", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"matplotlib", "zarr"} <= set(imported)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every parser under `parser`, by its full command (`keys generate`)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {inner}": p for inner, p in subcommands(sub).items()})
    return found


def test_every_command_has_a_description_and_every_option_a_help_text() -> None:
    missing = []
    for name, parser in subcommands(build_parser()).items():
        if not (parser.description or "").strip():
            missing.append(f"pipeline {name}: no description")
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"pipeline {name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert missing == []


def test_the_top_level_help_lists_every_command_with_its_own_help_line() -> None:
    """The lines `pipeline --help` shows without importing the commands' modules are the modules' own lines."""
    full = build_parser()
    [full_sub] = [a for a in full._actions if isinstance(a, argparse._SubParsersAction)]
    real = {choice.dest: choice.help for choice in full_sub._choices_actions}
    listed = {name: help_line for name, _, _, help_line in OTHER_COMMANDS}
    assert {name: real[name] for name in listed} == listed
    assert list(real)[-len(listed):] == list(listed)  # the same order
    lazy_help = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    assert lazy_help.stdout == full.format_help()


@pytest.mark.parametrize("name", [name for name, _, _, _ in OTHER_COMMANDS])
def test_each_lazily_listed_command_still_parses_its_own_options(name: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", name, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: pipeline {name}")
    assert subcommands(build_parser())[name].format_help() == result.stdout


FAKE_TENSOR_EXIT = """
import logging, sys
from pipeline.logs import setup_logging
setup_logging("INFO")
import torch
import torch._subclasses.fake_tensor
logging.getLogger("torch").setLevel(logging.INFO)  # however torch's loggers come to be at INFO (TORCH_LOGS, set_logs, a library)
logging.getLogger("pipeline").info("last line of ours")
if sys.argv[1] == "unfiltered":
    logging.getLogger("torch._subclasses.fake_tensor").filters.clear()
"""


@pytest.mark.parametrize("mode", ["filtered", "unfiltered"])
def test_torch_fake_tensor_cache_stats_do_not_end_the_log(mode: str) -> None:
    result = subprocess.run([sys.executable, "-c", FAKE_TENSOR_EXIT, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    if mode == "unfiltered":  # the lines are there to leave out: this test sees them when they come
        assert any("FakeTensor cache stats" in line for line in lines), result.stderr
    else:
        assert lines[-1].endswith("pipeline: last line of ours"), result.stderr
        assert not any("cache_hits" in line or "FakeTensor" in line for line in lines)
