"""Garbage for the worker port: what a confused or hostile peer can send."""

from __future__ import annotations

import json

import numpy as np

from pipeline.live import wire


def fuzzed_messages(rng: np.random.Generator, count: int) -> list[list[bytes]]:
    """A fixed-seed mix of every kind of garbage a port can receive."""
    good_header = {"task": 1, "scan": "s", "frame": 0, "worker": "w", "shape": [4, 5], "detections": [], "timings": {}}
    makers = [
        lambda: [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 6)))],
        lambda: [wire.RESULT, b"{not json"],
        lambda: [wire.RESULT, json.dumps(good_header).encode(), b"\x00" * 40, b"\x00" * 20, b"\x00" * 20],
        lambda: [wire.RESULT, json.dumps({**good_header, "shape": [100000, 100000]}).encode(), b"", b"", b""],
        lambda: [wire.RESULT, json.dumps({**good_header, "task": int(rng.integers(1, 10**6))}).encode(), b"\x00" * 40, b"\x00" * 20,
                 b"\x00" * 19],
        lambda: [wire.CREDIT, json.dumps({"n": 10**9}).encode()],
        lambda: [wire.HEARTBEAT, b"[]"],
        lambda: [wire.HELLO, json.dumps({"n": -5}).encode()],
        lambda: [wire.FRAME, b"{}", b""],
    ]
    return [makers[int(rng.integers(0, len(makers)))]() for _ in range(count)]
