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


class MisbehavingPeer:
    """A peer that joins the worker port as a worker and then does not do the work, on its own thread.

    `hung`: takes frames and heartbeats, never answers (a model stuck on the GPU); the dispatcher must
    take its frames back after `workers.task_timeout_s` and drop it. `rogue`: takes frames and answers
    with forged results, for tasks it does not hold and for its own tasks with another frame's index
    (a peer that would plant results in someone's store); every one must be rejected, so no store may
    name it as the maker of a frame (the soak counts any that does as a forged result accepted).
    """

    def __init__(self, endpoint: str, name: str, mode: str, seconds: float) -> None:
        import threading

        self.endpoint, self.name, self.mode, self.seconds = endpoint, name, mode, seconds
        self.frames_taken = 0
        self.forged_sent = 0
        self._thread = threading.Thread(target=self._run, name=f"soak-{name}", daemon=True)

    def start(self) -> MisbehavingPeer:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        import time

        import zmq

        from pipeline.live import wire
        from pipeline.models.prediction import Detection, FramePrediction

        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            sock.send_multipart(wire.encode_control(wire.HELLO, {"name": self.name, "n": 4}))
            shape = (195, 487)
            forged = FramePrediction(np.ones(shape, np.uint16), [Detection(box=(0.0, 0.0, 487.0, 195.0), score=0.99, instance_id=1)],
                                     np.full(shape, 7, np.uint8), np.ones(shape, np.uint8))
            if self.mode == "rogue":  # guessed task numbers first: results for frames it was never given
                for task_id in range(1, 21):
                    sock.send_multipart(wire.encode_result(wire.FrameResult(task_id, "forged", task_id, self.name, forged)))
                    self.forged_sent += 1
            ends = time.monotonic() + self.seconds
            next_beat = 0.0
            while time.monotonic() < ends:
                if time.monotonic() >= next_beat:
                    sock.send_multipart(wire.encode_control(wire.HEARTBEAT, {"held": self.frames_taken}))
                    next_beat = time.monotonic() + 0.3
                if not sock.poll(100):
                    continue
                parts = sock.recv_multipart()
                if parts[0] != wire.FRAME:
                    continue
                task = wire.decode_frame(parts)
                self.frames_taken += 1
                if self.mode != "rogue":
                    continue
                shape = task.data.shape  # a peak over the whole frame, with a confident box
                forged = FramePrediction(np.ones(shape, np.uint16), [Detection(box=(0.0, 0.0, float(shape[1]), float(shape[0])),
                                                                               score=0.99, instance_id=1)],
                                         np.full(shape, 7, np.uint8), np.ones(shape, np.uint8))
                for task_id, frame in ((task.task + 1, task.frame), (task.task + 10_000, task.frame), (task.task, task.frame + 1)):
                    sock.send_multipart(wire.encode_result(wire.FrameResult(task_id, task.scan, frame, self.name, forged)))
                    self.forged_sent += 1
        finally:
            sock.close(linger=0)
