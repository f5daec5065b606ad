"""A worker process: connects to the daemon, segments the frames it is sent, sends results back.

Two threads: the I/O thread alone touches the ZeroMQ socket (frames in, results and heartbeats
out), the main thread runs the models on whatever frames are waiting, up to `batch_size` at once,
fewer where `latency_target_s` says a bigger call would end too late (`pipeline.live.batching`).
The worker asks for no more frames than `credit`, so its memory is bounded by that.

A worker waits for a daemon that is away (restarted, its host rebooting) and rejoins it, unless told to leave after
a time (`leave_after_s`, what a SLURM job's worker is given): a batch job whose daemon was killed or whose daemon's
host is down must not hold its node, and its GPU, until its time limit. Whether the daemon is there is what libzmq
says of the connection (a handshake done, a disconnect), with ZMTP heartbeats so that a peer gone silent without a
word, a host that lost power, is noticed as well.
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

ABANDONED_EXIT = 3  # the worker's exit code when it gave up on a daemon that was unreachable for --leave-after
LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED  # the daemon linked (a handshake done), or lost

class _Link(threading.Thread):
    """The socket's thread: moves frames into `inbox` and results from `outbox` onto the wire."""

    def __init__(self, endpoint: str, hello: dict, settings: WorkerSettings, inbox: queue.Queue, outbox: queue.Queue,
                 max_part: int, leave_after_s: float | None = None) -> None:
        super().__init__(name="worker-link", daemon=True)
        self.endpoint, self.hello, self.settings, self.max_part = endpoint, hello, settings, max_part
        self.leave_after_s = leave_after_s  # None: wait for the daemon for ever (to rejoin it when it is back)
        self.unreachable_since: float | None = time.monotonic()  # no daemon linked since then; None while one is
        self.abandoned = False  # the daemon was unreachable for leave_after_s: the worker ends
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
        # ZMTP PINGs: a daemon whose host went silent (no FIN, no RST) is dropped after timeout_s, not waited on for ever
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(self.settings.heartbeat_s * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(self.settings.timeout_s * 1000)))
        # a refused handshake is said, not waited on in silence; a link made or lost tells whether the daemon is there
        monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS | LINK_EVENTS)
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
                    self._link_event(recv_monitor_message(monitor), said_at)
                if self._gone_too_long():
                    return
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
            sock.close(linger=0 if self.told_to_stop or self.abandoned else None)
            self.wakeup.close()

    def _link_event(self, event: Mapping[str, Any], said_at: dict[str, float]) -> None:
        """Note a link to the daemon made or lost; say a failed handshake."""
        kind = int(event["event"])
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.unreachable_since = None
        elif kind == zmq.EVENT_DISCONNECTED:
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
                if self.leave_after_s is not None:
                    log.warning("lost the daemon at %s; this worker ends if it is not back within %g s", self.endpoint, self.leave_after_s)
        else:
            self._say_handshake_failure(event, said_at)

    def _gone_too_long(self) -> bool:
        """Whether the daemon has been unreachable for leave_after_s: then the worker gives up (and says so)."""
        if self.leave_after_s is None or self.unreachable_since is None or self.told_to_stop:
            return False
        if time.monotonic() - self.unreachable_since < self.leave_after_s:
            return False
        log.error("no daemon reachable at %s for %g s (--leave-after): this worker ends, %d frame(s) it held unanswered (the daemon "
                  "sends them to other workers)", self.endpoint, self.leave_after_s, self.inbox.qsize() + self.busy)
        self.abandoned = True
        self.stopping.set()
        return True

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
               wrap_predictor: Callable[[FramePredictor], FramePredictor] | None = None, leave_after_s: float | None = None) -> int:
    """Serve frames until the daemon says stop, or (with `leave_after_s`) has been unreachable that long: then exit
    code 3.

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
    link = _Link(endpoint, hello, settings, inbox, outbox, wire.max_part_bytes(config.follow.max_frame_pixels), leave_after_s)
    link.start()
    log.info("worker %s on %s connected to %s", name, device, endpoint)
    sizer = BatchSizer(settings.batch_size, settings.latency_target_s)
    try:
        while not (link.stopping.is_set() and inbox.empty()) and not link.abandoned:
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
    return ABANDONED_EXIT if link.abandoned else 0
