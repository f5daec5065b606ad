"""The `hostile` fault's material: garbage for the daemon's worker port, and the sockets it was sent on."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import zmq


def hostile_messages(rng: np.random.Generator, count: int, mix: str = "full") -> list[list[bytes]]:
    """Garbage for the worker port, none of it a valid hello: every message must be rejected and counted.

    `basic` is the mix of tests/test_hostile.py; `full` adds what stresses the JSON parser and the
    number checks behind it (deep nesting, integers too long to convert, numbers that overflow a float).
    """
    from pipeline.live import wire

    good = {"task": 1, "scan": "s", "frame": 0, "worker": "w", "shape": [4, 5], "detections": [], "timings": {}}

    def result(header: dict[str, Any] | bytes, sizes: tuple[int, int, int] = (40, 20, 20)) -> list[bytes]:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        return [wire.RESULT, raw, *(b"\x00" * n for n in sizes)]

    makers = [
        lambda: [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 6)))],
        lambda: [wire.RESULT, b"{not json"],
        lambda: result(good),
        lambda: [wire.RESULT, json.dumps({**good, "shape": [100000, 100000]}).encode(), b"", b"", b""],
        lambda: result({**good, "task": int(rng.integers(1, 10**6))}, (40, 20, 19)),
        lambda: [wire.CREDIT, json.dumps({"n": 10**9}).encode()],
        lambda: [wire.HEARTBEAT, b"[]"],
        lambda: [wire.HELLO, json.dumps({"n": -5}).encode()],
        lambda: [wire.FRAME, b"{}", b""],
        lambda: [wire.BYE, b"{}"],
        lambda: [b""],
        lambda: [wire.HELLO, json.dumps({"n": 10**6, "name": "greedy"}).encode()],
        lambda: [wire.HELLO, b"\xff\xfe{}"],
        lambda: [wire.HELLO, b"x" * (wire.MAX_HEADER_BYTES + 1)],
    ]
    if mix == "full":
        makers += [
            lambda: [wire.HELLO, b"[" * int(rng.integers(1_100, 60_000))],  # nesting deeper than the recursion limit
            lambda: [wire.HELLO, b'{"n": 1' + b"0" * int(rng.integers(4_400, 20_000)) + b"}"],  # > 4300 digits
            lambda: [wire.CREDIT, b'{"n": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"],
            lambda: result({**good, "timings": {"tlm": 10**400}}),  # int too large for float()
            lambda: result({**good, "detections": [[0, 0, 1, 1, 10**400, 1]]}),
        ]
    return [makers[int(rng.integers(0, len(makers)))]() for _ in range(count)]


class HostileSenders:
    """The hostile bursts' sockets, kept open and read until their daemon is gone.

    A sender that closes its TCP connection while replies it never read are waiting (the daemon
    answers a stray heartbeat, result or credit with "rejoin") makes the kernel reset the
    connection, and a reset throws away the bytes the daemon's side has received but not yet read:
    the tail of the burst never reaches the dispatcher (seen in 10-minute soaks on a loaded
    machine, with TcpExtTCPAbortOnClose counting up). An attacker loses only its own messages that
    way; the soak must not, since it counts every message it sent as one the daemon must reject.
    """

    def __init__(self) -> None:
        self.open: list[tuple[zmq.Socket[bytes], int]] = []  # (DEALER socket, pid of the daemon it was sent to)

    def add(self, sock: zmq.Socket[bytes], daemon_pid: int) -> None:
        self.open.append((sock, daemon_pid))

    def service(self, current_pid: int | None) -> None:
        """Read and drop what the daemons sent back; close the sockets of daemons that are gone."""
        import zmq

        keep = []
        for sock, pid in self.open:
            if pid != current_pid:
                sock.close(linger=0)
                continue
            try:
                while True:
                    sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            keep.append((sock, pid))
        self.open = keep

    def close_all(self) -> None:
        self.service(current_pid=None)
