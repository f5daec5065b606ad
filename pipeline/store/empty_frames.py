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

from pipeline.common.zeros import is_shared_zeros


def has_data(frame: np.ndarray) -> bool:
    """Whether any pixel differs from zero (the fill of every mask array)."""
    if frame.size == 0 or is_shared_zeros(frame):  # most frames: handed the shared zeros by the wire or the linker
        return False
    if frame.dtype.kind == "u":
        return bool(frame.max() > 0)  # numpy's max is ~2-4x faster than any() on unsigned frames
    return bool(frame.any())


def index_runs(indices: Sequence[int]) -> list[list[int]]:
    """Sorted frame indices as runs of neighbours: [1, 2, 3, 7, 8] -> [[1, 2, 3], [7, 8]]."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
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
        for run in index_runs([offset for offset, want in enumerate(wanted) if want]):
            start, stop = run[0], run[-1] + 1
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
