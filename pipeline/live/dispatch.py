"""Hand frames to workers over ZeroMQ with credit-based flow control, and take their results back.

One thread owns the ROUTER socket. Workers say hello with the number of frames they can hold;
each frame sent spends one credit and each valid result returns it, so a slow worker is simply
sent less, and nothing queues without bound: `submit` blocks once `max_queued` frames wait.
A worker that stays silent past `timeout_s` (or says bye) is dropped and its frames in flight are
sent again to another; a result for a task that is no longer in flight (late, replayed, from a
stranger) is rejected and counted, never written.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from pipeline.common.endpoints import check_endpoint
from pipeline.common.run_folder import RunFolder
from pipeline.config import WorkerSettings
from pipeline.errors import PipelineError, one_line
from pipeline.live import wire
from pipeline.live.fair_queue import FairQueue
from pipeline.live.security import CurveServer
from pipeline.live.wakeup import Wakeup

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a frame lost this many times by workers that had delivered results is given up as failed
POLL_MS = 20


MAX_JOINED_PIDS = 100_000  # a bound on what hellos can make the dispatcher remember


@dataclass
class WorkerState:
    identity: bytes
    name: str
    device: str
    pid: int | None
    credit: int
    last_seen: float
    in_flight: set[int] = field(default_factory=set)
    frames_done: int = 0
    last_result: float = 0.0  # monotonic time of its last accepted result: a worker that delivers is slow, not hung


@dataclass
class Dispatch:
    """A frame as the daemon knows it while a worker has it."""

    task: wire.FrameTask
    context: Any  # what the submitter needs back with the result (e.g. axis value)
    attempts: int = 0  # times sent
    failures: int = 0  # times lost by a worker that had delivered results (a poison frame); see _drop_worker
    worker: bytes | None = None
    sent_at: float = 0.0  # wall clock (time.time), comparable across processes for latency figures
    sent_monotonic: float = 0.0  # for the task deadline (workers.task_timeout_s)
    queued_at: float = field(default_factory=time.time)


ResultHandler = Callable[[Dispatch, "wire.FrameResult | None", str | None], None]


class Dispatcher:
    def __init__(self, settings: WorkerSettings, on_result: ResultHandler, max_queued: int = 64,
                 context: zmq.Context | None = None, may_send: Callable[[], bool] | None = None,
                 max_frame_pixels: int = 8 * 2**20) -> None:
        self.settings = settings
        self.on_result = on_result
        # False while whoever takes the results is behind: no new frame goes out, so the results in
        # its backlog stay bounded (by what is in flight) and `on_result` never has to block this thread,
        # which must go on reading heartbeats and rejecting strangers
        self.may_send = may_send
        self.context = context or zmq.Context.instance()
        self.queue: FairQueue[Dispatch] = FairQueue(max_queued)  # scans served in turn (pipeline.live.fair_queue)
        self._wakeup = Wakeup()
        self.retry: deque[Dispatch] = deque()
        self.in_flight: dict[int, Dispatch] = {}
        self.workers: dict[bytes, WorkerState] = {}
        self.joined_pids: set[int] = set()  # pids workers gave at hello: a local worker that exits after joining crashed
        self.task_ids = itertools.count(1)
        # received: every message read from the socket, good or bad (so a shortfall in `rejected` can be
        # told apart from messages that never arrived)
        self.counters = {"sent": 0, "results": 0, "rejected": 0, "redispatched": 0, "failed": 0, "workers_lost": 0,
                         "received": 0, "tasks_timed_out": 0}
        self._stop = threading.Event()
        self._socket = self.context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # no part larger than a frame: a peer sending one is disconnected before its part is kept
        self._socket.setsockopt(zmq.MAXMSGSIZE, wire.max_part_bytes(max_frame_pixels))
        self._socket.setsockopt(zmq.HANDSHAKE_IVL, wire.HANDSHAKE_MS)  # a connection that never speaks ZMTP is closed, not kept
        # the daemon's private folder (RunFolder): its local workers' socket, their config, the keys CurveZMQ allows
        self.folder = RunFolder()
        self._curve: CurveServer | None = None
        try:
            self._curve = CurveServer(settings, self.context, self.folder.path) if settings.curve_secret_key is not None else None
            if self._curve is not None:
                self._curve.apply(self._socket)
            # local workers come in through a socket file in a directory only this user can open, so no other
            # local user can take frames or send results; TCP (for workers on other hosts) only when the config binds it
            local = f"ipc://{self.folder.path / 'workers'}"
            try:
                check_endpoint(local)
            except ValueError as error:
                raise PipelineError(f"the workers' socket file {local.removeprefix('ipc://')}: {error}; set TMPDIR to a shorter "
                                    "folder (the daemon's private folder is made there)") from None
            self._socket.bind(local)
            self.local_endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            if settings.bind:
                try:
                    self._socket.bind(settings.bind)
                except zmq.ZMQError as error:
                    why = "address in use (another daemon, or another program, listens there)" if error.errno == zmq.EADDRINUSE else one_line(error)
                    raise PipelineError(f"workers.bind {settings.bind}: {why}") from None
        except BaseException:
            self._close(linger_ms=0)
            raise
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if settings.bind else self.local_endpoint
        self._thread = threading.Thread(target=self._loop, name="dispatch", daemon=True)
        self._lock = threading.Lock()  # guards the snapshots that `stats` reads

    def start(self) -> Dispatcher:
        self._thread.start()
        log.info("dispatcher listening on %s", self.endpoint)
        return self

    # -- called from other threads ----------------------------------------------------------

    def submit(self, scan: str, frame: int, data: np.ndarray, context: Any = None, stop: threading.Event | None = None) -> bool:
        """Queue one frame; blocks while the queue, or this scan's share of it, is full. False if stopping before it was queued."""
        item = Dispatch(task=wire.FrameTask(task=0, scan=scan, frame=frame, data=data), context=context)
        while not self._stop.is_set():
            if self.queue.put(scan, item, timeout=0.1):
                self._wakeup.set()  # sent now, not after the dispatcher's poll
                return True
            if stop is not None and stop.is_set():
                return False
        return False

    def pending(self) -> int:
        return self.queue.qsize() + len(self.retry) + len(self.in_flight)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "endpoint": self.endpoint,
                "local_endpoint": self.local_endpoint,
                "queued": self.queue.qsize() + len(self.retry),
                "in_flight": len(self.in_flight),
                "workers": [
                    {"name": w.name, "device": w.device, "pid": w.pid, "credit": w.credit, "in_flight": len(w.in_flight),
                     "frames_done": w.frames_done, "silent_s": round(time.monotonic() - w.last_seen, 1)}
                    for w in self.workers.values()
                ],
                **self.counters,
            }

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # -- the dispatch thread ---------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for _ in range(256):  # drain what has arrived, bounded so sending is not starved
                    ready = dict(poller.poll(0 if _ else POLL_MS))
                    if self._wakeup.fd in ready:  # frames were queued: send them
                        self._wakeup.clear()
                    if self._socket not in ready:
                        break
                    parts = wire.received_parts(self._socket.recv_multipart(copy=False))  # results' masks: no copy
                    self.counters["received"] += 1
                    self._receive(parts)
                self._expire_silent_workers()
                self._send_frames()
        finally:
            for identity in list(self.workers):
                self._send(identity, wire.encode_control(wire.STOP))
            self._close(linger_ms=200)

    def discard(self) -> None:
        """Release what a dispatcher that will never start took (the daemon's start was refused after it was made): its
        private folder would otherwise be left for the next start to call a killed daemon's."""
        if not self._thread.is_alive():
            self._close(linger_ms=0)

    def _close(self, linger_ms: int) -> None:
        """The socket, the wakeup pipe, CurveZMQ's thread and the private folder: all that construction took."""
        self._socket.close(linger=linger_ms)
        self._wakeup.close()
        if self._curve is not None:
            self._curve.stop()
        self.folder.remove()

    def _send(self, identity: bytes, parts: Sequence[wire.Part]) -> bool:
        try:
            self._socket.send_multipart([identity, *parts], flags=zmq.NOBLOCK, copy=False)  # frames: no copy
            return True
        except zmq.ZMQError:
            return False

    def _reject(self, identity: bytes, reason: str) -> None:
        self.counters["rejected"] += 1
        if self.counters["rejected"] <= 20 or self.counters["rejected"] % 1000 == 0:
            log.warning("rejected message from %r: %s (%d rejected so far)", identity[:16], reason, self.counters["rejected"])

    def _receive(self, parts: list[wire.Part]) -> None:
        if len(parts) < 2:
            return self._reject(b"?", "empty message")
        if len(parts) > wire.MAX_PARTS + 1:  # the routing identity, then at most MAX_PARTS
            return self._reject(bytes(parts[0]), f"message of {len(parts) - 1} parts (at most {wire.MAX_PARTS})")
        identity, body = bytes(parts[0]), parts[1:]  # a routing identity: at most 255 bytes
        kind = body[0]
        worker = self.workers.get(identity)
        try:
            if kind == wire.HELLO:
                if worker is not None:  # a repeated hello (several rejoin requests crossed): the state we hold stands
                    worker.last_seen = time.monotonic()
                    return
                _, hello = wire.decode_control(body)
                credit = min(wire.credit_of(hello, limit=wire.MAX_CREDIT), self.settings.credit)  # what the config allows, not what it claims
                with self._lock:
                    self.workers[identity] = WorkerState(identity, str(hello.get("name", "?"))[:64], str(hello.get("device", "?"))[:32],
                                                         hello.get("pid") if isinstance(hello.get("pid"), int) else None, credit, time.monotonic())
                pid = self.workers[identity].pid
                if pid is not None and len(self.joined_pids) < MAX_JOINED_PIDS:
                    self.joined_pids.add(pid)
                log.info("worker %s joined (%s, credit %d)", self.workers[identity].name, self.workers[identity].device, credit)
                return
            if worker is None:
                if kind in (wire.HEARTBEAT, wire.RESULT, wire.CREDIT):  # a worker this daemon forgot: ask it to rejoin
                    self._send(identity, wire.encode_control(wire.REJOIN))
                return self._reject(identity, f"{kind[:16]!r} from a worker that never said hello")
            worker.last_seen = time.monotonic()
            if kind == wire.RESULT:
                self._accept_result(worker, wire.decode_result(body))
            elif kind == wire.HEARTBEAT:
                wire.decode_control(body)
            elif kind == wire.BYE:
                self._drop_worker(worker, "said bye")
            elif kind == wire.CREDIT:
                _, message = wire.decode_control(body)
                room = max(0, self.settings.credit - len(worker.in_flight))  # credit plus frames held never exceeds the config's credit
                worker.credit = min(worker.credit + wire.credit_of(message, wire.MAX_CREDIT), room)
            else:
                self._reject(identity, f"unknown message kind {kind[:16]!r}")
        except wire.WireError as error:
            self._reject(identity, str(error))
        except Exception as error:  # nothing a peer sends may stop the dispatcher
            log.exception("message from %r broke the dispatcher's checks", identity[:16])
            self._reject(identity, f"unhandled {type(error).__name__}")

    def _accept_result(self, worker: WorkerState, result: wire.FrameResult) -> None:
        dispatch = self.in_flight.get(result.task)
        if dispatch is None or dispatch.worker != worker.identity:
            return self._reject(worker.identity, f"result for task {result.task} that this worker does not hold (late or replayed)")
        task = dispatch.task
        if (result.scan, result.frame) != (task.scan, task.frame) or result.prediction.tlm_labels.shape != task.data.shape:
            return self._reject(worker.identity, f"result for task {result.task} does not match its frame")
        with self._lock:
            del self.in_flight[result.task]
            worker.in_flight.discard(result.task)
            worker.credit += 1
            worker.frames_done += 1
            worker.last_result = time.monotonic()
        self.counters["results"] += 1
        result.worker, result.device = worker.name, worker.device
        self._deliver(dispatch, result, None)

    def _deliver(self, dispatch: Dispatch, result: wire.FrameResult | None, error: str | None) -> None:
        try:
            self.on_result(dispatch, result, error)
        except Exception:  # the sink must not take the dispatcher down with it
            log.exception("result handler failed for %s frame %d", dispatch.task.scan, dispatch.task.frame)

    def _drop_worker(self, worker: WorkerState, why: str) -> None:
        with self._lock:
            self.workers.pop(worker.identity, None)
            lost = [self.in_flight.pop(task) for task in sorted(worker.in_flight) if task in self.in_flight]
        log.warning("worker %s left (%s); %d frame(s) in flight go to another worker", worker.name, why, len(lost))
        self.counters["workers_lost"] += why != "said bye"
        # only a worker that had delivered results counts against a frame: a peer that joins, takes frames and
        # vanishes (under new names each time) must not make a frame fail for good; one that said bye left cleanly
        counts = worker.frames_done > 0 and why != "said bye"
        for dispatch in reversed(lost):
            dispatch.failures += counts
            if dispatch.failures >= MAX_ATTEMPTS:
                self.counters["failed"] += 1
                self._deliver(dispatch, None, f"gave up after {dispatch.failures} workers failed on it")
            else:
                self.counters["redispatched"] += 1
                self.retry.appendleft(dispatch)

    def _expire_silent_workers(self) -> None:
        """Drop workers that went silent, and workers that heartbeat but sit on a frame past the task deadline
        (a hung model, a stopped process, a hostile peer): their frames go to another worker."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if now - worker.last_seen > self.settings.timeout_s:
                self._drop_worker(worker, f"silent for {now - worker.last_seen:.1f} s")
                continue
            held = [self.in_flight[task].sent_monotonic for task in worker.in_flight if task in self.in_flight]
            if not held:
                continue
            # hung: no answer for task_timeout_s since its oldest frame was sent or its last result, whichever is later
            # (a slow worker with a queue of frames keeps them while it delivers); a frame held credit times longer
            # than that is stuck however the others go
            waiting = now - max(min(held), worker.last_result)
            oldest = now - min(held)
            if waiting > self.settings.task_timeout_s or oldest > self.settings.task_timeout_s * max(1, self.settings.credit):
                self.counters["tasks_timed_out"] += len(held)
                self._drop_worker(worker, f"held a frame {oldest:.1f} s, no answer for {waiting:.1f} s (workers.task_timeout_s "
                                          f"{self.settings.task_timeout_s:g})")

    def _next_dispatch(self) -> Dispatch | None:
        if self.retry:
            return self.retry.popleft()
        return self.queue.get_nowait()

    def _send_frames(self) -> None:
        if self.may_send is not None and not self.may_send():
            return
        while True:
            ready = [w for w in self.workers.values() if w.credit > 0]
            if not ready:
                return
            dispatch = self._next_dispatch()
            if dispatch is None:
                return
            worker = max(ready, key=lambda w: (w.credit, -len(w.in_flight)))
            task = wire.FrameTask(task=next(self.task_ids), scan=dispatch.task.scan, frame=dispatch.task.frame, data=dispatch.task.data)
            if not self._send(worker.identity, wire.encode_frame(task)):
                self.retry.appendleft(dispatch)
                self._drop_worker(worker, "unreachable")
                continue
            with self._lock:
                dispatch.task, dispatch.worker, dispatch.sent_at = task, worker.identity, time.time()
                dispatch.sent_monotonic = time.monotonic()
                dispatch.attempts += 1
                self.in_flight[task.task] = dispatch
                worker.in_flight.add(task.task)
                worker.credit -= 1
            self.counters["sent"] += 1
