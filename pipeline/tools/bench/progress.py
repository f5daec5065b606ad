"""Progress bars for the long parts (each pipeline run, the baseline), which `--no-progress` silences."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, description: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or a stand-in that does nothing."""
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit="frame", file=sys.stderr, leave=False)

    class _Silent:
        n = 0

        def update(self, count: int = 1) -> None:
            self.n += count

        def close(self) -> None:
            pass

    return _Silent()
