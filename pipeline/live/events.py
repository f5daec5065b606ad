"""What flows to the sink thread: a frame's context through the dispatcher, results and scan endings.

The dispatcher carries a `FrameContext` with each frame without looking at it; the sink gets it
back with the worker's result. Scan sessions post `ScanEnded` or `ScanFailed` once their file is
done (`ScanStalled` when a full disk or a lack of file descriptors stops them); the daemon posts `Quit` when it stops.
Only the sink thread acts on them, so a scan's store
has one writer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeline.live.dispatch import Dispatch
    from pipeline.live.wire import FrameResult


class ScanSession(Protocol):
    """What the sink does with a scan's session (pipeline.live.session.ScanSession). A protocol, so that the events
    a session posts need not import the session: no import circle in `live/`."""

    nexus_path: Path
    store_path: Path
    stop: threading.Event
    finished: threading.Event

    def accept_many(self, outcomes: list[Any]) -> None: ...

    def end(self, reason: str, abandon_in_flight: bool = False) -> None: ...

    def fail(self, reason: str) -> None: ...

    def stall(self, reason: str, wanting: str) -> None: ...


@dataclass(frozen=True)
class FrameContext:
    """What the sink needs back with a frame's result: whose frame it is and its scan-axis value."""

    session: ScanSession
    axis_value: float | None


@dataclass(frozen=True)
class ResultArrived:
    """A worker's result for a frame, or None with the reason when every worker failed on it."""

    dispatch: Dispatch
    result: FrameResult | None
    error: str | None


@dataclass(frozen=True)
class ScanEnded:
    """The session has submitted its last frame; `reason` is the follower's end reason. With `abandon_in_flight` (a stop
    whose drain ran out of time, or whose workers went), frames still in flight are left not done instead of awaited."""

    session: ScanSession
    reason: str
    abandon_in_flight: bool = False


@dataclass(frozen=True)
class ScanFailed:
    """The scan cannot be read (or its store written); `reason` is one line for the log and the store."""

    session: ScanSession
    reason: str


@dataclass(frozen=True)
class ScanStalled:
    """The scan stopped for want of `wanting` (pipeline.live.shortage: space, file descriptors); it resumes when that passes."""

    session: ScanSession
    reason: str
    wanting: str


@dataclass(frozen=True)
class Quit:
    """The daemon is stopping: the sink writes what it holds and ends."""


SinkEvent = ResultArrived | ScanEnded | ScanFailed | ScanStalled | Quit
