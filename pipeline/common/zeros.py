"""One read-only all-zero array per shape and type, shared: what a frame with nothing in it is handed.

Why: most frames of a scan hold no peak, and at ~1,000 frames/s a fresh frame-sized array for each of them (three
masks off the wire, the 3D labels) costs its allocation and the kernel's clearing of its pages, for an array that is
then only read. Read-only, so that no one can write into what everyone shares.
"""

from __future__ import annotations

import numpy as np

MAX_KEPT = 16  # shapes x types kept at once: a daemon sees a few detector shapes, each in ~3 types
_kept: dict[tuple[tuple[int, ...], str], np.ndarray] = {}


def shared_zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    key = (tuple(shape), np.dtype(dtype).str)
    zeros = _kept.get(key)
    if zeros is None:
        zeros = np.zeros(shape, dtype=dtype)
        zeros.flags.writeable = False
        if len(_kept) >= MAX_KEPT:
            del _kept[next(iter(_kept))]  # the oldest: a later is_shared_zeros on it looks at its pixels instead
        _kept[key] = zeros
    return zeros


def is_shared_zeros(array: np.ndarray) -> bool:
    """Whether `array` is one of these shared zero arrays (the very object): known empty without reading its pixels."""
    return not array.flags.writeable and _kept.get((array.shape, array.dtype.str)) is array  # the flag: a quick no
