"""One read-only all-zero array per shape and type, shared: what a frame with nothing in it is handed.

Why: most frames of a scan hold no peak, and at ~1,000 frames/s a fresh frame-sized array for each of them (three
masks off the wire, the 3D labels) costs its allocation and the kernel's clearing of its pages, for an array that is
then only read. Read-only, so that no one can write into what everyone shares.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=16)
def shared_zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    zeros = np.zeros(shape, dtype=dtype)
    zeros.flags.writeable = False
    return zeros
