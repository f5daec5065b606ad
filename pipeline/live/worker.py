"""A worker process: connects to the daemon, segments the frames it is sent, sends results back.

Two threads: the I/O thread alone touches the ZeroMQ socket (frames in, results and heartbeats
out), the main thread runs the models on whatever frames are waiting, up to `batch_size` at once,
fewer where `latency_target_s` says a bigger call would end too late (`pipeline.live.batching`).
The worker asks for no more frames than `credit`, so its memory is bounded by that.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from pipeline.common.devices import resolve_device
from pipeline.config import Config, WorkerSettings
from pipeline.live import wire
from pipeline.live.batching import BatchSizer
from pipeline.live.security import HANDSHAKE_EVENTS, apply_client, client_keys, handshake_failure
from pipeline.live.wakeup import Wakeup
from pipeline.models.prediction import FramePredictor

log = logging.getLogger(__name__)

class _Link(threading.Thread):
    """The socket's thread: moves frames into `inbox` and results from `outbox` onto the wire."""

    def __init__(self, endpoint: str, hello: dict, settings: WorkerSettings, inbox: queue.Queue, outbox: queue.Queue,
                 max_part: int) -> None:
        super().__init__(name="worker-link", daemon=True)
        self.endpoint, self.hello, self.settings, self.max_part = endpoint, hello, settings, max_part
        self.inbox, self.outbox = inbox, outbox  # the inbox holds (time.monotonic() of arrival, frame)
        self.stopping = threading.Event()  # the daemon said stop, or we are shutting down
        self.told_to_stop = False  # the daemon said stop: it closed its socket after saying it, so nothing more reaches it
        self.busy = 0  # frames taken from the inbox and not yet answered
        self.closed = threading.Event()
        self.wakeup = Wakeup()  # a queued result is sent at once, not after the socket's 20 ms poll

    def post(self, parts: list[wire.Part]) -> None:
        """Queue a message for the daemon; the socket's thread sends it at once."""
        self.outbox.put(parts)
        self.wakeup.set()

    def close(self) -> None:
        """No more results: the socket's thread sends what is queued, says goodbye and ends."""
        self.closed.set()
        self.wakeup.set()

    def run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_part)
        apply_client(sock, self.settings)
        monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)  # a refused handshake is said, not waited on in silence
        sock.connect(self.endpoint)
        sock.send_multipart(wire.encode_control(wire.HELLO, self.hello))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.wakeup.fd, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        said_at: dict[str, float] = {}
        last_beat = time.monotonic()
        try:
            while True:
                while True:
                    try:
                        sock.send_multipart(self.outbox.get_nowait(), copy=False)  # results' masks: no copy
                    except queue.Empty:
                        break
                if self.closed.is_set() and self.outbox.empty():
                    sock.send_multipart(wire.encode_control(wire.BYE))
                    return
                if time.monotonic() - last_beat >= self.settings.heartbeat_s:
                    sock.send_multipart(wire.encode_control(wire.HEARTBEAT, {"held": self.inbox.qsize()}))
                    last_beat = time.monotonic()
                ready = dict(poller.poll(20))
                if self.wakeup.fd in ready:
                    self.wakeup.clear()
                if monitor in ready:
                    self._say_handshake_failure(recv_monitor_message(monitor), said_at)
                if sock in ready:
                    parts = wire.received_parts(sock.recv_multipart(copy=False))  # the frame's pixels: no copy
                    if parts and parts[0] == wire.STOP:
                        self.told_to_stop = True
                        self.stopping.set()
                        continue
                    if parts and parts[0] == wire.REJOIN:  # the daemon restarted or dropped us: offer the room we have
                        free = max(0, self.settings.credit - self.inbox.qsize() - self.busy)
                        sock.send_multipart(wire.encode_control(wire.HELLO, {**self.hello, "n": free}))
                        log.info("daemon asked this worker to rejoin; offered %d frame(s)", free)
                        continue
                    try:
                        self.inbox.put((time.monotonic(), wire.decode_frame(parts)))
                    except wire.WireError as error:
                        log.warning("ignored a bad message from the daemon: %s", error)
                        if parts and parts[0] == wire.FRAME:  # its room is free again: credit must not leak away
                            sock.send_multipart(wire.encode_control(wire.CREDIT, {"n": 1}))
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            # what is still queued is kept for the linger (a worker stopped by a signal: its last results) unless the daemon
            # is gone: then the worker's end (cli._end_worker_now) would wait the whole linger for a goodbye nobody reads
            sock.close(linger=0 if self.told_to_stop else None)
            self.wakeup.close()

    def _say_handshake_failure(self, event: Mapping[str, Any], said_at: dict[str, float]) -> None:
        """Log a failed handshake; the same line again at most once a minute while libzmq keeps retrying."""
        keys = client_keys(self.settings)
        line = handshake_failure(int(event["event"]), int(event["value"]), self.endpoint, None if keys is None else keys[0])
        if line is not None and time.monotonic() - said_at.get(line, -60.0) >= 60.0:
            said_at[line] = time.monotonic()
            log.error("%s", line)


