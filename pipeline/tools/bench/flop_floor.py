"""How far the models' time per frame is from what the CPU's arithmetic allows (the "FLOP floor").

Why: a model that takes 240 ms a frame may be slow code or a fast CPU doing a lot of work; the floor tells which.
It is the model's floating-point operations per frame (counted by torch's `FlopCounterMode` on the reference torch
models, convolutions and matrix products: everything else is a rounding error here) divided by the rate this same
CPU reaches on a plain float32 matrix product with the same threads, measured in the same run. A backend at 1.0x
the floor runs its convolutions as fast as the CPU multiplies large matrices; issue 24 asks for within 1.2x.

This module imports torch: it is for benchmarks (`scripts/onnx_bench.py`), never for a worker.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.models.joint import JointPredictor

MATMUL_SIZE = 2048  # large enough that the product runs at the BLAS kernel's steady rate, ~0.2 s on one core
MATMUL_REPEATS = 5


def matmul_gflops(threads: int) -> float:
    """The best float32 matrix-product rate (GFLOP/s) of `threads` threads over a few repeats."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        left = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator)
        right = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator)
        left @ right  # the first call pays for the kernel's workspace
        best = float("inf")
        for _ in range(MATMUL_REPEATS):
            started = time.perf_counter()
            left @ right
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return 2 * MATMUL_SIZE**3 / best / 1e9


def model_gflops(reference: JointPredictor, frames: np.ndarray) -> dict[str, float]:
    """Mean GFLOP per frame of each enabled model ("tlm", "sslm") over `frames`, run one at a time.

    The TLM's count varies a little with the frame (its heads run per proposal); the SSLM's is fixed by the shape.
    """
    from torch.utils.flop_counter import FlopCounterMode

    models = {"tlm": reference.tlm, "sslm": reference.sslm}
    names = {kind: type(model).__name__ for kind, model in models.items() if model is not None}
    totals = dict.fromkeys(names, 0.0)
    for frame in frames:
        with FlopCounterMode(display=False, depth=1) as counter:
            reference.predict_batch(frame[None])
        counts = counter.get_flop_counts()
        for kind, name in names.items():
            totals[kind] += sum(counts.get(name, {}).values())
    return {kind: total / len(frames) / 1e9 for kind, total in totals.items()}


def floor_ms(gflop_per_frame: dict[str, float], gflops: float) -> dict[str, float]:
    """Milliseconds per frame each model would take at `gflops`."""
    return {kind: gflop / gflops * 1000 for kind, gflop in gflop_per_frame.items()}
