"""The faults a soak injects, one at a time: worker kill -9, daemon kill -9 and restart, bad and hostile files, hostile
bursts, worker stalls (SIGSTOP past workers.timeout_s), hung and rogue peers on the worker port, idle connections."""

from __future__ import annotations

import os
import socket
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.common.detector import FRAME_SHAPE
from pipeline.tools.soak.hostile import MisbehavingPeer, hostile_messages
from pipeline.tools.soak.processes import Incarnation
from pipeline.tools.soak.scans import BadFile
from pipeline.tools.soak.settings import (
    BAD_FILE_KINDS,
    DISK_FULL_S,
    IDLE_CONNECTIONS,
    MIB,
    MISBEHAVING_S,
    SOAK_TIMEOUT_S,
    WORKERS_EXIT_S,
    SoakSettings,
)

if TYPE_CHECKING:
    import psutil
    import zmq

    from pipeline.tools.soak.run import Soak


def _appear(path: Path, write: Callable[[Path], Any]) -> None:
    """Write under a name the watcher ignores, then rename into place: the file appears whole."""
    temporary = path.with_name(path.name + ".part")
    write(temporary)
    os.replace(temporary, path)


class FaultInjector:
    """Fires one fault at a time: the first round one of each kind, evenly spaced, then kinds and gaps at random.

    A fault whose moment is not right (no worker has joined yet, no finished scan to truncate, the
    daemon still starting) waits and is tried again a little later.
    """

    RETRY_S = 1.0

    def __init__(self, soak: Soak, settings: SoakSettings, rng: np.random.Generator) -> None:
        self.soak, self.rng = soak, rng
        self.kinds, self.every_s, self.hostile_mix = list(settings.faults), settings.fault_every, settings.hostile_mix
        order = [k for k in ("worker_kill", "hostile", "bad_file", "hung_worker", "worker_stall", "rogue_worker", "idle_connections",
                             "disk_full", "daemon_restart") if k in self.kinds]
        self.first_round = order
        self.next_at = min(self.every_s, 3.0 + self.every_s / 2)
        self.pending: str | None = None
        self.bad_queue: list[str] = list(BAD_FILE_KINDS)  # each kind once, in this order, then shuffled rounds
        self.frozen: list[tuple[psutil.Process, float]] = []  # (process, resume at)

    def tick(self, elapsed: float) -> None:
        self.thaw()
        self.soak.close_idle_connections()
        self.soak.free_space()
        if not self.kinds or elapsed < self.next_at:
            return
        if self.pending is None:
            self.pending = self.first_round.pop(0) if self.first_round else str(self.rng.choice(self.kinds))
        done = getattr(self, f"_{self.pending}")()
        if done:
            self.soak.counts[self.pending] += 1
            self.pending = None
            gap = self.every_s if self.first_round else float(self.rng.exponential(self.every_s))
            self.next_at = elapsed + max(gap, self.every_s / 4)
        else:
            self.next_at = elapsed + self.RETRY_S

    def _ready(self) -> tuple[dict[str, Any], Incarnation] | None:
        """The daemon's status and incarnation once it is up with at least one worker, else None."""
        incarnation = self.soak.daemon.current
        if incarnation is None or incarnation.ready_at is None:
            self.soak.sample_status(force=True)
            incarnation = self.soak.daemon.current
            if incarnation is None or incarnation.ready_at is None:
                return None
        status = self.soak.sample_status(force=True)
        incarnation = self.soak.daemon.current
        if status is None or incarnation is None or not status["dispatch"]["workers"]:
            return None
        return status, incarnation

    def _worker_kill(self) -> bool:
        ready = self._ready()
        if ready is None:
            return False
        status, incarnation = ready
        busy = {w["pid"] for w in status["dispatch"]["workers"] if w["in_flight"] > 0}
        frozen = {process.pid for process, _ in self.frozen}
        workers = [w for w in self.soak.daemon.workers() if w.pid not in frozen]
        if not workers:
            return False
        choice = [w for w in workers if w.pid in busy] or workers
        victim = choice[int(self.rng.integers(0, len(choice)))]
        try:
            victim.kill()
        except Exception:
            return False
        self.soak.event("worker_kill", pid=victim.pid, busy=victim.pid in busy, daemon_pid=incarnation.pid)
        return True

    def _worker_stall(self) -> bool:
        """SIGSTOP a worker for longer than workers.timeout_s, then SIGCONT: the dispatcher drops it meanwhile."""
        ready = self._ready()
        if ready is None or self.frozen:
            return False
        _, incarnation = ready
        workers = self.soak.daemon.workers()
        if not workers:
            return False
        victim = workers[int(self.rng.integers(0, len(workers)))]
        try:
            victim.suspend()
        except Exception:
            return False
        hold = SOAK_TIMEOUT_S + 3.0
        self.frozen.append((victim, time.monotonic() + hold))
        self.soak.stalled_frozen.add(victim.pid)
        self.soak.event("worker_stall", pid=victim.pid, seconds=hold, daemon_pid=incarnation.pid)
        return True

    def thaw(self) -> None:
        """SIGCONT the stalled workers whose time is up."""
        for process, at in list(self.frozen):
            if time.monotonic() >= at:
                try:
                    process.resume()
                except Exception:
                    pass
                self.frozen.remove((process, at))
                # it may take a while to be heard of again; the zombie check starts after its grace period
                self.soak.stalled_frozen.discard(process.pid)
                self.soak.zombie_workers.pop(process.pid, None)

    def _daemon_restart(self) -> bool:
        ready = self._ready()
        if ready is None:
            return False
        _, incarnation = ready
        self.soak.sample_status(force=True)  # the rejected count of this daemon, as late as possible
        self._thaw_all()
        pid = incarnation.pid
        survivors = self.soak.daemon.kill()
        if survivors:
            self.soak.counts["orphaned_workers"] += len(survivors)
            self.soak.problems.append(f"worker process(es) {survivors} outlived daemon {pid} (kill -9) by {WORKERS_EXIT_S:g} s")
        self.soak.event("daemon_kill", pid=pid, orphaned_workers=survivors)
        started = self.soak.daemon.start()
        self.soak.event("daemon_start", pid=started.pid)
        return True

    def _thaw_all(self) -> None:
        for process, _ in self.frozen:
            try:
                process.resume()
            except Exception:
                pass
            self.soak.stalled_frozen.discard(process.pid)
        self.frozen.clear()

    def _bad_file(self) -> bool:
        import h5py

        finished = [s for s in self.soak.scans if s.written_at is not None and s.writer_error is None]
        if not self.bad_queue:
            self.bad_queue = [str(k) for k in self.rng.permutation(BAD_FILE_KINDS)]
        possible = [k for k in self.bad_queue if k != "truncated" or finished]  # a truncated copy needs a finished scan
        if not possible:
            return False
        kind = possible[0]
        self.bad_queue.remove(kind)
        number = len(self.soak.bad_files)
        path = self.soak.watch / f"bad-{number:03d}-{kind}.nxs"
        if kind == "not_hdf5":
            junk = b"this is not a scan file\n" + self.rng.bytes(int(self.rng.integers(0, 4096)))
            _appear(path, lambda p: p.write_bytes(junk))
            detail = f"{len(junk)} bytes of text and noise"
        elif kind == "no_detector":
            def write(p: Path) -> None:
                with h5py.File(p, "w") as handle:
                    entry = handle.create_group("entry1")
                    entry.attrs["NX_class"] = "NXentry"
                    entry.create_dataset("start_time", data="2024-01-01T00:00:00")
                    entry.create_dataset("scan_command", data="scan eta 0 1 0.1 pil3_100k 1")
                    entry.create_group("instrument/pil3_100k").attrs["NX_class"] = "NXdetector"
                    entry.create_dataset("end_time", data="2024-01-01T00:01:00")

            _appear(path, write)
            detail = "HDF5 with entry1 but no detector dataset"
        elif kind == "link_outside":  # another visit's data, through an external link out of the watched directory
            outside = self.soak.outside / f"other-visit-{number:03d}.h5"
            with h5py.File(outside, "w") as handle:
                handle.create_dataset("/entry/instrument/detector/data", data=np.ones((3, *FRAME_SHAPE), np.int32))

            def write(p: Path) -> None:
                with h5py.File(p, "w") as handle:
                    entry = handle.create_group("entry1")
                    entry.create_dataset("start_time", data="2024-01-01T00:00:00")
                    entry.create_dataset("end_time", data="2024-01-01T00:01:00")
                    entry["pil3_100k/data"] = h5py.ExternalLink(str(outside), "/entry/instrument/detector/data")

            _appear(path, write)
            detail = f"external link to {outside}"
        elif kind == "chunk_bomb":  # frame 1's 400 KB chunk holds zlib-compressed zeros of 256 MiB
            def write(p: Path) -> None:
                with h5py.File(p, "w") as handle:
                    entry = handle.create_group("entry1")
                    entry.create_dataset("start_time", data="2024-01-01T00:00:00")
                    entry.create_dataset("end_time", data="2024-01-01T00:01:00")
                    data = entry.create_dataset("pil3_100k/data", data=np.ones((3, *FRAME_SHAPE), np.int32),
                                                chunks=(1, *FRAME_SHAPE), compression="gzip")
                    data.id.write_direct_chunk((1, 0, 0), zlib.compress(bytes(256 * MIB), 1))

            _appear(path, write)
            detail = "a deflate bomb in frame 1's chunk"
        else:
            source = finished[int(self.rng.integers(0, len(finished)))].plan.nxs_path
            data = source.read_bytes()
            cut = int(len(data) * float(self.rng.uniform(0.3, 0.8)))
            _appear(path, lambda p: p.write_bytes(data[:cut]))
            detail = f"first {cut} of {len(data)} bytes of {source.name}"
        self.soak.bad_files.append(BadFile(path, kind, detail, time.time(), self.soak.stores_disk))
        self.soak.event("bad_file", file=path.name, kind=kind, detail=detail)
        return True

    def _hung_worker(self) -> bool:
        return self._misbehave("hung")

    def _rogue_worker(self) -> bool:
        return self._misbehave("rogue")

    def _misbehave(self, mode: str) -> bool:
        """A peer that joins as a worker and holds frames without answering (hung) or answers with forgeries (rogue)."""
        ready = self._ready()
        if ready is None:
            return False
        status, _ = ready
        name = f"{mode}-{self.soak.counts[f'{mode}_worker'] + 1}"
        peer = MisbehavingPeer(status["dispatch"]["endpoint"], name, mode, MISBEHAVING_S).start()
        self.soak.misbehaving.append(peer)
        self.soak.event(f"{mode}_worker", name=name, seconds=MISBEHAVING_S, daemon_pid=status["pid"])
        return True

    def _disk_full(self) -> bool:
        """Fill the stores' file system to the last byte for DISK_FULL_S: scans stall, then resume when it is freed."""
        if self.soak.stores_disk is None:
            if not self.soak.counts["disk_full_skipped"]:
                self.soak.warnings.append("disk_full: no file system of its own for the stores (mounting a tmpfs needs root); skipped")
            self.soak.counts["disk_full_skipped"] += 1
            return True
        filler = self.soak.stores_disk / f"filler-{self.soak.counts['disk_full']:03d}"
        with open(filler, "wb", buffering=0) as handle:
            for size in (MIB, 4096, 1):
                try:
                    while True:
                        handle.write(bytes(size))
                except OSError:
                    pass
        self.soak.fillers.append((filler, time.monotonic() + DISK_FULL_S))
        self.soak.event("disk_full", filler=filler.name, bytes=filler.stat().st_size, seconds=DISK_FULL_S)
        return True

    def _idle_connections(self) -> bool:
        """Plain connections to the worker port that never speak: each holds one of the daemon's descriptors."""
        ready = self._ready()
        if ready is None:
            return False
        status, _ = ready
        endpoint = str(status["dispatch"]["endpoint"])
        opened = []
        for _ in range(IDLE_CONNECTIONS):
            try:
                if endpoint.startswith("ipc://"):
                    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    connection.connect(endpoint.removeprefix("ipc://"))
                else:
                    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
                    connection = socket.create_connection((host, int(port)), timeout=1.0)
            except OSError:
                break
            opened.append(connection)
        self.soak.idle_connections.append((opened, time.monotonic() + MISBEHAVING_S))
        self.soak.event("idle_connections", opened=len(opened), daemon_pid=status["pid"])
        return bool(opened)

    def _hostile(self) -> bool:
        import zmq

        ready = self._ready()
        if ready is None:
            return False
        status, _ = ready
        endpoint = status["dispatch"]["endpoint"]
        count = int(self.rng.integers(50, 400))
        messages = hostile_messages(self.rng, count, self.hostile_mix)
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDTIMEO, 200)  # a send never blocks the soak for long
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a connection that is up, so "sent" means sent
        sock.connect(endpoint)
        sent = 0
        connected_by = time.monotonic() + 3.0
        for parts in messages:
            try:
                sock.send_multipart(parts)
                sent += 1
            except zmq.Again:  # not connected yet (IMMEDIATE), or the daemon is not reading (high-water mark)
                if sent or time.monotonic() > connected_by:
                    break
                continue
        self.soak.hostile_senders.add(sock, status["pid"])  # open until its daemon has gone: see HostileSenders
        self.soak.counts["hostile_sent"] += sent
        if self.soak.daemon.current is not None:
            self.soak.daemon.current.hostile_sent += sent
            self.soak.daemon.current.last_hostile_at = time.time()
        self.soak.event("hostile", sent=sent, of=count, daemon_pid=status["pid"])
        return sent > 0