def _by_shape(batch: list[wire.FrameTask]) -> list[list[wire.FrameTask]]:
    """The batch split into runs of one frame shape and dtype, in the order their first frames came."""
    groups: dict[tuple[tuple[int, ...], str], list[wire.FrameTask]] = {}
    for task in batch:
        groups.setdefault((task.data.shape, task.data.dtype.str), []).append(task)
    return list(groups.values())


def run_worker(endpoint: str, config: Config, device: str = "auto", name: str | None = None, threads: int = 0,
               wrap_predictor: Callable[[FramePredictor], FramePredictor] | None = None) -> int:
    """Serve frames until the daemon says stop (or goes away for good); returns an exit code.

    `wrap_predictor` lets a caller put something around the joint predictor (the test kit's slow worker does)."""
    from pipeline.models.backends import build_predictor, choose_backend

    client_keys(config.workers)  # a bad key file: one line now, before the models load, not a traceback in the socket's thread
    # the device is checked before any model loads (a missing CUDA: one line at once); ONNX Runtime runs on the CPU
    device = str(resolve_device(device)) if choose_backend(config.models, device) == "torch" else "cpu"
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    predictor: FramePredictor = build_predictor(config.models, device=device, threads=threads)
    if wrap_predictor is not None:
        predictor = wrap_predictor(predictor)
    settings = config.workers
    inbox: queue.Queue[tuple[float, wire.FrameTask]] = queue.Queue()
    outbox: queue.Queue[list[wire.Part]] = queue.Queue()
    hello = {"name": name, "pid": os.getpid(), "device": device, "n": settings.credit, "protocol": wire.PROTOCOL}
    link = _Link(endpoint, hello, settings, inbox, outbox, wire.max_part_bytes(config.follow.max_frame_pixels))
    link.start()
    log.info("worker %s on %s connected to %s", name, device, endpoint)
    sizer = BatchSizer(settings.batch_size, settings.latency_target_s)
    try:
        while not (link.stopping.is_set() and inbox.empty()):
            try:
                arrived, first = inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            wanted = sizer.choose(1 + inbox.qsize(), time.monotonic() - arrived)
            batch = [first]
            while len(batch) < wanted:
                try:
                    batch.append(inbox.get_nowait()[1])
                except queue.Empty:
                    break
            link.busy = len(batch)
            for same_shape in _by_shape(batch):  # frames of several scans (several detectors) can share a batch
                frames = np.stack([task.data for task in same_shape])
                started = time.perf_counter()
                predictions = predictor.predict_batch(frames)
                call_s = time.perf_counter() - started
                sizer.record(len(same_shape), call_s)
                log.debug("ran %d frame(s) in %.3f s (%d chosen)", len(same_shape), call_s, wanted)
                for task, prediction in zip(same_shape, predictions):
                    prediction.timings.setdefault("worker_total", call_s / len(same_shape))
                    prediction.timings["batch"] = len(same_shape)  # frames in its model call (the store's timings, bench)
                    link.post(wire.encode_result(wire.FrameResult(task.task, task.scan, task.frame, name, prediction)))
            link.busy = 0
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
        link.join(timeout=5)
    return 0
