"""Which frames of a store's per-frame masks need no write: those all zero (the arrays' fill) whose chunks hold nothing.

Why: tensorstore checks every chunk it is handed against the fill value, element by element, and does not store
one equal to it; that check cost ~0.08 ms of CPU per frame and array, ~0.3 ms a frame for the four mask arrays (a
third of the daemon's CPU at ~1,000 frames/s with the models off, docs/performance.md). numpy's `max` tells an
all-zero unsigned frame in ~5 us. A frame left unwritten reads back as the fill, exactly as a frame tensorstore
declined to store, so the store's content is the same either way.

What must never be skipped is an empty frame whose chunk may already hold something: a frame written again (a
resumed store's frames past its done prefix, a scan resumed after a stall), or a frame left past the end when a
trim cut its shard. Such frames are written as before, and tensorstore removes their chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def has_data(frame: np.ndarray) -> bool:
    """Whether any pixel differs from zero (the fill of every mask array)."""
    if frame.size == 0:
        return False
    if frame.dtype.kind == "u":
        return bool(frame.max() > 0)  # numpy's max is ~2-4x faster than any() on unsigned frames
    return bool(frame.any())


def _true_runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, stop) of each run of True: [T, T, F, T] -> [(0, 2), (3, 4)]."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for offset, flag in enumerate(flags):
        if flag and start is None:
            start = offset
        elif not flag and start is not None:
            runs.append((start, offset))
            start = None
    if start is not None:
        runs.append((start, len(flags)))
    return runs


class WrittenFrames:
    """Per array, the frames whose chunks may hold something other than zeros on the disk: written with data by
    this writer, or unknown (everything below `unknown_below`, for a store this writer did not make)."""

    def __init__(self, names: Iterable[str], unknown_below: int = 0) -> None:
        self._may_hold = {name: np.ones(unknown_below, dtype=bool) for name in names}

    def may_hold(self, name: str, index: int) -> bool:
        held = self._may_hold[name]
        return bool(held[index]) if index < held.size else False

    def writes(self, name: str, first: int, frames: Sequence[np.ndarray]) -> list[tuple[str, slice, np.ndarray]]:
        """The writes that store frames `first`, `first + 1`, ... of array `name`: each run of frames that has data
        or may hold some, stacked; empty frames with nothing under them are left out."""
        held = self._grown(name, first + len(frames))
        wanted = [bool(held[first + offset]) or has_data(frame) for offset, frame in enumerate(frames)]
        writes = []
        for start, stop in _true_runs(wanted):
            # marked before the write: one that fails half way may have left anything in these chunks
            held[first + start:first + stop] = True
            writes.append((name, slice(first + start, first + stop), np.stack(frames[start:stop])))
        return writes

    def _grown(self, name: str, length: int) -> np.ndarray:
        held = self._may_hold[name]
        if held.size < length:
            held = np.concatenate([held, np.zeros(length - held.size, dtype=bool)])
            self._may_hold[name] = held
        return held
