"""The update stream: server-sent events (`text/event-stream`) that pages and scripts listen to.

`/api/stream` sends a `snapshot` of every scan first, then an `update` whenever the monitor's
version moves: the summaries that changed and the ids that went. `/api/stream/<id>` sends a `scan`
event whenever that scan's summary or its page's projection moves, and adds the frames that
became done to the projection between events. A browser's EventSource reconnects by itself.
Each stream ends when the client goes or the server stops (`closing`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from anyio import to_thread

from pipeline.errors import one_line
from pipeline.web.monitor import Monitor
from pipeline.web.scanview import ScanViews

POLL_S = 0.25  # how often a stream looks for a new version
KEEP_ALIVE_S = 15.0  # a comment line this often keeps proxies and idle timeouts from closing the stream
SCAN_EVENT_S = 1.0  # a scan's stream looks at the scan this often once its projection has caught up
ADVANCE_S = 0.5  # work per step of a long scan's projection catching up (other requests are answered between steps)


def event(name: str, data: Any) -> str:
    """One server-sent event (JSON data on one line)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


async def scans_events(monitor: Monitor, closing: threading.Event) -> AsyncIterator[str]:
    """A snapshot of every scan, then what changed, as the monitor sees it."""
    yield "retry: 2000\n\n"
    sent: dict[str, dict[str, Any]] | None = None
    version = -1
    last_sent = time.monotonic()
    while not closing.is_set():
        current_version, scans, daemon = monitor.snapshot()
        if current_version != version and (monitor.refreshed.is_set() or sent is None):
            current = {summary["id"]: summary for summary in scans}
            if sent is None:
                yield event("snapshot", {"version": current_version, "ready": monitor.refreshed.is_set(), "daemon": daemon,
                                         "problems": monitor.own_problems(), "scans": scans})
            else:
                changed = [summary for scan_id, summary in current.items() if sent.get(scan_id) != summary]
                removed = [scan_id for scan_id in sent if scan_id not in current]
                yield event("update", {"version": current_version, "ready": True, "daemon": daemon, "problems": monitor.own_problems(),
                                       "changed": changed, "removed": removed})
            sent, version, last_sent = current, current_version, time.monotonic()
        elif time.monotonic() - last_sent > KEEP_ALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_S)


async def scan_events(monitor: Monitor, views: ScanViews, scan_id: str, lookup: Callable[[str], Path | None],
                      closing: threading.Event) -> AsyncIterator[str]:
    """One scan's summary and projection progress whenever either moves; `gone` when the store is no longer there."""
    yield "retry: 2000\n\n"
    last: dict[str, Any] | None = None
    last_sent = time.monotonic()
    caught_up = False
    while not closing.is_set():
        path = lookup(scan_id)
        if path is None:
            yield event("gone", {"id": scan_id, "error": f"no scan {scan_id!r} under the roots"})
            return
        view = views.get(scan_id, path)
        payload = {"summary": monitor.get(scan_id), "view": view.progress()}
        if payload != last:  # first what there is (the page loads the frame at once), then the projection grows
            yield event("scan", payload)
            last, last_sent = payload, time.monotonic()
        elif time.monotonic() - last_sent > KEEP_ALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        try:
            caught_up = await to_thread.run_sync(view.advance, ADVANCE_S)
        except Exception as error:  # a store being replaced or removed: said on the page, looked at again next time
            view.problem, caught_up = one_line(error), True
        await asyncio.sleep(0.05 if not caught_up else SCAN_EVENT_S)
