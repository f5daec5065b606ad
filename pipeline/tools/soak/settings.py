"""What one soak is asked to do: `SoakSettings` (every option of `pipeline soak`, built once from the command line),
the option parsers behind it, and the soak's fixed figures (fault kinds, tick, timeouts, the daemon's short settings)."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

FAULT_KINDS = ("worker_kill", "daemon_restart", "bad_file", "hostile", "worker_stall", "hung_worker", "rogue_worker", "idle_connections",
               "disk_full")
DEFAULT_FAULTS = ("worker_kill", "daemon_restart", "bad_file", "hostile", "hung_worker", "rogue_worker", "idle_connections", "disk_full")
# hostile files besides broken ones: an external link out of the watched roots, a deflate bomb in a frame's chunk
BAD_FILE_KINDS = ("not_hdf5", "no_detector", "truncated", "link_outside", "chunk_bomb")
HOSTILE_MIXES = ("basic", "full")
DEFAULT_MINUTES = 10.0

TICK_S = 0.25
STATUS_EVERY_S = 1.5
RSS_EVERY_S = 0.5
READY_TIMEOUT_S = 240.0  # the daemon's workers import torch and load models: slow on a busy machine
STOP_TIMEOUT_S = 90.0
WORKERS_EXIT_S = 5.0  # local workers watch their parent once a second
MIB = 1024 * 1024

# the daemon's settings during a soak (the rest comes from --config)
SOAK_TIMEOUT_S = 5.0
SOAK_TASK_TIMEOUT_S = 20.0  # a hung peer's frames are taken back after this (an honest CPU worker under load may hold its 8 for 10 s)
MISBEHAVING_S = SOAK_TASK_TIMEOUT_S + 4.0  # how long a hung or rogue peer stays
STORES_DISK_MIB = 512  # the `disk_full` fault's file system for the stores (a tmpfs: mounting it needs root)
DISK_FULL_S = 6.0  # how long the `disk_full` fault keeps the stores' file system full
IDLE_CONNECTIONS = 200  # plain connections opened to the worker port and left idle by the `idle_connections` fault
SOAK_HEARTBEAT_S = 0.5
SOAK_IDLE_TIMEOUT_S = 6.0


class SoakError(Exception):
    """A problem the user can fix (arguments, config, weights); one line, exit code 2."""


# --------------------------------------------------------------------------- parsers of option values

Number = TypeVar("Number", int, float)


def _range(kind: type[Number], low_limit: float) -> Callable[[str], tuple[Number, Number]]:
    """`--frames 6,20` -> (6, 20); one value is both ends; MIN <= MAX and MIN >= `low_limit`."""

    def parse(text: str) -> tuple[Number, Number]:
        parts = text.split(",")
        try:
            values = [kind(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN,MAX (or one value), got {text!r}") from None
        if len(values) == 1:
            values *= 2
        if len(values) != 2 or not low_limit <= values[0] <= values[1] < float("inf"):
            raise argparse.ArgumentTypeError(f"expected MIN,MAX with {low_limit:g} <= MIN <= MAX, got {text!r}")
        return values[0], values[1]

    return parse


def fault_kinds(text: str) -> list[str]:
    """`--faults worker_kill,hostile` -> the kinds, in order, without repeats; `all` is every kind."""
    if text.strip() == "all":
        return list(FAULT_KINDS)
    if text.strip() in ("", "none"):
        return []
    kinds: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(f"unknown fault {part!r}: expected some of {', '.join(FAULT_KINDS)}, all or none")
        if part not in kinds:
            kinds.append(part)
    return kinds


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class SoakSettings:
    """Every option of `pipeline soak`; the defaults are the command line's."""

    seconds: float = DEFAULT_MINUTES * 60.0  # how long faults are injected and scans written (--minutes or --seconds)
    seed: int = 0
    config: Path | None = None  # the user's YAML config (weights, settings); None: the built-in defaults
    out: Path | None = None  # where scans, stores and logs go (kept); None: a temporary directory
    keep: bool = False  # keep the temporary directory
    workers: int = 2  # local worker processes
    remote_workers: int = 0  # `pipeline worker --connect` processes, restarted when they exit
    device: str | None = None  # None: the config's workers.device
    json: Path | None = None  # where every figure is saved as JSON
    faults: tuple[str, ...] = DEFAULT_FAULTS
    fault_every: float = 20.0  # mean seconds between faults
    hostile_mix: str = "full"
    frames: tuple[int, int] = (6, 20)  # frames per scan, drawn in this range
    rate: tuple[float, float] = (5.0, 20.0)  # frames per second a scan is written at, drawn in this range
    parallel: int = 2  # scans written at once
    drain_timeout: float = 300.0  # how long the last scans may take to finish once the time is up
    compare: bool = True  # compare one good scan's store with `pipeline process` of the same file
    progress: bool = True  # the progress bar on stderr

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoakSettings:
        """The settings of a parsed `pipeline soak` command line (see `command.add_parser`)."""
        if args.seconds is not None:
            seconds = float(args.seconds)
        else:
            seconds = (DEFAULT_MINUTES if args.minutes is None else float(args.minutes)) * 60.0
        return cls(
            seconds=seconds, seed=args.seed, config=args.config, out=args.out, keep=args.keep, workers=args.workers,
            remote_workers=args.remote_workers, device=args.device, json=args.json, faults=tuple(args.faults),
            fault_every=args.fault_every, hostile_mix=args.hostile_mix, frames=args.frames, rate=args.rate,
            parallel=args.parallel, drain_timeout=args.drain_timeout, compare=args.compare, progress=not args.no_progress,
        )
