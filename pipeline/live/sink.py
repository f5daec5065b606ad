"""The sink: the one thread that turns results into stores, so every store has one writer.

Results and scan endings arrive on one queue (`pipeline.live.events`). What is already waiting
is taken together (up to `SINK_BATCH` events) and written together, one write per array per
scan; a scan's results are always written before its end. A slow sink holds frames back through
`backlog()`, which the dispatcher asks before it sends a new frame, instead of blocking it.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable

from pipeline.errors import one_line, shortage_of
from pipeline.live.events import FrameContext, Quit, ResultArrived, ScanEnded, ScanFailed, ScanSession, ScanStalled, SinkEvent
from pipeline.live.session import FrameOutcome
from pipeline.live.timings import FrameTimings

log = logging.getLogger(__name__)

SINK_BACKLOG = 64  # results waiting for the sink beyond which no new frame is sent to a worker
SINK_BATCH = 32  # results already waiting that the sink writes together (one write per array per scan)


class Sink:
    """Owns the event queue and the thread that empties it; `on_scan_finished` is told when a scan ends."""

    def __init__(self, on_scan_finished: Callable[[], None]) -> None:
        # unbounded, yet bounded: the dispatcher sends no new frame while SINK_BACKLOG events wait, so
        # at most SINK_BACKLOG + the frames in flight are ever here, and a put never blocks it
        self.events: queue.Queue[SinkEvent] = queue.Queue()
        self.on_scan_finished = on_scan_finished
        self._thread = threading.Thread(target=self._loop, name="sink", daemon=True)

    def start(self) -> Sink:
        self._thread.start()
        return self

    def post(self, event: SinkEvent) -> None:
        self.events.put(event)

    def may_send(self) -> bool:
        """False while the sink is behind: the dispatcher then sends no new frame."""
        return self.events.qsize() < SINK_BACKLOG

    def stop(self, timeout: float = 5.0) -> None:
        self.events.put(Quit())
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while True:
            events = [self.events.get()]
            while len(events) < SINK_BATCH:  # take what is already waiting, never wait for more
                try:
                    events.append(self.events.get_nowait())
                except queue.Empty:
                    break
            results: dict[ScanSession, list[FrameOutcome]] = {}
            for event in events:
                if isinstance(event, ResultArrived):
                    self._collect(event, results)
                    continue
                self._write_results(results)  # a scan's results before its end
                results = {}
                if isinstance(event, Quit):
                    return
                self._end(event)
            self._write_results(results)

    def _guarded(self, session: ScanSession, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as error:  # one scan's broken store must not stop the others
            session.stop.set()
            wanting = shortage_of(error)
            if wanting is not None:  # nothing wrong with the scan: it resumes when the shortage has passed
                session.stall(f"{session.store_path}: writing stopped for want of {wanting} ({one_line(error)})", wanting)
            else:
                log.exception("%s: writing the store failed", session.nexus_path)
                session.fail(f"{session.store_path}: writing failed ({one_line(error)})")
        if session.finished.is_set():
            self.on_scan_finished()

    def _collect(self, event: ResultArrived, results: dict[ScanSession, list[FrameOutcome]]) -> None:
        dispatch, result, error = event.dispatch, event.result, event.error
        context = dispatch.context
        assert isinstance(context, FrameContext)  # the daemon's sessions submit every frame with one
        session = context.session
        if session.finished.is_set():
            return
        if error is not None:
            log.error("%s frame %d: %s", session.nexus_path.name, dispatch.task.frame, error)
        timings = FrameTimings(queued_at=dispatch.queued_at, sent_at=dispatch.sent_at, received_at=time.time(),
                               worker={} if result is None else dict(result.prediction.timings),
                               made_by=None if result is None else result.worker,
                               made_on=None if result is None else result.device or None)
        prediction = None if result is None else result.prediction
        results.setdefault(session, []).append(FrameOutcome(dispatch.task.frame, dispatch.task.data, context.axis_value,
                                                            prediction, timings))

    def _write_results(self, results: dict[ScanSession, list[FrameOutcome]]) -> None:
        for session, outcomes in results.items():
            if not session.finished.is_set():
                self._guarded(session, functools.partial(session.accept_many, outcomes))

    def _end(self, event: ScanEnded | ScanFailed | ScanStalled) -> None:
        session = event.session
        if isinstance(event, ScanStalled):
            self._guarded(session, functools.partial(session.stall, event.reason, event.wanting))
        elif isinstance(event, ScanEnded):
            self._guarded(session, functools.partial(session.end, event.reason, event.abandon_in_flight))
        else:
            self._guarded(session, functools.partial(session.fail, event.reason))
