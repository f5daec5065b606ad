"""One store in one row: what the front page and `/api/scans` show about a scan.

Read through `pipeline.store.reader` only: the root attributes (status, why it ended, expected
frames, times), the frames whose `frames/done` is 1, and the peaks table's row count. A store
whose status is final does not change any more, so its summary is kept until its `zarr.json`
changes (`signature`); a running store is summarised again on every pass.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.errors import one_line
from pipeline.store import schema
from pipeline.store.confined import ConfinedLocalStore
from pipeline.store.reader import StoreError, StoreReader, scan_name
from pipeline.store.schema import Attr


def signature(store: Path) -> tuple[int, int] | None:
    """(mtime, size) of the store's root metadata: changes whenever its attributes (status) do."""
    try:
        info = os.lstat(Path(store) / schema.ROOT_METADATA)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def root_attributes(store: Path) -> dict[str, Any] | None:
    """The store's root attributes, read as the web view reads every store file (pipeline.store.confined: no link
    followed, a regular file only, size capped); None while there is no such document (or it is not JSON yet)."""
    try:
        document = ConfinedLocalStore(store).get_sync(schema.ROOT_METADATA)
    except StoreError:
        return None
    if document is None:
        return None
    try:
        attributes = json.loads(document.to_bytes()).get("attributes", {})
    except (ValueError, AttributeError):
        return None
    return attributes if isinstance(attributes, dict) else None


def epoch(text: object) -> float | None:
    """An ISO time from a store's attributes as seconds since the epoch, None if it is not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _number(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def summarize(store: Path, scan_id: str) -> dict[str, Any] | None:
    """The row of a store, or None while it is not a store yet (no readable `zarr.json`, or one that is a link)."""
    attributes = root_attributes(store)
    if attributes is None:
        return None
    status = str(attributes.get(Attr.STATUS) or "unknown")
    summary: dict[str, Any] = {
        "id": scan_id,
        "name": scan_name(store),
        "store": str(store),
        "status": status,
        "end_reason": attributes.get(Attr.END_REASON),
        "frames_done": 0,
        "frames_expected": _number(attributes.get(Attr.FRAMES_EXPECTED)),
        "newest_done": None,
        "peaks": 0,
        "fps": None,
        "start_time": attributes.get(Attr.START_TIME),
        "end_time": attributes.get(Attr.END_TIME),
        "scan_command": attributes.get(Attr.SCAN_COMMAND),
        "layout": attributes.get(Attr.LAYOUT),
        "axis_name": attributes.get(Attr.AXIS_NAME),
        "problem": None,
        "daemon": None,
    }
    try:
        reader = StoreReader(store, confined=True)
        done = reader.done_frames()
        summary.update(frames_done=int(done.size), newest_done=int(done[-1]) if done.size else None,
                       peaks=reader.table_rows(schema.PEAKS))
    except StoreError as error:  # a failed scan's bare store: its attributes say why, there are no frames
        if status != schema.STATUS_FAILED:
            summary["problem"] = one_line(error)
    except Exception as error:  # a store half made or damaged: shown with what is wrong, never a crash of the page
        summary["problem"] = f"cannot read the store ({one_line(error)})"
    if status in schema.FINAL_STATUSES:
        start, end = epoch(summary["start_time"]), epoch(summary["end_time"])
        if start is not None and end is not None and end > start and summary["frames_done"]:
            summary["fps"] = round(summary["frames_done"] / (end - start), 2)
    return summary


def sort_key(summary: dict[str, Any], fallback: float) -> float:
    """Newest first: the store's start time, else its end time (a failed scan's bare store), else `fallback`."""
    for name in ("start_time", "end_time"):
        when = epoch(summary.get(name))
        if when is not None:
            return when
    return fallback
