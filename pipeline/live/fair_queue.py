"""Frames waiting for a worker, taken from the scans in turn: a live scan's frame never waits behind another
scan's backlog.

One first-in-first-out queue made the scans share workers by how fast they could read: a finished file
fills every place in the queue, and a live scan's newest frame waits behind all of them (with the models
on a CPU, 64 frames are 40 s). Here each scan has its own line, the dispatcher takes one frame from each
scan in turn, and no scan may hold more than its share of the places (all of them for a scan alone, an equal
part of them for each of several), so a scan that starts later gets the next free place and is served from
its first frame on.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class FairQueue(Generic[Item]):
    """Bounded queue of items, each belonging to a scan: `get` serves the scans in turn (round robin)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._lines: OrderedDict[Hashable, deque[Item]] = OrderedDict()  # in turn order: the next to serve first
        self._wanting: dict[Hashable, int] = {}  # scans waiting in `put` for room: they count for the shares too
        self._size = 0
        self._changed = threading.Condition()

    def share(self, scan: Hashable) -> int:
        """The most places `scan` may hold now: the capacity split evenly between the scans that hold or want places."""
        with self._changed:
            return self._share(scan)

    def _share(self, scan: Hashable) -> int:
        scans = set(self._lines) | set(self._wanting) | {scan}
        return max(1, self.capacity // len(scans))

    def put(self, scan: Hashable, item: Item, timeout: float) -> bool:
        """Add `item` to `scan`'s line; waits while the queue or the scan's share is full. False after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._wanting[scan] = self._wanting.get(scan, 0) + 1
            try:
                while self._size >= self.capacity or len(self._lines.get(scan, ())) >= self._share(scan):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                self._lines.setdefault(scan, deque()).append(item)
                self._size += 1
                self._changed.notify_all()  # another scan's share may have shrunk or grown
                return True
            finally:
                self._wanting[scan] -= 1
                if not self._wanting[scan]:
                    del self._wanting[scan]

    def get_nowait(self) -> Item | None:
        """The next scan's oldest item (that scan then goes to the back of the turn), None if nothing waits."""
        with self._changed:
            if not self._lines:
                return None
            scan, line = next(iter(self._lines.items()))
            item = line.popleft()
            del self._lines[scan]
            if line:
                self._lines[scan] = line  # back of the turn
            self._size -= 1
            self._changed.notify_all()
            return item

    def qsize(self) -> int:
        with self._changed:
            return self._size

    def waiting_per_scan(self) -> dict[Hashable, int]:
        with self._changed:
            return {scan: len(line) for scan, line in self._lines.items()}
