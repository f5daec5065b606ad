"""A reader process: opens, checks and follows scan files for the daemon, so that HDF5 never runs in the daemon.

HDF5 can block for minutes on a damaged file (a flipped bit in a v3 superblock makes it retry its
checksum with sleeps) while h5py holds the interpreter lock, and a FIFO behind a link blocks a read
for ever: in a thread, that stops the whole daemon. Here it stops one process, which the daemon
kills when a step misses its deadline (pipeline.live.readers). One scan at a time; the process
serves scan after scan.

Started as `python -m pipeline.live.reader_process --fd N`, N being its end of a socketpair. What
it sends and takes is described in pipeline.live.readers (`ReaderProcess`); messages are
pipeline.live.channel's (JSON header, raw pixels).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import FollowSettings
from pipeline.errors import one_line, shortage_of
from pipeline.live import channel
from pipeline.live.confinement import leave_working_directory
from pipeline.live.follow import NotADetectorScan, ScanError, ScanFollower
from pipeline.live.lifeline import die_with_parent

log = logging.getLogger("pipeline.reader")

ALIVE_EVERY_S = 0.5  # how often a reader that has nothing else to say tells the daemon it is not blocked
BATCH_FRAMES = 16  # frames waiting to be sent that go in one message (~6 MB of Pilatus 100K int32 frames)
OUTGOING_MESSAGES = 32  # messages queued for the sender at most


class _Link:
    """The reader's end of the channel: a thread takes the daemon's requests (so `stop` is seen mid-scan), another
    sends what the main thread queues, in order, frames that wait together going as one message (BATCH_FRAMES at
    most): a reader ahead of the daemon (a finished file) then costs both ends one header and one system call per
    batch, not per frame. The process ends as soon as the daemon closes its end."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.requests: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stop = threading.Event()  # the scan in hand is to stop
        # bounded: a daemon that reads no more holds the reader back here, as a full socket did
        self._outgoing: queue.Queue[tuple[dict[str, Any], Any]] = queue.Queue(maxsize=OUTGOING_MESSAGES)
        self._last_sent = 0.0
        self._step: str | None = None
        threading.Thread(target=self._receive, name="requests", daemon=True).start()
        threading.Thread(target=self._send_queued, name="sender", daemon=True).start()

    def _receive(self) -> None:
        try:
            while True:
                request, _ = channel.receive(self.sock)
                if request.get("op") == "stop":
                    self.stop.set()
                else:
                    self.requests.put(request)
        except (channel.ChannelClosed, channel.ChannelBroken, OSError):
            os._exit(0)  # the daemon has gone or let this reader go: nothing is left to do

    def send(self, header: dict[str, Any], data: Any = None) -> None:
        """Queue a message for the daemon (sent in order by the sender thread)."""
        self._outgoing.put((header, data))
        self._last_sent = time.monotonic()

    def _send_queued(self) -> None:
        held: tuple[dict[str, Any], Any] | None = None  # taken from the queue but not joinable with the batch before it
        try:
            while True:
                first = held if held is not None else self._outgoing.get()
                held = None
                batch = [first]
                while _is_frame(first) and len(batch) < BATCH_FRAMES:
                    try:
                        following = self._outgoing.get_nowait()
                    except queue.Empty:
                        break
                    if not _joinable(first, following):
                        held = following
                        break
                    batch.append(following)
                if len(batch) == 1:
                    channel.send(self.sock, *first)
                else:
                    frames = [{key: header.get(key) for key in ("index", "axis", "problem")} for header, _ in batch]
                    channel.send(self.sock, {"type": "frames", "replay": bool(first[0].get("replay")), "frames": frames},
                                 [data for _, data in batch])
                for _sent in batch:
                    self._outgoing.task_done()
        except OSError:
            os._exit(0)  # the daemon has gone

    def progress(self, step: str | None) -> None:
        """A follower's step, passed on; between steps, an `alive` now and then so the daemon's deadline restarts."""
        if step is not None and step != self._step:
            self._step = step
            self.send({"type": "step", "step": step})
            # sent before the step begins: a step inside HDF5 may hold the interpreter lock for minutes (a damaged
            # file's metadata retries), and the sender thread could not send it then: the daemon's deadline would name
            # the step before it
            self._outgoing.join()
        elif time.monotonic() - self._last_sent >= ALIVE_EVERY_S:
            self.send({"type": "alive"})


