"""Workers that misbehave on purpose: one that heartbeats but never answers, one that claims a huge credit.

Real ZeroMQ peers against a real dispatcher. A hung worker (a model stuck on the GPU, a process
stopped with SIGSTOP between heartbeats, or a hostile peer) must not keep frames for ever: after
`workers.task_timeout_s` its frames go to an honest worker and it is dropped. A peer that says
hello with a credit of 128 is given no more than the configured `workers.credit`.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from pipeline.config import WorkerSettings
from pipeline.live import wire
from pipeline.live.dispatch import Dispatcher
from pipeline.models.prediction import FramePrediction
from pipeline.testing.daemons import poll

FRAME = np.arange(20, dtype=np.int32).reshape(4, 5)


def _answer(sock: zmq.Socket, name: str) -> int:
    """Act as an honest worker for the frames that wait on `sock`; returns how many it answered."""
    answered = 0
    while sock.poll(200):
        task = wire.decode_frame(sock.recv_multipart())
        prediction = FramePrediction(np.zeros((4, 5), np.uint16), [], np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8))
        sock.send_multipart(wire.encode_result(wire.FrameResult(task.task, task.scan, task.frame, name, prediction)))
        answered += 1
    return answered


def test_a_worker_that_heartbeats_but_never_answers_loses_its_frames_to_an_honest_one() -> None:
    results: list[tuple] = []
    settings = WorkerSettings(credit=4, timeout_s=30.0, task_timeout_s=2.0)
    dispatcher = Dispatcher(settings, lambda d, r, e: results.append((d.task.frame, r, e))).start()
    context = zmq.Context.instance()
    hung = context.socket(zmq.DEALER)
    hung.connect(dispatcher.endpoint)
    beating = threading.Event()

    def heartbeat() -> None:  # alive as far as heartbeats go, but it never answers a frame
        while not beating.is_set():
            hung.send_multipart(wire.encode_control(wire.HEARTBEAT, {"held": 4}))
            beating.wait(0.3)

    try:
        hung.send_multipart(wire.encode_control(wire.HELLO, {"name": "hung", "n": 4}))
        assert poll(lambda: len(dispatcher.stats()["workers"]) == 1)
        pulse = threading.Thread(target=heartbeat, daemon=True)
        pulse.start()
        for index in range(4):
            assert dispatcher.submit("scan", index, FRAME)
        assert poll(lambda: dispatcher.stats()["in_flight"] == 4), dispatcher.stats()
        honest = context.socket(zmq.DEALER)
        honest.connect(dispatcher.endpoint)
        honest.send_multipart(wire.encode_control(wire.HELLO, {"name": "honest", "n": 4}))
        started = time.monotonic()
        answered = 0
        while len(results) < 4 and time.monotonic() - started < 20:
            answered += _answer(honest, "honest")
        assert sorted(frame for frame, _, _ in results) == [0, 1, 2, 3]
        assert all(result is not None and error is None for _, result, error in results)  # every frame made it, none failed
        assert answered == 4
        names = [worker["name"] for worker in dispatcher.stats()["workers"]]
        assert names == ["honest"], names  # the hung one was dropped
        assert dispatcher.stats()["tasks_timed_out"] == 4 and dispatcher.stats()["failed"] == 0
        honest.close(linger=0)
    finally:
        beating.set()
        hung.close(linger=0)
        dispatcher.stop()


def test_a_claimed_credit_is_capped_by_the_config() -> None:
    dispatcher = Dispatcher(WorkerSettings(credit=3), lambda d, r, e: None).start()
    greedy = zmq.Context.instance().socket(zmq.DEALER)
    greedy.connect(dispatcher.endpoint)
    try:
        greedy.send_multipart(wire.encode_control(wire.HELLO, {"name": "greedy", "n": 48}))
        assert poll(lambda: len(dispatcher.stats()["workers"]) == 1)
        greedy.send_multipart(wire.encode_control(wire.CREDIT, {"n": 3}))
        time.sleep(0.3)
        for index in range(10):
            dispatcher.submit("scan", index, FRAME)
        assert poll(lambda: dispatcher.stats()["in_flight"] == 3)
        time.sleep(0.5)
        assert dispatcher.stats()["in_flight"] == 3 and dispatcher.stats()["workers"][0]["credit"] == 0
    finally:
        greedy.close(linger=0)
        dispatcher.stop()


def test_peers_that_join_take_a_frame_and_vanish_cannot_make_it_fail() -> None:
    results: list[tuple] = []
    dispatcher = Dispatcher(WorkerSettings(credit=1, timeout_s=0.6, heartbeat_s=0.2),
                            lambda d, r, e: results.append((d.task.frame, r, e))).start()
    context = zmq.Context.instance()
    try:
        assert dispatcher.submit("scan", 7, FRAME)
        for index in range(5):  # more than MAX_ATTEMPTS vanishing peers, each under a new name
            rogue = context.socket(zmq.DEALER)
            rogue.connect(dispatcher.endpoint)
            rogue.send_multipart(wire.encode_control(wire.HELLO, {"name": f"rogue-{index}", "n": 1}))
            assert rogue.poll(5000), "the rogue was sent nothing"
            rogue.recv_multipart()
            rogue.close(linger=0)  # vanishes with the frame; dropped once silent for timeout_s
            assert poll(lambda: dispatcher.stats()["workers"] == [] and dispatcher.stats()["in_flight"] == 0, timeout=10)
        assert results == [] and dispatcher.stats()["failed"] == 0
        honest = context.socket(zmq.DEALER)
        honest.connect(dispatcher.endpoint)
        honest.send_multipart(wire.encode_control(wire.HELLO, {"name": "honest", "n": 1}))
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            _answer(honest, "honest")
        assert [(frame, error) for frame, _, error in results] == [(7, None)] and results[0][1] is not None
        honest.close(linger=0)
    finally:
        dispatcher.stop()


def test_a_slow_worker_that_keeps_delivering_keeps_its_queue() -> None:
    """Four frames held, one answered every 0.6 s, a task deadline of 1 s: the last frame waits 2.4 s at the worker,
    yet the worker answers all the time, so it is slow, not hung (the soak's CPU workers under load were dropped)."""
    results: list[tuple] = []
    dispatcher = Dispatcher(WorkerSettings(credit=4, timeout_s=30.0, task_timeout_s=1.0),
                            lambda d, r, e: results.append((d.task.frame, r, e))).start()
    slow = zmq.Context.instance().socket(zmq.DEALER)
    slow.connect(dispatcher.endpoint)
    try:
        slow.send_multipart(wire.encode_control(wire.HELLO, {"name": "slow", "n": 4}))
        assert poll(lambda: len(dispatcher.stats()["workers"]) == 1)
        for index in range(8):
            assert dispatcher.submit("scan", index, FRAME)
        answered = 0
        deadline = time.monotonic() + 30
        while answered < 8 and time.monotonic() < deadline:
            if not slow.poll(100):
                continue
            task = wire.decode_frame(slow.recv_multipart())
            time.sleep(0.6)
            prediction = FramePrediction(np.zeros((4, 5), np.uint16), [], np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8))
            slow.send_multipart(wire.encode_result(wire.FrameResult(task.task, task.scan, task.frame, "slow", prediction)))
            slow.send_multipart(wire.encode_control(wire.HEARTBEAT, {}))
            answered += 1
        assert poll(lambda: len(results) == 8, timeout=5)
        assert sorted(frame for frame, _, _ in results) == list(range(8))
        assert all(result is not None and result.worker == "slow" for _, result, _ in results)
        assert dispatcher.stats()["tasks_timed_out"] == 0 and [w["name"] for w in dispatcher.stats()["workers"]] == ["slow"]
    finally:
        slow.close(linger=0)
        dispatcher.stop()
