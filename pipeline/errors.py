"""One base for every problem a user can act on, and one way of saying an error in one line.

Whatever raises a `PipelineError` (a bad config, scan, weights file or store) has already put
the file, field or value in its message; `pipeline`'s command line prints that message as one
line and exits with the error's `exit_code`, never with a traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PipelineError(Exception):
    """A problem the user can fix or must know about; the message is one line naming what is wrong."""

    exit_code = 1


class UserError(PipelineError):
    """A bad argument on the command line."""

    exit_code = 2


SPACE = "space"
DESCRIPTORS = "file descriptors"
_SHORTAGE_ERRNOS = {errno.ENOSPC: SPACE, errno.EDQUOT: SPACE, errno.EMFILE: DESCRIPTORS, errno.ENFILE: DESCRIPTORS}


def shortage_of(error: BaseException) -> str | None:
    """SPACE or DESCRIPTORS when `error` is a failure for want of one (h5py and zarr keep the OSError's errno), else None:
    such an error says nothing about the file or store at hand (see pipeline.live.shortage)."""
    return _SHORTAGE_ERRNOS.get(error.errno) if isinstance(error, OSError) and error.errno is not None else None


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception as one line: its first line (cut to `limit` characters if given), or its type's name when it says nothing."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first if limit is None or len(first) <= limit else first[: limit - 3] + "..."


def report(command: str, error: BaseException) -> None:
    """`pipeline COMMAND: <one line>` on stderr: how every command reports a problem."""
    print(f"pipeline {command}: {one_line(error)}", file=sys.stderr)


def reporting(command: str, body: Callable[[T], int]) -> Callable[[T], int]:
    """`body`, with a PipelineError reported as one line and its exit code returned instead of a traceback."""

    def run(args: T) -> int:
        try:
            return body(args)
        except PipelineError as error:
            report(command, error)
            return error.exit_code

    return run