def _is_frame(message: tuple[dict[str, Any], Any]) -> bool:
    return message[0].get("type") == "frame" and isinstance(message[1], np.ndarray)


def _joinable(first: tuple[dict[str, Any], Any], following: tuple[dict[str, Any], Any]) -> bool:
    """Frames go together when they are of one kind (replayed or new), shape and type."""
    return (_is_frame(following) and bool(following[0].get("replay")) == bool(first[0].get("replay"))
            and following[1].shape == first[1].shape and following[1].dtype == first[1].dtype)


class _ToDaemon(logging.Handler):
    """Log records go to the daemon, which logs them as its own: one log, in the daemon's format and file."""

    def __init__(self, link: _Link) -> None:
        super().__init__(level=logging.INFO)
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.link.send({"type": "log", "level": record.levelno, "logger": record.name, "message": record.getMessage()})
        except Exception:  # the daemon has gone: the process ends on its own
            pass


def _info_message(info: Any) -> dict[str, Any]:
    fields = asdict(info)
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in fields.items()}


def _follow(link: _Link, request: dict[str, Any]) -> None:
    """One scan: open it, say what it is, replay the frames the daemon already has, then hand on every new frame."""
    link.stop.clear()
    settings = FollowSettings.model_validate(request["follow"])
    roots = [Path(root) for root in request["roots"]]
    follower = ScanFollower(Path(request["scan"]), settings, link.stop, roots=roots, progress=link.progress)
    try:
        info = follower.open()
        link.send({"type": "info", "info": _info_message(info)})
        begin = link.requests.get()
        if begin.get("op") != "begin":
            return
        start = int(begin["start"])
        link.progress("reading frames already done (resuming)")
        for index in range(int(begin.get("replay", 0))):
            link.send({"type": "frame", "index": index, "replay": True}, follower.read_frame(index))
        link.send({"type": "replayed"})
        for frame in follower.frames(start=start):
            link.send({"type": "frame", "index": frame.index, "axis": frame.axis_value, "problem": frame.problem}, frame.data)
        link.send({"type": "end", "reason": follower.end_reason or "stopped"})
    except OSError as error:
        wanting = shortage_of(error)
        link.send({"type": "error", "reason": one_line(error), "wanting": wanting})
    except (ScanError, PermissionError, ValueError) as error:
        link.send({"type": "error", "reason": one_line(error), "not_a_scan": isinstance(error, NotADetectorScan)})
    except Exception as error:  # a bug costs one scan; the process serves the next
        log.exception("%s: unexpected error while reading", request.get("scan"))
        link.send({"type": "error", "reason": f"{request.get('scan')}: internal error {type(error).__name__}: {error}"})
    finally:
        follower.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.live.reader_process",
                                     description="A reader process of the daemon (started by it; not for people).")
    parser.add_argument("--fd", type=int, required=True, help="this process's end of the daemon's socketpair")
    parser.add_argument("--log-level", default="INFO", help="the lowest level of log record passed on to the daemon")
    parser.add_argument("--parent", type=int, default=None, help="the daemon's pid: this process is killed when it ends")
    args = parser.parse_args(argv)
    if args.parent is not None:
        die_with_parent(args.parent)
    leave_working_directory()  # no file HDF5 finds by a relative name in the daemon's working directory (confinement)
    sock = socket.socket(fileno=args.fd)
    link = _Link(sock)
    handler = _ToDaemon(link)
    handler.setLevel(args.log_level)
    logging.basicConfig(level=args.log_level, handlers=[handler])
    logging.getLogger("hdfmap").setLevel(logging.ERROR)
    link.send({"type": "ready", "pid": os.getpid()})
    while True:
        request = link.requests.get()
        if request.get("op") == "follow":
            _follow(link, request)
            link.send({"type": "idle"})


if __name__ == "__main__":
    sys.exit(main())
