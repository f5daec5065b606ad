"""The daemon's reader processes: every HDF5 call of a scan happens in one of them, under a deadline.

    daemon process                                   reader process (python -m pipeline.live.reader_process)
    --------------                                   --------------
    ScanSession thread -- RemoteScan --socketpair--> ScanFollower (h5py): open, check links, follow, read
       <- step / alive / info / frame(+pixels) / end / error / log --
       -- follow / begin / stop -->

Each message from the reader restarts the deadline (`readers.step_timeout_s`); a reader stuck in
HDF5 (a damaged file, a FIFO) sends nothing, misses it, is killed with SIGKILL and replaced, and
its scan fails with one line naming the file and the step. A reader serves one scan at a time and
then the next; the pool holds `readers.processes` of them, started once, so a scan's set-up in the
daemon costs no process start. The protocol:

- reader -> daemon: `ready` once started; per scan: `step` (a new step's name), `alive` (nothing
  else to say for a while), `log` (a record for the daemon's log), `info` (what the file holds),
  `frame` (+ pixels; `replay` for frames resent to rebuild a resumed scan), `replayed`, then `end`
  (the follower's end reason) or `error` (one line; `wanting` for a shortage), then `idle`.
- daemon -> reader: `follow` (the scan, its roots and follow settings), `begin` (first frame to
  follow, frames to replay) after `info`, `stop` at any time.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from pipeline.common.nexus import ScanInfo
from pipeline.config import FollowSettings, ReaderSettings
from pipeline.live import channel, lifeline
from pipeline.live.follow import Frame, NotADetectorScan, ScanError

log = logging.getLogger(__name__)

_RECV_SLICE_S = 0.2  # how often a wait for the reader looks at the scan's stop flag


class ReaderLost(ScanError):
    """The reader missed its deadline or ended; the message is one line naming the scan and the step."""


class _StoppedReading(Exception):
    """The scan was stopped and its reader is gone (killed by the daemon's stop, or blocked past it)."""


class Shortage(OSError):
    """The reader could not go on for want of something (space, descriptors); the scan stalls and resumes later."""

    def __init__(self, message: str, wanting: str) -> None:
        super().__init__(message)
        self.wanting = wanting


class ReaderProcess:
    """One reader process and the daemon's end of its socketpair."""

    def __init__(self, settings: ReaderSettings, log_level: str = "INFO") -> None:
        ours, theirs = socket.socketpair()
        self.settings = settings
        self.sock = ours
        self.process = lifeline.spawn(
            [sys.executable, "-m", "pipeline.live.reader_process", "--fd", str(theirs.fileno()), "--log-level", log_level,
             "--parent", str(os.getpid())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.step = "starting"
        self.dead = False
        self._ready = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, header: dict[str, Any]) -> None:
        channel.send(self.sock, header)

    def receive(self, timeout_s: float, stop: threading.Event | None = None, stopped: list[bool] | None = None
                ) -> tuple[dict[str, Any], np.ndarray | None]:
        """The reader's next message other than a log record (those are logged here). ReaderLost once `timeout_s`
        passes with nothing from it, or when it ends. With `stop`, a set stop is passed on to the reader once."""
        deadline = time.monotonic() + timeout_s
        while True:
            if stop is not None and stopped is not None and stop.is_set() and not stopped[0]:
                stopped[0] = True
                try:
                    self.send({"op": "stop"})
                except OSError:
                    pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(min(left, _RECV_SLICE_S) if stop is not None else left)
            try:
                header, data = channel.receive(self.sock)
            except TimeoutError:
                continue
            if header.get("type") == "log":
                log.log(int(header.get("level", logging.INFO)), "%s", header.get("message", ""))
                deadline = time.monotonic() + timeout_s
                continue
            if header.get("type") == "step":
                self.step = str(header.get("step"))
            return header, data

    def wait_ready(self) -> None:
        if self._ready:
            return
        header, _ = self.receive(self.settings.start_timeout_s)
        if header.get("type") != "ready":
            raise channel.ChannelBroken(f"reader said {header.get('type')!r} before 'ready'")
        self._ready = True

    def kill(self) -> None:
        """SIGKILL: a reader blocked inside HDF5 answers nothing else."""
        self.dead = True
        try:
            self.process.send_signal(signal.SIGKILL)
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("reader %d did not end after SIGKILL", self.pid)
        self.sock.close()

    def close(self) -> None:
        """Let an idle reader go: closing our end ends it; killed if it is still there shortly after."""
        self.dead = True
        self.sock.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


class ReaderPool:
    """At most `size` reader processes, started when first needed and kept for the next scan; a reader that missed a
    deadline is killed and a new one takes its place when next needed."""

    def __init__(self, settings: ReaderSettings, size: int, log_level: str = "INFO") -> None:
        self.settings = settings
        self.size = size
        self.log_level = log_level
        self._idle: queue.LifoQueue[ReaderProcess] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._count = 0  # started and not yet ended
        self._all: set[ReaderProcess] = set()
        self.killed = 0
        self.closed = False

    def start(self, count: int = 1) -> ReaderPool:
        """Start `count` readers now (the first scan then waits for none)."""
        for _ in range(min(count, self.size)):
            reader = self._spawn()
            if reader is not None:
                self._idle.put(reader)
        return self

    def _spawn(self) -> ReaderProcess | None:
        with self._lock:
            if self.closed or self._count >= self.size:
                return None
            self._count += 1
            reader = ReaderProcess(self.settings, self.log_level)
            self._all.add(reader)
            return reader

    def acquire(self, stop: threading.Event) -> ReaderProcess | None:
        """A ready reader, or None once `stop` is set or the pool is closed first."""
        while not stop.is_set() and not self.closed:
            reader: ReaderProcess | None
            try:
                reader = self._idle.get_nowait()
            except queue.Empty:
                reader = self._spawn()
            if reader is None:
                try:
                    reader = self._idle.get(timeout=_RECV_SLICE_S)
                except queue.Empty:
                    continue
            try:
                reader.wait_ready()
                return reader
            except (TimeoutError, channel.ChannelClosed, channel.ChannelBroken, OSError) as error:
                log.error("reader process %d did not start (%s); starting another", reader.pid, type(error).__name__)
                self.discard(reader)
                time.sleep(_RECV_SLICE_S)
        return None

    def release(self, reader: ReaderProcess) -> None:
        """A reader whose scan ended cleanly serves the next one."""
        if self.closed or reader.dead:
            self.discard(reader)
        else:
            self._idle.put(reader)

    def discard(self, reader: ReaderProcess) -> None:
        """Kill a reader that cannot be trusted any more (missed a deadline, broke the protocol)."""
        if not reader.dead:
            reader.kill()
            self.killed += 1
        with self._lock:
            if reader in self._all:
                self._all.discard(reader)
                self._count -= 1

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"processes": self._count, "idle": self._idle.qsize(), "size": self.size, "killed": self.killed,
                    "pids": sorted(r.pid for r in self._all)}

    def close(self) -> None:
        """End every reader: idle ones by closing their channel, busy ones (their scans are stopping) by SIGKILL."""
        with self._lock:
            self.closed = True
            readers = list(self._all)
            self._all.clear()
            self._count = 0
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        for reader in readers:
            if not reader.dead:
                reader.kill()


def _info_from(message: dict[str, Any]) -> ScanInfo:
    fields = dict(message)
    for key in ("nexus_path", "source_file"):
        fields[key] = Path(fields[key])
    fields["frame_shape"] = tuple(fields["frame_shape"])
    return ScanInfo(**fields)


class RemoteScan:
    """A scan followed by a reader process, as the daemon's session sees it: `open`, then `replayed` and `frames`.

    Every wait on the reader has the step deadline; a missed one kills the reader and raises ReaderLost."""

    def __init__(self, pool: ReaderPool, nexus_path: Path, settings: FollowSettings, roots: Sequence[Path],
                 stop: threading.Event) -> None:
        self.pool = pool
        self.nexus_path = Path(nexus_path)
        self.settings = settings
        self.roots = list(roots)
        self.stop = stop
        self.end_reason: str | None = None
        self._reader: ReaderProcess | None = None
        self._stop_sent = [False]
        self._unpacked: collections.deque[tuple[dict[str, Any], np.ndarray | None]] = collections.deque()
        self.last_frame: int | None = None

    # -- waiting on the reader ----------------------------------------------------------------

    def _next(self) -> tuple[dict[str, Any], np.ndarray | None]:
        """The reader's next message; frames that came together (`frames`) are handed out one `frame` at a time."""
        if self._unpacked:
            return self._unpacked.popleft()
        header, data = self._receive()
        if header.get("type") != "frames":
            return header, data
        entries = header.get("frames")
        if data is None or not isinstance(entries, list) or data.ndim < 3 or len(entries) != data.shape[0] or not entries:
            self._lose("its reader sent frames that do not match their header")
        replay = header.get("replay") is True
        for entry, frame in zip(entries, data):
            if not isinstance(entry, dict):
                self._lose("its reader sent frames that do not match their header")
            self._unpacked.append(({"type": "frame", "index": entry.get("index"), "axis": entry.get("axis"),
                                    "problem": entry.get("problem"), "replay": replay}, frame))
        return self._unpacked.popleft()

    def _receive(self) -> tuple[dict[str, Any], np.ndarray | None]:
        reader = self._reader
        assert reader is not None, "open() first"
        timeout = self.pool.settings.step_timeout_s
        try:
            header, data = reader.receive(timeout, self.stop, self._stop_sent)
        except channel.ChannelBroken as error:
            self._lose(f"its reader sent a broken message ({error})")
        except (channel.ChannelClosed, OSError) as error:  # TimeoutError is an OSError
            if self.stop.is_set():  # killed by the daemon's stop, or blocked past it: the scan stops, it did not fail
                self._reader = None
                self.pool.discard(reader)
                raise _StoppedReading from None
            if isinstance(error, TimeoutError):
                self._lose(f"its reader did not answer within {timeout:g} s while {self._doing(reader)} "
                           f"(a damaged HDF5 file can block a reader); the reader was stopped (readers.step_timeout_s)")
            self._lose(f"its reader process ended while {self._doing(reader)}")
        if header.get("type") == "error":
            self._finish_reader(clean=True)
            reason = str(header.get("reason", "unreadable"))
            if header.get("wanting"):
                raise Shortage(reason, str(header["wanting"]))
            raise NotADetectorScan(reason) if header.get("not_a_scan") is True else ScanError(reason)
        return header, data

    def _doing(self, reader: ReaderProcess) -> str:
        if reader.step == "following the file" and self.last_frame is not None:
            return f"following the file (after frame {self.last_frame})"
        return reader.step

    def _lose(self, why: str) -> NoReturn:
        reader = self._reader
        self._reader = None
        if reader is not None:
            self.pool.discard(reader)
        raise ReaderLost(f"{self.nexus_path}: {why}")

    def _finish_reader(self, clean: bool) -> None:
        """Give the reader back once it said its scan ended (it sends `idle` next); otherwise kill it."""
        reader = self._reader
        self._reader = None
        if reader is None:
            return
        if not clean:
            self.pool.discard(reader)
            return
        try:
            header, _ = reader.receive(self.pool.settings.step_timeout_s)
        except (TimeoutError, channel.ChannelClosed, channel.ChannelBroken, OSError):
            self.pool.discard(reader)
            return
        if header.get("type") == "idle":
            self.pool.release(reader)
        else:
            self.pool.discard(reader)

    # -- what the session calls -----------------------------------------------------------------

    def open(self) -> ScanInfo:
        """Hand the scan to a reader and wait for what the file holds (the reader waits for a file still being made)."""
        reader = self.pool.acquire(self.stop)
        if reader is None:
            raise ScanError(f"{self.nexus_path}: stopped while waiting for a reader")
        self._reader = reader
        reader.step = "starting on the scan"
        reader.send({"op": "follow", "scan": str(self.nexus_path), "roots": [str(r) for r in self.roots],
                     "follow": self.settings.model_dump(mode="json")})
        while True:
            try:
                header, _ = self._next()
            except _StoppedReading:
                raise ScanError(f"{self.nexus_path}: stopped while opening") from None
            if header.get("type") == "info":
                return _info_from(header["info"])

    def begin(self, start: int, replay: int = 0) -> None:
        """Follow from frame `start`, first sending frames 0 to `replay` - 1 again (to rebuild a resumed scan)."""
        assert self._reader is not None, "open() first"
        self._reader.send({"op": "begin", "start": int(start), "replay": int(replay)})

    def leave(self) -> None:
        """Nothing to follow after all (the scan's store is already final): the reader goes back to the pool."""
        assert self._reader is not None, "open() first"
        self._reader.send({"op": "leave"})
        self._finish_reader(clean=True)

    def replayed(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) of each frame asked to be replayed by `begin`."""
        while True:
            try:
                header, data = self._next()
            except _StoppedReading:
                raise ScanError(f"{self.nexus_path}: stopped while resuming") from None
            if header.get("type") == "replayed":
                return
            if header.get("type") == "frame" and data is not None:
                yield int(header["index"]), data

    def frames(self) -> Iterator[Frame]:
        """Every complete frame from `begin`'s start on, as the reader's follower hands them on."""
        while True:
            try:
                header, data = self._next()
            except _StoppedReading:
                self.end_reason = "stopped"
                return
            kind = header.get("type")
            if kind == "frame" and data is not None:
                self.last_frame = int(header["index"])
                axis = header.get("axis")
                yield Frame(index=int(header["index"]), data=data, axis_value=None if axis is None else float(axis),
                            problem=header.get("problem"))
            elif kind == "end":
                self.end_reason = str(header.get("reason") or "stopped")
                self._finish_reader(clean=True)
                return

    def close(self) -> None:
        """A scan left before its end (the session failed or is stopping): its reader may be mid-scan, so it goes."""
        if self._reader is not None:
            self._finish_reader(clean=False)
