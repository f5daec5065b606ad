"""Sizes are capped per message, not only per part: a peer cannot make the daemon buffer a gigabyte.

A separate process (so that its own buffers do not count) connects to a real dispatcher and sends
one message of 16 parts of 60 MB each, under the old 64 MB per-part cap. The dispatcher's process
must not grow by anything near that, the message must be refused, and an honest worker must
still be served afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import psutil
import zmq

from pipeline.config import WorkerSettings
from pipeline.live import wire
from pipeline.live.dispatch import Dispatcher
from pipeline.models.prediction import FramePrediction
from pipeline.testing.daemons import poll

MIB = 2**20
SENDER = """
import sys, zmq
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.connect(sys.argv[1])
sock.send_multipart([b"result"] + [b"\\x00" * (60 * 2**20)] * 15)
import time; time.sleep(4); sock.close(linger=20000)
"""


def test_a_sixteen_part_message_of_a_gigabyte_does_not_grow_the_daemon() -> None:
    dispatcher = Dispatcher(WorkerSettings(credit=2), lambda d, r, e: None).start()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    sender = subprocess.Popen([sys.executable, "-c", SENDER, dispatcher.endpoint])
    try:
        deadline = time.monotonic() + 60
        while sender.poll() is None and time.monotonic() < deadline:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)
        for _ in range(50):  # and a moment after the sender is done
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)
        assert (peak - before) / MIB < 200, f"the dispatcher's process grew by {(peak - before) / MIB:.0f} MiB"

        honest = zmq.Context.instance().socket(zmq.DEALER)
        honest.connect(dispatcher.endpoint)
        honest.send_multipart(wire.encode_control(wire.HELLO, {"name": "honest", "n": 2}))
        frame = np.zeros((4, 5), np.int32)
        assert dispatcher.submit("scan", 0, frame) and honest.poll(5000)
        task = wire.decode_frame(honest.recv_multipart())
        prediction = FramePrediction(np.zeros((4, 5), np.uint16), [], np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8))
        honest.send_multipart(wire.encode_result(wire.FrameResult(task.task, task.scan, task.frame, "honest", prediction)))
        assert poll(lambda: dispatcher.stats()["results"] == 1)
        honest.close(linger=0)
    finally:
        sender.kill()
        dispatcher.stop()
