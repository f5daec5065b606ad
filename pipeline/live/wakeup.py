"""A wake-up another thread can give a thread that sleeps in a ZeroMQ poll.

The dispatcher and a worker's socket thread each sleep in `zmq.Poller.poll` for up to 20 ms between
messages. Work handed to them from another thread (a frame to send, a result to return) used to
wait out that sleep: at 100 frames/s that was ~10 ms of every frame's latency at each hop. A pipe's
read end sits in the same poll, so a byte written to it ends the sleep at once. A pipe, not an
inproc socket: ZeroMQ sockets must not be shared between threads, a pipe's write end may be.
"""

from __future__ import annotations

import os
import threading


class Wakeup:
    """`set` from any thread; the polling thread watches `fd` and calls `clear` when it fires."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        # `set` and `close` under one lock: once closed, the descriptor numbers may belong to another file, into
        # which a late `set` (a session thread still submitting) must never write
        self._lock = threading.Lock()
        self._closed = False

    @property
    def fd(self) -> int:
        """What to register with the poller (zmq.POLLIN)."""
        return self._read

    def set(self) -> None:
        with self._lock:
            if self._closed:  # the polling thread has ended: nobody is left to wake
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups: the poller is awake anyway
                pass

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._read)
            os.close(self._write)
