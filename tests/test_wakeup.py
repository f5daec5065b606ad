"""The wake-up that ends a ZeroMQ poll from another thread (dispatcher and worker: queued work goes at once)."""

from __future__ import annotations

import os
import threading

import pytest
import zmq

from pipeline.live.wakeup import Wakeup


def test_a_wakeup_set_by_another_thread_ends_a_long_poll():
    wakeup = Wakeup()
    poller = zmq.Poller()
    poller.register(wakeup.fd, zmq.POLLIN)
    try:
        assert dict(poller.poll(0)) == {}  # nothing set: nothing ready
        setter = threading.Timer(0.2, wakeup.set)
        setter.start()
        ready = dict(poller.poll(60_000))  # would sleep a minute without the wake-up
        setter.join()
        assert ready == {wakeup.fd: zmq.POLLIN}
        for _ in range(100_000):  # more wake-ups than the pipe holds (64 KiB): never blocks, never raises
            wakeup.set()
        assert dict(poller.poll(0)) == {wakeup.fd: zmq.POLLIN}
        wakeup.clear()
        assert dict(poller.poll(0)) == {}  # cleared: the next poll sleeps again
    finally:
        wakeup.close()
    reused_read, reused_write = os.pipe()  # the closed descriptor numbers, given to the next file opened
    try:
        wakeup.set()  # after close (a thread still handing work to an ended poller): ignored, nothing written anywhere
        wakeup.close()
        os.set_blocking(reused_read, False)
        with pytest.raises(BlockingIOError):
            os.read(reused_read, 1)
    finally:
        os.close(reused_read)
        os.close(reused_write)
