"""Names a person reads: file and dataset names shown with their control characters escaped, and the file names that
cannot be used at all.

A scan file's name is chosen by whoever writes it. A newline in it wrote forged lines into the daemon's log (and cut a
store's reason at it), a terminal escape cleared the screen of whoever tailed the log, and bytes that are not UTF-8
cannot name a store (tensorstore takes only valid text). Such files are refused in one line, escaped.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path


def shown(text: str) -> str:
    """`text` with every character that is not printable (newlines, escapes, bytes that were not UTF-8) escaped."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)


def name_problem(path: Path | str) -> str | None:
    """Why a scan file's path cannot be used (shown, or given a store beside it), as one line naming it; or None."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{shown(text)}: a file name that is not UTF-8 cannot be used (a store could not be named after it); rename it"
    if any(unicodedata.category(character) == "Cc" for character in text):
        return f"{shown(text)}: a file name with control characters cannot be used (it would break the log's lines); rename it"
    return None
