"""Quick-look pictures drawn beside the sink, not on it, and in a process of their own.

Drawing a finished scan's picture takes about a second of matplotlib; on the sink thread that
second held back every other scan's results (at 40 frames/s on a GPU host, 40 frames per scan
end). The sink hands the finished store to this thread instead and goes on writing. The thread
has the picture drawn by a long-lived child process (`python -m pipeline.live.painter`): drawing
reads the raw frames through HDF5, which never runs in the daemon (see pipeline.live.readers), and
the interpreter lock stays with the daemon's own threads. A child that takes longer than
PICTURE_TIMEOUT_S is killed and the next picture gets a new one.

A stop waits for the pictures still to draw only as long as it is given: then the child is killed
(one blocked on a raw file would otherwise outlive the daemon) and the stores whose pictures were
not drawn are handed back, to be named in the log. The next start draws the picture of every complete store that has
none (`picture_missing`, asked by `Daemon.add_scan` and `ScanSession._already_final`); `pipeline quicklook STORE`
draws one at any time.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.store import schema
from pipeline.store.reader import QUICKLOOK_SUFFIX, beside_store

log = logging.getLogger(__name__)

PICTURE_TIMEOUT_S = 300.0  # a quick look of a 10,000-frame scan takes seconds; minutes mean a blocked raw file


def picture_missing(store: Path, status: str | None) -> bool:
    """A complete store without its quick look (a stop ran out of time for it): one that a start should draw."""
    return status == schema.STATUS_COMPLETE and not beside_store(store, QUICKLOOK_SUFFIX).exists()


class QuickLookPainter:
    """One thread drawing `<scan>.quicklook.png` for each store handed to it, in order."""

    def __init__(self) -> None:
        self._stores: queue.Queue[Path | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="quicklook", daemon=True)
        self.painted = 0
        self._artist: _Artist | None = None  # the drawing child, once started (stop kills it when out of time)
        self._drawing: Path | None = None  # the store whose picture is being drawn now
        self._abandoned = threading.Event()  # set by a stop that ran out of time: draw nothing more
        self._skipped: list[Path] = []  # a store taken from the queue just as a stop ran out of time: not drawn

    def start(self) -> QuickLookPainter:
        self._thread.start()
        return self

    def paint(self, store: Path) -> None:
        """Queue a finished store's picture; returns at once."""
        self._stores.put(store)

    def idle(self) -> bool:
        """Nothing queued and nothing being drawn."""
        return self._stores.unfinished_tasks == 0

    def stop(self, finish: bool = True, timeout: float = 60.0) -> list[Path]:
        """With `finish`, draw what is queued first; else only the one in hand. Either way for at most `timeout`
        seconds: then the drawing child is killed. Returns the stores whose pictures were not drawn."""
        left = [] if finish else self._take_queued()
        self._stores.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():  # out of time: nothing more is drawn, and the child must not outlive us
            self._abandoned.set()
            drawing = self._drawing
            left += [drawing] if drawing is not None else []
            left += self._take_queued()
            self._stores.put(None)
            for _attempt in range(2):  # twice: a child being started as we looked is closed the second time
                artist = self._artist
                if artist is not None:
                    artist.close()
                self._thread.join(2.5)
                if not self._thread.is_alive():
                    break
            left += [store for store in self._skipped if store not in left]
        return left

    def _take_queued(self) -> list[Path]:
        """Empty the queue (an end marker found in it is dropped): the stores it held."""
        taken: list[Path] = []
        while True:
            try:
                store = self._stores.get_nowait()
            except queue.Empty:
                return taken
            self._stores.task_done()
            if store is not None:
                taken.append(store)

    def _loop(self) -> None:
        while (store := self._stores.get()) is not None and not self._abandoned.is_set():
            self._drawing = store
            try:
                if self._artist is None or not self._artist.alive():
                    self._artist = _Artist()
                picture, error = self._artist.draw(store)
                if picture is not None:
                    log.info("%s: quick look %s", store.stem, picture)
                    self.painted += 1
                elif not self._abandoned.is_set():  # else the stop names it among the pictures not drawn
                    log.warning("%s: no quick look (%s)", store.stem, error)
            except Exception as error:  # a picture must never cost more than itself
                log.warning("%s: no quick look (%s)", store.stem, str(error).splitlines()[0] if str(error) else type(error).__name__)
                if self._artist is not None:
                    self._artist.close()
                self._artist = None
            finally:
                self._drawing = None
                self._stores.task_done()
        if store is not None:  # left by an abandoned stop: taken, never drawn
            self._skipped.append(store)
            self._stores.task_done()
        if self._artist is not None:
            self._artist.close()


class _Artist:
    """The child process that draws: a store path in on its standard input, one JSON line out per picture."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.live.painter"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def draw(self, store: Path) -> tuple[str | None, str | None]:
        """(the picture's path, None), or (None, why not)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(str(store.absolute())) + "\n")  # the artist works in no folder of ours
        self.process.stdin.flush()
        answer: list[str] = []
        reading = threading.Thread(target=lambda: answer.append(self.process.stdout.readline() if self.process.stdout else ""), daemon=True)
        reading.start()
        reading.join(PICTURE_TIMEOUT_S)
        if reading.is_alive() or not answer or not answer[0]:
            self.close()
            return None, f"the drawing process {'took over ' + format(PICTURE_TIMEOUT_S, 'g') + ' s' if reading.is_alive() else 'ended'}"
        reply = json.loads(answer[0])
        return reply.get("picture"), reply.get("error")

    def close(self) -> None:
        self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # SIGKILL not yet acted on: nothing more to do than leave it to the kernel
            log.warning("the quick-look process %d did not end within 10 s of SIGKILL", self.process.pid)


def _serve() -> None:
    """The child's loop: draw each store named on standard input, answer on standard output."""
    from pipeline.live.confinement import leave_working_directory
    from pipeline.pictures.quicklook import write_quicklook  # matplotlib, h5py: here, never in the daemon

    leave_working_directory()  # HDF5 finds no file by a relative name in the daemon's working directory (confinement)
    for line in sys.stdin:
        store = Path(json.loads(line))
        try:
            reply = {"picture": str(write_quicklook(store))}
        except Exception as error:
            reply = {"error": str(error).splitlines()[0] if str(error) else type(error).__name__}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
