"""The "Every option" part of docs/commands.md, written from the command line's own parser.

A hand-kept list of options fell behind `--help` (whole commands' options were missing), so the list
is made from the argparse parser itself: each command and sub-command with its usage and every
option's help line. `python -m pipeline.tools.command_reference` rewrites that part of the file in
place; tests/test_docs_complete.py fails when the file is not what this makes from the code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

BEGIN = "<!-- every option: made by `python -m pipeline.tools.command_reference`; do not edit by hand -->"
END = "<!-- end of every option -->"
COMMANDS_MD = Path(__file__).resolve().parents[2] / "docs" / "commands.md"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(`pipeline keys generate`, its parser) for every command and sub-command, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _subcommands(sub)
                else:
                    yield sub.prog, sub


def _option_row(action: argparse.Action, formatter: argparse.HelpFormatter) -> str | None:
    if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
        return None
    names = ", ".join(action.option_strings) or str(action.metavar or action.dest)
    if action.option_strings and action.nargs != 0:
        names += " " + str(action.metavar or (("{" + ",".join(map(str, action.choices)) + "}") if action.choices else action.dest.upper()))
    text = " ".join(formatter._expand_help(action).split()) if action.help else ""  # %(default)s as --help shows it
    return f"| `{names}` | {text.replace('|', chr(92) + '|')} |"


def reference() -> str:
    """The generated part, markers included."""
    from pipeline.cli import build_parser

    lines = [BEGIN, ""]
    for prog, parser in _subcommands(build_parser()):
        lines += [f"### `{prog}`", "", f"`{' '.join(parser.format_usage().split()).removeprefix('usage: ')}`", ""]
        rows = [row for action in parser._actions if (row := _option_row(action, parser._get_formatter())) is not None]
        lines += ["| argument | meaning |", "|---|---|", *rows, ""] if rows else ["(no options)", ""]
    return "\n".join([*lines, END])


def rewritten(text: str) -> str:
    """docs/commands.md's `text` with its generated part made anew (appended when it has none)."""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + reference() + tail
    return text.rstrip("\n") + "\n\n## Every option\n\n" + reference() + "\n"


def main() -> int:
    COMMANDS_MD.write_text(rewritten(COMMANDS_MD.read_text()))
    print(f"rewrote the option reference in {COMMANDS_MD}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
