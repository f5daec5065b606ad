"""Quick-look pictures drawn beside the sink, not on it.

Drawing a finished scan's picture takes about a second of matplotlib; on the sink thread that
second held back every other scan's results (at 40 frames/s on a GPU host, 40 frames per scan
end). The sink hands the finished store to this thread instead and goes on writing.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class QuickLookPainter:
    """One thread drawing `<scan>.quicklook.png` for each store handed to it, in order."""

    def __init__(self) -> None:
        self._stores: queue.Queue[Path | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="quicklook", daemon=True)
        self.painted = 0

    def start(self) -> QuickLookPainter:
        self._thread.start()
        return self

    def paint(self, store: Path) -> None:
        """Queue a finished store's picture; returns at once."""
        self._stores.put(store)

    def idle(self) -> bool:
        """Nothing queued and nothing being drawn."""
        return self._stores.unfinished_tasks == 0

    def stop(self, finish: bool = True, timeout: float = 60.0) -> None:
        """With `finish`, draw what is queued first (a drained daemon leaves every picture); else only the one in hand."""
        if not finish:
            while True:
                try:
                    self._stores.get_nowait()
                except queue.Empty:
                    break
                self._stores.task_done()
        self._stores.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while (store := self._stores.get()) is not None:
            try:
                from pipeline.pictures.quicklook import write_quicklook  # matplotlib: imported when the first scan ends

                log.info("%s: quick look %s", store.stem, write_quicklook(store))
                self.painted += 1
            except Exception as error:  # a picture must never cost more than itself
                log.warning("%s: no quick look (%s)", store.stem, str(error).splitlines()[0] if str(error) else type(error).__name__)
            finally:
                self._stores.task_done()
