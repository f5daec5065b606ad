"""The one error the bench turns into a line for the user: every part raises it, `run_bench` prints it."""

from __future__ import annotations


class BenchError(Exception):
    """A problem the user can fix (arguments, config, weights); printed as one line, exit code 2."""
