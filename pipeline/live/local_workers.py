"""The daemon's own worker processes: started, watched, and restarted with back-off when they fail.

A worker that cannot start (its weights missing in an install, a CUDA device asked for and
absent, a bad weights file) exits at once. Restarting it at once, for ever, would spin: instead a
worker that exits within `FAILED_START_S` of starting counts as a failed start, its next start
waits 1, 2, 4, ... up to `MAX_BACKOFF_S` seconds, and its reason (the one line the worker printed
before exiting) is kept for `pipeline status`. Once every slot has failed `GIVE_UP_STARTS` times in a
row, `unable` says in one line why no local worker can run (and `pipeline process` stops on it).
A worker's output still reaches the daemon's own stderr, line by line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.config import Config

log = logging.getLogger(__name__)

FAILED_START_S = 20.0  # a worker that exits sooner than this after starting did not start
MAX_BACKOFF_S = 60.0
GIVE_UP_STARTS = 3  # failed starts in a row of every slot after which no local worker can run


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failed_starts: int = 0
    next_start: float = 0.0
    last_error: str | None = None
    restarts: int = 0
    reader: threading.Thread | None = field(default=None, repr=False)


class LocalWorkers:
    """`workers.local` worker processes connecting to `endpoint`; `supervise` is called from the daemon's scheduler."""

    def __init__(self, config: Config, endpoint: str, private_folder: Path, joined: Callable[[int], bool] = lambda pid: False) -> None:
        """`private_folder`: only this user can open it (the daemon's RunFolder); the workers' config is written there."""
        self.config = config
        self.endpoint = endpoint
        self.private_folder = private_folder
        self.joined = joined  # whether the worker of this pid said hello to the dispatcher: then it started, and its exit is a crash
        self.slots = [_Slot(index) for index in range(config.workers.local)]
        self._config_file: Path | None = None
        self._lock = threading.Lock()
        self._retired = False  # the daemon is stopping: a worker that exits now was told to, and is not replaced

    @property
    def threads(self) -> int:
        return self.config.workers.threads or max(1, (os.cpu_count() or 1) // max(1, len(self.slots)))

    def start(self) -> None:
        if not self.slots:
            return
        self._config_file = self.private_folder / "worker-config.json"
        with os.fdopen(os.open(self._config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            json.dump(self.config.for_workers(), out)
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        program = self.config.workers.command or [sys.executable, "-m", "pipeline", "worker"]
        command = [*program, "--connect", self.endpoint, "--config", str(self._config_file), "--device", self.config.workers.device,
                   "--threads", str(self.threads), "--name", f"local-{slot.index}", "--parent", str(os.getpid()),
                   "--log-level", self.config.daemon.log_level]
        try:
            # a session of its own: Ctrl-C in the daemon's terminal stops the daemon, which drains and then stops its
            # workers; were they hit too, the frames in flight would never come back (the workers exit with the daemon)
            slot.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as error:  # the program itself is missing or not executable
            slot.process, slot.last_error = None, f"cannot run {command[0]}: {error.strerror or error}"
            self._failed(slot)
            return
        slot.started = time.monotonic()
        assert slot.process.stderr is not None
        slot.reader = threading.Thread(target=self._forward, args=(slot, slot.process.stderr), name=f"worker-{slot.index}-stderr",
                                       daemon=True)
        slot.reader.start()

    def _forward(self, slot: _Slot, stream: IO[bytes]) -> None:
        """Copy the worker's stderr to ours, remembering its last one-line error (`pipeline worker: ...`)."""
        for raw in iter(stream.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            line = raw.decode(errors="replace").strip()
            if line.startswith("pipeline worker:") or (line and "Error" in line.split(":", 1)[0]):
                slot.last_error = line
        stream.close()

    def _failed(self, slot: _Slot) -> None:
        slot.failed_starts += 1
        delay = min(MAX_BACKOFF_S, 2.0 ** (slot.failed_starts - 1))
        slot.next_start = time.monotonic() + delay
        log.error("local worker %d failed to start (%s); next try in %.0f s", slot.index, slot.last_error or "no reason given", delay)

    def supervise(self) -> None:
        """Restart workers that exited; a failed start waits its back-off first."""
        now = time.monotonic()
        with self._lock:
            if self._retired:
                return
            for slot in self.slots:
                process = slot.process
                if process is not None and process.poll() is None:
                    if slot.failed_starts and now - slot.started >= FAILED_START_S:
                        slot.failed_starts = 0  # it started after all
                    continue
                if process is not None:  # it has exited
                    if slot.reader is not None:
                        slot.reader.join(timeout=1)
                    if process.pid is not None and self.joined(process.pid):  # it had joined: a crash, not a failed start
                        log.error("local worker %d (pid %d) exited with %s after joining (%s); starting another", slot.index,
                                  process.pid, process.returncode, slot.last_error or "no reason given")
                        slot.last_error = None
                    elif now - slot.started < FAILED_START_S:
                        slot.last_error = slot.last_error or f"exited with {process.returncode} at start"
                        self._failed(slot)
                    else:
                        log.warning("local worker %d (pid %d) exited with %s; starting another", slot.index, process.pid,
                                    process.returncode)
                    slot.process = None
                if now >= slot.next_start:
                    slot.restarts += 1
                    self._spawn(slot)

    @property
    def unable(self) -> str | None:
        """Why no local worker can run, once every slot failed to start `GIVE_UP_STARTS` times in a row; else None."""
        if not self.slots or any(slot.failed_starts < GIVE_UP_STARTS for slot in self.slots):
            return None
        reason = next((slot.last_error for slot in self.slots if slot.last_error), "no reason given")
        return f"no local worker can start ({len(self.slots)} tried {GIVE_UP_STARTS} times each): {reason}"

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [slot.process for slot in self.slots if slot.process is not None]

    def status(self) -> list[dict[str, Any]]:
        return [{"index": slot.index, "pid": None if slot.process is None else slot.process.pid,
                 "running": slot.process is not None and slot.process.poll() is None, "failed_starts": slot.failed_starts,
                 "restarts": slot.restarts, "last_error": slot.last_error} for slot in self.slots]

    def retire(self) -> None:
        """From now on no worker is restarted: called before the dispatcher tells them to stop. A worker that stops in
        a few ms (cli._end_worker_now) was otherwise seen gone by a `supervise` still running and started again.

        A worker still starting (not joined) is ended now: the dispatcher's stop never reaches it, it holds no frame,
        and it would otherwise hold the stop 10 s and then read its config from the private folder the dispatcher has
        removed (`pipeline worker: ...: cannot read config`, printed after a `pipeline process` of one bad file)."""
        with self._lock:
            self._retired = True
            for process in self.processes():
                if process.poll() is None and not self.joined(process.pid):
                    process.terminate()

    def stop(self) -> None:
        """Wait for the workers (the dispatcher told them to stop), then kill what is left. Their config goes with the
        private folder it is in (its owner, the dispatcher, removes that)."""
        self.retire()
        for process in self.processes():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
