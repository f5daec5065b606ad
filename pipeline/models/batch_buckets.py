"""The batch sizes a model call may have: a few buckets, so the models see few shapes.

Why its own module: the joint predictor pads each call to its bucket (`models.batch_padding: bucket`)
and the worker's batch sizer (`pipeline.live.batching`) chooses among the same buckets; both need
the one definition, and the models must not depend on the live daemon's modules. Torch-free.
"""

from __future__ import annotations

import bisect


def buckets(largest: int) -> tuple[int, ...]:
    """The batch sizes used up to `largest`: 1, 2, 4, ... below it, and `largest` itself."""
    if largest < 1:
        raise ValueError(f"the largest batch must be >= 1, got {largest}")
    sizes = [1]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != largest:
        sizes.append(largest)
    return tuple(sizes)


def bucket_for(count: int, largest: int) -> int:
    """The smallest bucket (of `buckets(largest)`) holding `count` frames; `largest` when more."""
    if count < 1:
        raise ValueError(f"a batch holds at least one frame, got {count}")
    sizes = buckets(largest)
    return sizes[min(bisect.bisect_left(sizes, count), len(sizes) - 1)]
