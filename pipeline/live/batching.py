"""How many waiting frames a worker takes into its next model call: adaptive batching under a latency target.

Why: a GPU is busy only with batches, yet a lone frame at a slow detector should not wait for a batch to fill or pay
for a big call. The worker takes what is waiting, as many frames as still finish within `latency_target_s` of the
oldest one's arrival, by what each batch size has cost so far. Sizes come from a few buckets (powers of two up to
the most, and the most itself) so the models see few shapes: with `models.batch_padding: bucket` each bucket is one
shape, and a frame's masks depend only on its bucket.

Torch-free: the ONNX worker imports it. The buckets themselves are `pipeline.models.batch_buckets`.
"""

from __future__ import annotations

from pipeline.models.batch_buckets import bucket_for, buckets


class BatchSizer:
    """Chooses the next batch size from the backlog and the oldest frame's wait, learning each size's call time.

    `latency_target_s` None: every waiting frame up to `largest` (the worker's behaviour before this existed).
    Otherwise the largest bucket <= the frames waiting whose estimated call ends within the target, counted
    from the oldest frame's arrival; when not even one frame can make it, that frame is late whatever is done,
    and the largest bucket waiting is taken so the backlog drains at the models' best rate (a GPU's batches)
    instead of sliding into one slow call per frame.
    """

    def __init__(self, largest: int, latency_target_s: float | None = None, smoothing: float = 0.3) -> None:
        if latency_target_s is not None and not latency_target_s > 0:
            raise ValueError(f"latency_target_s must be > 0 or None, got {latency_target_s}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.sizes = buckets(largest)
        self.largest = largest
        self.latency_target_s = latency_target_s
        self.smoothing = smoothing  # weight of the newest call in each size's running mean
        self.seconds: dict[int, float] = {}  # batch size -> exponentially weighted mean seconds per call
        self.calls: dict[int, int] = {}  # batch size -> calls seen (the first of each is not learnt from)

    def record(self, size: int, seconds: float) -> None:
        """Learn from one model call of `size` frames that took `seconds` (kept under its bucket).

        The first call of each size is skipped: it pays one-off costs (lazy loads, allocations, a GPU's kernel
        choice for a new shape) that would make the size look slow for many calls after.
        """
        if size < 1 or not seconds >= 0:
            return
        size = bucket_for(size, self.largest)  # three frames ran as a call of four where padding is by bucket
        seen = self.calls.get(size, 0)
        self.calls[size] = seen + 1
        if seen == 0 and size not in self.seconds:
            return
        previous = self.seconds.get(size)
        self.seconds[size] = seconds if previous is None else previous + self.smoothing * (seconds - previous)

    def estimate(self, size: int) -> float | None:
        """Seconds a call of `size` frames should take (its bucket's); None while nothing has been learnt.

        A bucket not yet measured: the smaller measured size's per-frame time times `size` (batching costs at most
        linearly) and no more than a larger measured size's time (a call never gets cheaper with more frames).
        """
        size = bucket_for(size, self.largest)
        if size in self.seconds:
            return self.seconds[size]
        below = [s for s in self.seconds if s < size]
        above = [s for s in self.seconds if s > size]
        guesses = []
        if below:
            nearest = max(below)
            guesses.append(self.seconds[nearest] / nearest * size)
        if above:
            guesses.append(self.seconds[min(above)])
        return min(guesses) if guesses else None

    def choose(self, waiting: int, oldest_wait_s: float) -> int:
        """How many of the `waiting` frames (>= 1) to take now; the oldest has waited `oldest_wait_s` seconds."""
        waiting = max(1, waiting)
        fitting = [size for size in self.sizes if size <= waiting] or [1]
        if waiting < self.largest and waiting not in fitting:
            fitting.append(waiting)  # three waiting of buckets 1, 2, 4: three go (padded to 4 where padding is by bucket)
        if self.latency_target_s is None:
            return fitting[-1]
        left_s = self.latency_target_s - oldest_wait_s
        best = None
        for size in fitting:
            estimate = self.estimate(size)
            if estimate is None:  # nothing learnt yet: one frame, to learn the models' speed cheaply
                return 1 if best is None else best
            if estimate <= left_s:
                best = size
        return fitting[-1] if best is None else best
