"""Anything that reaches the worker port is untrusted: malformed, oversized or replayed messages are
rejected and counted, never written, and the dispatcher keeps serving honest workers."""

from __future__ import annotations

import numpy as np
import zmq

from pipeline.config import WorkerSettings
from pipeline.live import wire
from pipeline.live.dispatch import Dispatcher
from pipeline.models.prediction import FramePrediction
from pipeline.testing.daemons import poll
from pipeline.testing.fuzz import fuzzed_messages


def test_fuzzed_messages_are_rejected_and_honest_workers_still_served():
    results = []
    dispatcher = Dispatcher(WorkerSettings(credit=2, timeout_s=30), lambda d, r, e: results.append((d, r, e))).start()
    context = zmq.Context.instance()
    attacker = context.socket(zmq.DEALER)
    attacker.connect(dispatcher.endpoint)
    try:
        messages = fuzzed_messages(np.random.default_rng(2024), 3000)
        for parts in messages:
            attacker.send_multipart(parts)
        assert poll(lambda: dispatcher.stats()["rejected"] == len(messages), timeout=30), dispatcher.stats()
        assert dispatcher.stats()["workers"] == [] and results == []
        assert dispatcher.stats()["received"] == len(messages)  # each message read once, each rejected

        # an honest worker joins and gets a frame; a replay of its result is rejected
        worker = context.socket(zmq.DEALER)
        worker.connect(dispatcher.endpoint)
        worker.send_multipart(wire.encode_control(wire.HELLO, {"name": "honest", "n": 2, "device": "cpu"}))
        frame = np.arange(20, dtype=np.int32).reshape(4, 5)
        assert dispatcher.submit("scan", 0, frame)
        assert worker.poll(5000)
        task = wire.decode_frame(worker.recv_multipart())
        np.testing.assert_array_equal(task.data, frame)
        prediction = FramePrediction(np.zeros((4, 5), np.uint16), [], np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8))
        reply = wire.encode_result(wire.FrameResult(task.task, task.scan, task.frame, "honest", prediction))
        worker.send_multipart(reply)
        assert poll(lambda: len(results) == 1)
        rejected = dispatcher.stats()["rejected"]
        worker.send_multipart(reply)  # replayed
        attacker.send_multipart(reply)  # stolen by a stranger
        assert poll(lambda: dispatcher.stats()["rejected"] == rejected + 2)
        assert len(results) == 1 and results[0][1].frame == 0
        worker.close(linger=0)
    finally:
        attacker.close(linger=0)
        dispatcher.stop()


def test_a_worker_that_claims_a_result_for_another_frame_is_refused():
    results = []
    dispatcher = Dispatcher(WorkerSettings(credit=1), lambda d, r, e: results.append(r)).start()
    worker = zmq.Context.instance().socket(zmq.DEALER)
    worker.connect(dispatcher.endpoint)
    try:
        worker.send_multipart(wire.encode_control(wire.HELLO, {"name": "liar", "n": 1}))
        dispatcher.submit("scan", 3, np.zeros((4, 5), np.int32))
        assert worker.poll(5000)
        task = wire.decode_frame(worker.recv_multipart())
        wrong_shape = FramePrediction(np.zeros((5, 4), np.uint16), [], np.zeros((5, 4), np.uint8), np.zeros((5, 4), np.uint8))
        worker.send_multipart(wire.encode_result(wire.FrameResult(task.task, task.scan, task.frame, "liar", wrong_shape)))
        right_shape = FramePrediction(np.zeros((4, 5), np.uint16), [], np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8))
        worker.send_multipart(wire.encode_result(wire.FrameResult(task.task, task.scan, 4, "liar", right_shape)))
        assert poll(lambda: dispatcher.stats()["rejected"] == 2)
        assert results == [] and dispatcher.stats()["in_flight"] == 1
    finally:
        worker.close(linger=0)
        dispatcher.stop()
