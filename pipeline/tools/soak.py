"""`pipeline soak`: the real daemon, for minutes, under a stream of scans and random faults.

One run:

- starts `pipeline run` as a real subprocess on a generated config (a temporary watched
  directory, `daemon.audit_log` set, the control socket on a free port, short timeouts);
- writes a stream of small simulated scans into the watched directory (`ScanWriter`: real writer
  processes, real SWMR files), in all three I16 layouts, at most `--parallel` at a time;
- injects faults at random times (seeded): `kill -9` of a local worker, `kill -9` of the daemon
  followed by a restart (it resumes unfinished scans from `frames/done`), bad scan files dropped
  into the watched directory (not HDF5; a truncated copy of a finished scan; HDF5 without the
  detector dataset), bursts of hostile messages on the daemon's worker port, and (with
  `--faults ...,worker_stall`) a worker frozen with SIGSTOP past `workers.timeout_s`;
- then stops injecting, lets the last scans finish, stops the daemon with SIGTERM and checks,
  against the stores and the audit log (one line per frame done, written after its done flag):

  lost      frames written to a good scan but not done in its final store, or done without an
            audit line;
  doubled   audit lines for a (scan, frame) beyond the first: a frame whose done flag was set must
            never be done again, by any daemon process (a restarted daemon redoes only frames that
            were not done, which leave no audit line);
  every good scan's store `complete`, every bad file's store `failed`, the daemon never dying on
  its own, stopping on SIGTERM, and its workers never outliving it.

Exit code 0 only when all of that holds. `--json` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.argtypes import non_negative_int, one_line_errors, positive_float, positive_int, run_standalone

FAULT_KINDS = ("worker_kill", "daemon_restart", "bad_file", "hostile", "worker_stall")
DEFAULT_FAULTS = ("worker_kill", "daemon_restart", "bad_file", "hostile")
BAD_FILE_KINDS = ("not_hdf5", "no_detector", "truncated")
HOSTILE_MIXES = ("basic", "full")
FINAL_STATUSES = ("complete", "incomplete", "failed")

TICK_S = 0.25
STATUS_EVERY_S = 1.5
RSS_EVERY_S = 0.5
READY_TIMEOUT_S = 240.0  # the daemon's workers import torch and load models: slow on a busy machine
STOP_TIMEOUT_S = 90.0
WORKERS_EXIT_S = 5.0  # local workers watch their parent once a second
MIB = 1024 * 1024

# the daemon's settings during a soak (the rest comes from --config)
SOAK_TIMEOUT_S = 5.0
SOAK_HEARTBEAT_S = 0.5
SOAK_IDLE_TIMEOUT_S = 6.0


class SoakError(Exception):
    """A problem the user can fix (arguments, config, weights); one line, exit code 2."""


# --------------------------------------------------------------------------- the command line


def _range(kind: type, low_limit: float) -> Any:
    def parse(text: str) -> tuple[Any, Any]:
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


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `soak` sub-command; argument errors are one line and exit code 2."""
    parser = subparsers.add_parser(
        "soak", help="run the real daemon for minutes under simulated scans and random faults; count lost and doubled frames",
        description="Start `pipeline run` as a subprocess, write a stream of small simulated scans (all three layouts) into "
                    "its watched directory and inject faults at random (seeded): kill -9 of workers and of the daemon "
                    "(restarted: it resumes from frames/done), bad scan files, hostile messages on the worker port. At "
                    "the end, check the stores and the daemon's audit log: no frame lost or done twice, every good scan "
                    "complete, every bad file failed. Exit code 0 only then.")
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=positive_float, default=None, metavar="N",
                          help="how long to inject faults and write scans (default 10)")
    duration.add_argument("--seconds", type=positive_float, default=None, metavar="S", help="the same in seconds")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of scans and faults (default 0)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML config for weights and settings (default: the built-in defaults); the soak sets the "
                             "watched directory, ports, audit log and short timeouts itself")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write scans, stores, logs and the audit log here (kept); default: a temporary directory, "
                             "removed unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    parser.add_argument("--workers", type=positive_int, default=2, metavar="N", help="local worker processes (default 2)")
    parser.add_argument("--remote-workers", type=non_negative_int, default=0, metavar="N",
                        help="also run N `pipeline worker --connect` processes, as on other hosts: they outlive daemon "
                             "restarts and must join each new daemon (the soak restarts one that exits, as systemd "
                             "would) (default 0)")
    parser.add_argument("--device", default=None, metavar="DEV", help="auto | cpu | cuda | cuda:N (default: workers.device)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also save every figure here as JSON")
    parser.add_argument("--faults", type=fault_kinds, default=list(DEFAULT_FAULTS), metavar="KIND,...",
                        help=f"faults to inject, each at least once when the time allows: {', '.join(FAULT_KINDS)}, "
                             f"all or none (default {','.join(DEFAULT_FAULTS)})")
    parser.add_argument("--fault-every", type=positive_float, default=20.0, metavar="S",
                        help="mean seconds between faults (default 20; the first round, one of each kind, is evenly spaced)")
    parser.add_argument("--hostile-mix", choices=HOSTILE_MIXES, default="full",
                        help="basic: the garbage of tests/test_hostile.py; full: also messages that stress the JSON "
                             "parser (deep nesting, huge numbers) (default full)")
    parser.add_argument("--frames", type=_range(int, 1), default=(6, 20), metavar="MIN,MAX",
                        help="frames per scan, drawn in this range (default 6,20)")
    parser.add_argument("--rate", type=_range(float, 0.1), default=(5.0, 20.0), metavar="MIN,MAX",
                        help="frames per second a scan is written at, drawn in this range (default 5,20)")
    parser.add_argument("--parallel", type=positive_int, default=2, metavar="N", help="scans written at once (default 2)")
    parser.add_argument("--drain-timeout", type=positive_float, default=300.0, metavar="S",
                        help="after the time is up, how long the last scans may take to finish (default 300)")
    parser.add_argument("--compare", dest="compare", action="store_true", default=True,
                        help="compare one good scan's store with `pipeline process` of the same file (default)")
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip that comparison")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_soak)

    one_line_errors(parser)


def run_soak(args: argparse.Namespace) -> int:
    """`pipeline soak ...`: 0 when nothing was lost or doubled and every scan ended as it should; 1 otherwise."""
    try:
        report = Soak(args).run()
    except SoakError as error:
        print(f"pipeline soak: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline soak: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"figures saved in {args.json}")
    return 0 if report["passed"] else 1


# --------------------------------------------------------------------------- small helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _attrs(store: Path) -> dict[str, Any]:
    try:
        return json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def _appear(path: Path, write: Any) -> None:
    """Write under a name the watcher ignores, then rename into place: the file appears whole."""
    temporary = path.with_name(path.name + ".part")
    write(temporary)
    os.replace(temporary, path)


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


# --------------------------------------------------------------------------- the daemon as a subprocess


def _reap(children: list) -> list[int]:
    """Workers still alive once their daemon is gone: killed, and their pids returned as a defect to report."""
    import psutil

    _, alive = psutil.wait_procs(children, timeout=WORKERS_EXIT_S)
    survivors = []
    for child in alive:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                survivors.append(child.pid)
                child.kill()
        except psutil.Error:
            pass
    return survivors


@dataclass
class Incarnation:
    """One `pipeline run` process from start to end."""

    number: int
    pid: int
    log: Path
    started: float
    ready_at: float | None = None
    ended: float | None = None
    how_ended: str | None = None  # killed (by the soak) | exited N (on its own) | stopped (SIGTERM) | ...
    rejected: int = 0
    received: int = 0  # messages of any kind its dispatcher read
    hostile_sent: int = 0
    last_hostile_at: float | None = None
    status_at: float = 0.0  # when its status (with the rejected count) was last read
    peak_rss_mib: float = 0.0
    first_rss_mib: float | None = None
    last_rss_mib: float | None = None
    worker_pids: set[int] = field(default_factory=set)


class DaemonProcess:
    def __init__(self, config_path: Path, watch: Path, logs: Path, endpoint: str) -> None:
        self.config_path, self.watch, self.logs, self.endpoint = config_path, watch, logs, endpoint
        self.process: subprocess.Popen | None = None
        self.incarnations: list[Incarnation] = []

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations and self.incarnations[-1].ended is None else None

    def start(self) -> Incarnation:
        number = len(self.incarnations) + 1
        log = self.logs / f"daemon-{number}.log"
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "--config", str(self.config_path), "--watch", str(self.watch)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        incarnation = Incarnation(number, self.process.pid, log, time.time())
        self.incarnations.append(incarnation)
        return incarnation

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self, timeout_s: float = 1.0) -> dict[str, Any] | None:
        from pipeline.live.control import query_status

        if not self.alive():
            return None
        try:
            status = query_status(self.endpoint, timeout_s=timeout_s)
        except Exception:  # a half-written reply from a daemon being killed
            return None
        if status is not None and self.current is not None and status.get("pid") != self.current.pid:
            return None  # an earlier daemon still answering on the port: not ours any more
        return status

    def workers(self) -> list[Any]:
        """The daemon's local worker processes (psutil), found as its children."""
        import psutil

        if not self.alive():
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for child in children:
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            if "worker" in command and any("pipeline" in part for part in command):
                found.append(child)
        return found

    def _children(self) -> list[Any]:
        import psutil

        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> list[int]:
        """kill -9 the daemon; returns the pids of children that outlived it by WORKERS_EXIT_S (then killed)."""
        children = self._children()
        self.process.kill()
        self.process.wait()
        self._ended("killed")
        return _reap(children)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> tuple[str, list[int]]:
        """SIGTERM (drain), wait; returns how it ended and the pids of children left behind (then killed)."""
        if not self.alive():
            return "not running", []
        children = self._children()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
            how = "stopped" if code == 0 else f"stopped with exit code {code}"
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            how = f"did not stop within {timeout_s:g} s of SIGTERM (killed)"
        self._ended(how)
        return how, _reap(children)

    def check_exit(self) -> str | None:
        """If the daemon died on its own since the last look: how (and the incarnation is closed)."""
        if self.process is None or self.current is None or self.process.poll() is None:
            return None
        how = f"exited on its own with code {self.process.returncode}"
        self._ended(how)
        return how

    def _ended(self, how: str) -> None:
        incarnation = self.current
        if incarnation is not None:
            incarnation.ended, incarnation.how_ended = time.time(), how


# --------------------------------------------------------------------------- the soak


@dataclass
class GoodScan:
    plan: Any  # ScanPlan
    writer: Any  # ScanWriter
    started: float
    written_at: float | None = None
    writer_error: str | None = None

    @property
    def store(self) -> Path:
        return self.plan.nxs_path.with_suffix(".zarr")


@dataclass
class BadFile:
    path: Path
    kind: str
    detail: str
    made_at: float

    @property
    def store(self) -> Path:
        return self.path.with_suffix(".zarr")


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
        self.open: list[tuple[Any, int]] = []  # (DEALER socket, pid of the daemon it was sent to)

    def add(self, sock: Any, daemon_pid: int) -> None:
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


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.duration_s = args.seconds if args.seconds is not None else (10.0 if args.minutes is None else args.minutes) * 60.0
        self.rng = np.random.default_rng(args.seed)
        self.scans: list[GoodScan] = []
        self.bad_files: list[BadFile] = []
        self.events: list[dict[str, Any]] = []  # every fault and notable happening, with its time
        self.hostile_senders = HostileSenders()
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []  # what makes the run fail besides lost/doubled/status
        self.warnings: list[str] = []  # what looks wrong but may cost nothing (e.g. a worker that never rejoined)
        self.audit: Counter[tuple[str, int]] = Counter()
        self.audit_pids: dict[tuple[str, int], list[int]] = {}
        self.audit_bad_lines = 0
        self._audit_offset = 0
        self.worker_peak_rss_mib = 0.0
        self.worker_peak_pid: int | None = None
        self.zombie_workers: dict[int, dict[str, Any]] = {}  # pid -> first seen alive but unknown to the dispatcher
        self.stalls: list[dict[str, Any]] = []
        self._last_status: dict[str, Any] | None = None
        self._last_status_at = 0.0
        self._last_rss_at = 0.0
        self._stalled_frozen: set[int] = set()
        self._ever_joined: set[int] = set()
        self._final: dict[Path, str] = {}  # worker pids the dispatcher has listed at some point
        self.t0 = time.time()

    # -- set-up ----------------------------------------------------------------------------

    def _config(self, root: Path) -> tuple[Path, Path, dict[str, Any]]:
        """The daemon's config (and one for `pipeline process`): the user's models and settings, our directories and timeouts."""
        import yaml

        from pipeline.config import ConfigError, load_config

        try:
            base = load_config(self.args.config)
        except ConfigError as error:
            raise SoakError(str(error)) from None
        self._check_weights(base)
        control = f"tcp://127.0.0.1:{free_port()}"
        overrides: dict[str, Any] = {
            "watch.dirs": [str(self.watch)], "watch.resume_existing": True,
            "watch.rescan_interval_s": min(base.watch.rescan_interval_s, 2.0),
            "workers.local": self.args.workers, "workers.timeout_s": SOAK_TIMEOUT_S, "workers.heartbeat_s": SOAK_HEARTBEAT_S,
            # remote workers need an endpoint that stays the same across daemon restarts
            "workers.bind": f"tcp://127.0.0.1:{free_port()}" if self.args.remote_workers else "tcp://127.0.0.1:0",
            "follow.idle_timeout_s": SOAK_IDLE_TIMEOUT_S,
            "follow.link_timeout_s": min(base.follow.link_timeout_s, 30.0),
            "follow.open_timeout_s": min(base.follow.open_timeout_s, 30.0),
            "output.root": None, "daemon.control": control, "daemon.log_level": "INFO", "daemon.log_file": None,
            "daemon.metrics_port": None, "daemon.audit_log": str(self.audit_path),
        }
        if self.args.device is not None:
            overrides["workers.device"] = self.args.device
        try:
            config = base.with_overrides(overrides)
            offline = config.with_overrides({"daemon.audit_log": None, "daemon.control": f"tcp://127.0.0.1:{free_port()}",
                                             "watch.dirs": []})
        except ConfigError as error:
            raise SoakError(str(error)) from None
        live_path, offline_path = root / "soak.yaml", root / "offline.yaml"
        live_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        offline_path.write_text(yaml.safe_dump(offline.model_dump(mode="json"), sort_keys=False))
        self.worker_endpoint = config.workers.bind
        self.live_config = live_path
        settings = {"control": control, "workers": self.args.workers, "remote_workers": self.args.remote_workers,
                    "device": config.workers.device,
                    "timeout_s": SOAK_TIMEOUT_S, "heartbeat_s": SOAK_HEARTBEAT_S, "idle_timeout_s": SOAK_IDLE_TIMEOUT_S,
                    "credit": config.workers.credit, "batch_size": config.workers.batch_size,
                    "weights": {name: str(getattr(config.models, name).weights or "shipped") for name in ("tlm", "sslm")}}
        return live_path, offline_path, settings

    @staticmethod
    def _check_weights(config: Any) -> None:
        """Fail in one line before starting anything when the shipped weights are missing (the workers would only log it)."""
        override = os.environ.get("PIPELINE_WEIGHTS_DIR")  # as pipeline.models.card.weights_dir, without importing torch here
        shipped = Path(override) if override else Path(__file__).resolve().parents[1] / "weights"
        for name in ("tlm", "sslm"):
            settings = getattr(config.models, name)
            if settings.enabled and settings.weights is None and not (shipped / f"{name}.safetensors").is_file():
                raise SoakError(f"no {name.upper()} weights at {shipped / (name + '.safetensors')}: train them "
                                f"(`pipeline train {name}`) or give --config with models.{name}.weights")

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        if args.json is not None and not args.json.resolve().parent.is_dir():
            raise SoakError(f"cannot write {args.json}: no directory {args.json.resolve().parent}")
        temporary = args.out is None
        root = Path(tempfile.mkdtemp(prefix="pipeline-soak-")) if temporary else args.out.resolve()
        if not temporary:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SoakError(f"cannot create {root}: {error.strerror}") from None
            if any(root.iterdir()):
                raise SoakError(f"{root} is not empty: give a new or empty directory")
        self.root, self.watch, self.logs = root, root / "scans", root / "logs"
        self.audit_path = root / "audit.jsonl"
        self.watch.mkdir()
        self.logs.mkdir()
        try:
            live_config, offline_config, settings = self._config(root)
            self.daemon = DaemonProcess(live_config, self.watch, self.logs, settings["control"])
            report = self._run(settings, offline_config)
        finally:
            self._cleanup()
            if temporary and not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        report["outputs"] = str(root) if (not temporary or args.keep) else None
        return report

    def _run(self, settings: dict[str, Any], offline_config: Path) -> dict[str, Any]:
        from tqdm import tqdm

        args = self.args
        started = time.time()
        self.daemon.start()
        self.remote: list[subprocess.Popen] = []
        self._start_remote_workers()
        bar = tqdm(total=round(self.duration_s), desc="soak: starting", unit="s", file=sys.stderr, leave=False,
                   disable=args.no_progress or None, bar_format="{desc} |{bar}| {n:.0f}/{total} s {postfix}")
        try:
            self._wait_ready(READY_TIMEOUT_S)
            startup_s = time.time() - started
            self.t0 = time.time()
            self.injector = FaultInjector(self, list(args.faults), args.fault_every, self.rng)
            bar.set_description_str("soak")
            while (elapsed := time.time() - self.t0) < self.duration_s:
                self._tick()
                self._feed_scans()
                self.injector.tick(elapsed)
                bar.n = min(elapsed, self.duration_s)
                bar.set_postfix_str(self._postfix(), refresh=False)
                bar.refresh()
                time.sleep(TICK_S)
            bar.set_description_str("soak: finishing")
            drain_started = time.time()
            self._drain(bar)
            drain_s = time.time() - drain_started
        finally:
            bar.close()
        if self.args.remote_workers and self.daemon.current is not None and self.daemon.current.ready_at is not None:
            # give remote workers their chance to join the last daemon before judging them
            time.sleep(max(0.0, self.daemon.current.ready_at + 2 * SOAK_TIMEOUT_S + 1 - time.time()))
        self._sample_status(force=True)
        self.hostile_senders.close_all()
        how, survivors = self.daemon.stop()
        self._stop_remote_workers()
        self._read_audit()
        if how != "stopped":
            self.problems.append(f"the daemon {how}")
        if survivors:
            self.problems.append(f"worker process(es) {survivors} outlived the daemon's SIGTERM")
        report = self._report(settings, startup_s, drain_s)
        if args.compare:
            report["compare"] = self._compare(offline_config)
            if report["compare"].get("equal") is False:
                report["passed"] = False
                report["problems"].append(f"store of {report['compare']['scan']} differs from `pipeline process`: "
                                          f"{report['compare']['difference']}")
        return report

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the daemon answers and all its local workers have joined."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            how = self.daemon.check_exit()
            if how is not None:
                tail = self.daemon.incarnations[-1].log.read_text()[-2000:]
                raise SoakError(f"the daemon {how} before it was ready: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
            status = self.daemon.status()
            if status is not None and len(status["dispatch"]["workers"]) >= self.args.workers + self.args.remote_workers:
                self.daemon.current.ready_at = time.time()
                self._ever_joined |= {w["pid"] for w in status["dispatch"]["workers"]}
                return
            time.sleep(0.3)
        raise SoakError(f"the daemon's {self.args.workers} worker(s) did not join within {timeout_s:g} s "
                        f"(see {self.daemon.incarnations[-1].log})")

    def _postfix(self) -> str:
        done = sum(self.audit.values())
        return (f"{len(self.scans)} scans, {done} frames done, {self.counts['daemon_restart']} restarts, "
                f"{self.counts['worker_kill']} worker kills, {self.counts['bad_file']} bad files, "
                f"{self.counts['hostile_sent']} hostile")

    def event(self, what: str, **detail: Any) -> None:
        self.events.append({"t": round(time.time() - self.t0, 2), "event": what, **detail})

    # -- every tick ----------------------------------------------------------------------------

    def _tick(self) -> None:
        how = self.daemon.check_exit()
        if how is not None:  # the daemon died and not by our hand: a bug; note it and carry on with a new one
            self.problems.append(f"daemon pid {self.daemon.incarnations[-1].pid} {how} (see {self.daemon.incarnations[-1].log})")
            self.event("daemon_died", how=how, pid=self.daemon.incarnations[-1].pid)
            self.daemon.start()
        self._supervise_remote_workers()
        self._read_audit()
        self._sample_rss()
        self._sample_status()
        current = self.daemon.current
        self.hostile_senders.service(current.pid if current is not None and self.daemon.alive() else None)

    def _read_audit(self) -> None:
        try:
            with self.audit_path.open("rb") as handle:
                handle.seek(self._audit_offset)
                data = handle.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._audit_offset += end + 1
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
                key = (Path(entry["scan"]).name, int(entry["frame"]))
            except (ValueError, KeyError, TypeError):
                self.audit_bad_lines += 1
                continue
            self.audit[key] += 1
            self.audit_pids.setdefault(key, []).append(entry.get("pid"))

    def _sample_rss(self) -> None:
        import psutil

        if time.monotonic() - self._last_rss_at < RSS_EVERY_S:
            return
        self._last_rss_at = time.monotonic()
        incarnation = self.daemon.current
        if incarnation is None or not self.daemon.alive():
            return
        try:
            rss = psutil.Process(incarnation.pid).memory_info().rss / MIB
        except psutil.Error:
            return
        incarnation.peak_rss_mib = max(incarnation.peak_rss_mib, rss)
        if incarnation.first_rss_mib is None and incarnation.ready_at is not None:
            incarnation.first_rss_mib = rss
        incarnation.last_rss_mib = rss
        for worker in self.daemon.workers() + self._remote_processes():
            try:
                worker_rss = worker.memory_info().rss / MIB
            except psutil.Error:
                continue
            incarnation.worker_pids.add(worker.pid)
            if worker_rss > self.worker_peak_rss_mib:
                self.worker_peak_rss_mib, self.worker_peak_pid = worker_rss, worker.pid

    def _sample_status(self, force: bool = False) -> dict[str, Any] | None:
        if not force and time.monotonic() - self._last_status_at < STATUS_EVERY_S:
            return self._last_status
        self._last_status_at = time.monotonic()
        status = self.daemon.status(timeout_s=2.0 if force else 1.0)
        incarnation = self.daemon.current
        if status is None or incarnation is None:
            return None
        self._last_status = status
        dispatch = status["dispatch"]
        incarnation.rejected = max(incarnation.rejected, int(dispatch["rejected"]))
        incarnation.received = max(incarnation.received, int(dispatch.get("received", 0)))
        incarnation.status_at = time.time()
        if incarnation.ready_at is None and len(dispatch["workers"]) >= self.args.workers:
            incarnation.ready_at = time.time()
        self._check_workers(status, incarnation)
        return status

    def _check_workers(self, status: dict[str, Any], incarnation: Incarnation) -> None:
        """Local workers alive but unknown to the dispatcher for long (dropped and never back), and a dispatcher whose
        workers all look silent for far longer than its own timeout (its thread is not running)."""
        dispatch = status["dispatch"]
        known = {w["pid"] for w in dispatch["workers"]}
        self._ever_joined |= known
        now = time.time()
        remote = {process.pid for process in self._remote_processes()}
        for process in self.daemon.workers() + self._remote_processes():
            if process.pid in remote and (incarnation.ready_at is None or now - incarnation.ready_at < 2 * SOAK_TIMEOUT_S):
                continue  # a remote worker gets its chance to join each new daemon
            if process.pid in known:
                self.zombie_workers.pop(process.pid, None)
                continue
            if process.pid in self._stalled_frozen:
                continue
            try:
                age = now - process.create_time()
            except Exception:
                continue
            if process.pid not in self._ever_joined and age < 120:  # still importing torch and loading models
                continue
            entry = self.zombie_workers.setdefault(process.pid, {"pid": process.pid, "daemon_pid": incarnation.pid,
                                                                 "first_seen_t": round(now - self.t0, 1), "reported": False,
                                                                 "remote": process.pid in remote})
            grace = 0 if process.pid in remote else 3 * SOAK_TIMEOUT_S  # a remote worker had its 2x timeout already
            if not entry["reported"] and now - self.t0 - entry["first_seen_t"] >= grace:
                entry["reported"] = True
                self.event("zombie_worker", pid=process.pid, daemon_pid=incarnation.pid)
        silent = [w["silent_s"] for w in dispatch["workers"]]
        if silent and min(silent) > 3 * SOAK_TIMEOUT_S and not any(s["daemon_pid"] == incarnation.pid for s in self.stalls):
            self.stalls.append({"daemon_pid": incarnation.pid, "t": round(now - self.t0, 1), "queued": dispatch["queued"],
                                "in_flight": dispatch["in_flight"], "workers_silent_s": silent,
                                "why": "every worker listed as silent for longer than 3x workers.timeout_s: "
                                       "the dispatcher thread is not running"})
            self.event("dispatcher_stuck", daemon_pid=incarnation.pid, silent_s=silent)

    # -- scans ---------------------------------------------------------------------------------

    def _status_of(self, store: Path) -> str | None:
        """A store's status; `complete` and `failed` are remembered (a daemon never reopens those)."""
        status = self._final.get(store)
        if status is None:
            status = _attrs(store).get("status")
            if status in ("complete", "failed"):
                self._final[store] = status
        return status

    def _unfinished_good(self) -> int:
        return sum(1 for scan in self.scans if self._status_of(scan.store) not in FINAL_STATUSES)

    def _feed_scans(self) -> None:
        from pipeline.simulator.writers import LAYOUTS, ScanPlan, ScanWriter

        now = time.time()
        self._reap_writers()
        writing = sum(1 for scan in self.scans if scan.written_at is None)
        if writing >= self.args.parallel or self._unfinished_good() >= self.args.parallel + 2:
            return  # back-pressure: the daemon is behind (or down); do not pile up a backlog
        number = len(self.scans)
        layout = LAYOUTS[number % len(LAYOUTS)] if number < len(LAYOUTS) else str(self.rng.choice(LAYOUTS))
        low, high = self.args.frames
        rate_low, rate_high = self.args.rate
        plan = ScanPlan(directory=self.watch, name=f"soak-{number:04d}-{layout}", layout=layout,
                        n_frames=int(self.rng.integers(low, high + 1)), rate_hz=float(self.rng.uniform(rate_low, rate_high)),
                        seed=int(self.rng.integers(0, 2**31)),
                        link_delay_s=float(self.rng.choice([0.0, 0.0, 0.5, 1.5])) if layout != "nexus" else 0.0)
        self.scans.append(GoodScan(plan, ScanWriter(plan).start(), now))

    def _drain(self, bar: Any) -> None:
        """Let every scan finish: writers first, then every store (good and bad) reaching its final status."""
        deadline = time.monotonic() + self.args.drain_timeout
        while time.monotonic() < deadline:
            self._tick()
            self._reap_writers()
            self.injector._thaw()
            pending = [s.store for s in self.scans if s.written_at is None or self._status_of(s.store) not in FINAL_STATUSES]
            pending += [b.store for b in self.bad_files if self._status_of(b.store) not in FINAL_STATUSES]
            bar.set_postfix_str(f"{len(pending)} scans still running; {self._postfix()}", refresh=True)
            if not pending:
                return
            time.sleep(TICK_S)
        unfinished = [s.plan.name for s in self.scans if _attrs(s.store).get("status") not in FINAL_STATUSES]
        unfinished += [b.path.stem for b in self.bad_files if _attrs(b.store).get("status") not in FINAL_STATUSES]
        self.problems.append(f"{len(unfinished)} scan(s) not finished {self.args.drain_timeout:g} s after the time was up: "
                             f"{', '.join(unfinished[:8])}")

    def _reap_writers(self) -> None:
        now = time.time()
        for scan in self.scans:
            if scan.written_at is None and not scan.writer.is_alive():
                scan.written_at = now
                try:
                    scan.writer.join(timeout=1)
                except RuntimeError as error:
                    scan.writer_error = str(error)
                    self.problems.append(f"simulator: {error}")

    # -- remote workers -------------------------------------------------------------------------

    def _start_remote_workers(self) -> None:
        for index in range(self.args.remote_workers):
            self.remote.append(self._spawn_remote(index))

    def _spawn_remote(self, index: int) -> subprocess.Popen:
        log = self.logs / f"remote-{index}-{int(time.time() * 1000)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "worker", "--connect", self.worker_endpoint, "--config", str(self.live_config),
                 "--name", f"remote-{index}", "--threads", "1"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.event("remote_worker_start", index=index, pid=process.pid)
        return process

    def _supervise_remote_workers(self) -> None:
        """A remote worker that exits is started again, as systemd would (it leaves when a daemon tells it to stop)."""
        for index, process in enumerate(getattr(self, "remote", [])):
            if process.poll() is not None:
                self.event("remote_worker_exit", index=index, pid=process.pid, code=process.returncode)
                self.remote[index] = self._spawn_remote(index)

    def _remote_processes(self) -> list[Any]:
        import psutil

        found = []
        for process in getattr(self, "remote", []):
            if process.poll() is None:
                try:
                    found.append(psutil.Process(process.pid))
                except psutil.Error:
                    pass
        return found

    def _stop_remote_workers(self) -> None:
        for process in getattr(self, "remote", []):
            if process.poll() is None:
                process.terminate()
        for process in getattr(self, "remote", []):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _cleanup(self) -> None:
        self.hostile_senders.close_all()
        for scan in self.scans:
            if scan.writer.is_alive():
                scan.writer.kill()
        daemon = getattr(self, "daemon", None)
        if daemon is not None and daemon.alive():
            for worker in daemon.workers():
                try:
                    worker.resume()  # a worker left frozen by an interrupted worker_stall
                except Exception:
                    pass
            daemon.kill()
        for process in getattr(self, "remote", []):
            if process.poll() is None:
                process.kill()
                process.wait()

    # -- the end ---------------------------------------------------------------------------------

    def _report(self, settings: dict[str, Any], startup_s: float, drain_s: float) -> dict[str, Any]:
        good = [s for s in self.scans if s.writer_error is None]
        scans: list[dict[str, Any]] = []
        lost_in_store = lost_in_audit = 0
        frames_written = frames_processed = 0
        lost_examples: list[str] = []
        incomplete: list[dict[str, Any]] = []
        for scan in good:
            n = scan.plan.n_frames
            frames_written += n
            attrs = _attrs(scan.store)
            done = self._done_flags(scan.store, n)
            audited = {frame for (name, frame) in self.audit if name == scan.plan.nxs_path.name}
            frames_processed += len(audited & set(range(n)))
            not_done = [i for i in range(n) if not done[i]]
            not_audited = [i for i in range(n) if done[i] and i not in audited]
            lost_in_store += len(not_done)
            lost_in_audit += len(not_audited)
            if not_done or not_audited:
                lost_examples.append(f"{scan.plan.name}: not done {not_done[:10]}, done without audit line {not_audited[:10]}")
            status = attrs.get("status")
            if status != "complete":
                incomplete.append({"scan": scan.plan.name, "status": status, "end_reason": attrs.get("end_reason")})
            scans.append({"scan": scan.plan.name, "layout": scan.plan.layout, "frames": n, "rate_hz": round(scan.plan.rate_hz, 1),
                          "status": status, "end_reason": attrs.get("end_reason"), "frames_done": int(sum(done)),
                          "resumed": "resumed_at" in attrs})
        doubled_keys = {key: count for key, count in self.audit.items() if count > 1}
        doubled = sum(count - 1 for count in doubled_keys.values())
        good_names = {s.plan.nxs_path.name for s in good}
        stray = sorted({name for (name, _) in self.audit if name not in good_names})
        bad: list[dict[str, Any]] = []
        bad_not_failed: list[str] = []
        for item in self.bad_files:
            attrs = _attrs(item.store)
            bad.append({"file": item.path.name, "kind": item.kind, "status": attrs.get("status"), "end_reason": attrs.get("end_reason")})
            if attrs.get("status") != "failed":
                bad_not_failed.append(f"{item.path.name} ({item.kind}): {attrs.get('status')}")
        failed_scans = [entry for entry in [*scans, *bad] if entry["status"] == "failed"]
        hostile_sent = self.counts["hostile_sent"]
        rejected = sum(i.rejected for i in self.daemon.incarnations)
        problems = list(self.problems)
        if bad_not_failed:
            problems.append(f"bad file(s) not failed: {', '.join(bad_not_failed[:8])}")
        if stray:
            problems.append(f"frames done for files that are not good scans: {', '.join(stray[:8])}")
        warnings = list(self.warnings)
        # defects that the soak's own restarts may have hidden: a daemon in production would not be restarted
        for entry in self.zombie_workers.values():
            if entry["reported"]:
                what = "remote worker" if entry.get("remote") else "worker"
                problems.append(f"{what} pid {entry['pid']} alive but unknown to the dispatcher of daemon {entry['daemon_pid']} "
                                f"(dropped or never admitted, and never rejoined) since t={entry['first_seen_t']} s")
        for stall in self.stalls:
            problems.append(f"daemon {stall['daemon_pid']} at t={stall['t']} s: {stall['why']} (it would have stalled for good)")
        for incarnation in self.daemon.incarnations:
            settled = incarnation.last_hostile_at is not None and incarnation.status_at - incarnation.last_hostile_at >= 10
            if settled and incarnation.rejected < incarnation.hostile_sent:
                problems.append(f"daemon {incarnation.pid} counted {incarnation.rejected} rejections for {incarnation.hostile_sent} "
                                f"hostile messages sent to it ({incarnation.received} messages of any kind read by its dispatcher)")
        lost = lost_in_store + lost_in_audit
        passed = lost == 0 and doubled == 0 and not incomplete and not problems
        incarnations = [{"number": i.number, "pid": i.pid, "how_ended": i.how_ended,
                         "lived_s": round((i.ended or time.time()) - i.started, 1), "rejected": i.rejected,
                         "received": i.received,
                         "hostile_sent": i.hostile_sent, "peak_rss_mib": round(i.peak_rss_mib, 1),
                         "rss_when_ready_mib": None if i.first_rss_mib is None else round(i.first_rss_mib, 1),
                         "rss_last_mib": None if i.last_rss_mib is None else round(i.last_rss_mib, 1),
                         "worker_pids": sorted(i.worker_pids), "log": str(i.log)} for i in self.daemon.incarnations]
        return {
            "passed": passed,
            "settings": {"seconds": self.duration_s, "seed": self.args.seed, "faults": list(self.args.faults),
                         "fault_every_s": self.args.fault_every, "hostile_mix": self.args.hostile_mix,
                         "frames": list(self.args.frames), "rate_hz": list(self.args.rate), "parallel": self.args.parallel,
                         "config": None if self.args.config is None else str(self.args.config), **settings},
            "startup_s": round(startup_s, 1), "drain_s": round(drain_s, 1),
            "scans_written": len(good), "frames_written": frames_written, "frames_processed": frames_processed,
            "lost": lost, "lost_not_done": lost_in_store, "lost_not_audited": lost_in_audit, "lost_examples": lost_examples[:10],
            "doubled": doubled,
            "doubled_examples": [{"scan": k[0], "frame": k[1], "times": c, "pids": self.audit_pids.get(k)}
                                 for k, c in list(doubled_keys.items())[:10]],
            "audit_lines": sum(self.audit.values()), "audit_unreadable_lines": self.audit_bad_lines,
            "good_not_complete": incomplete,
            "failed_scans": failed_scans, "bad_files": bad, "bad_files_injected": len(self.bad_files),
            "restarts_survived": self.counts["daemon_restart"], "worker_kills": self.counts["worker_kill"],
            "worker_stalls": self.counts["worker_stall"],
            "hostile_bursts": self.counts["hostile"], "hostile_sent": hostile_sent, "rejected": rejected,
            "scans_resumed": sum(1 for s in scans if s["resumed"]),
            "memory": {"daemon_peak_rss_mib": round(max((i.peak_rss_mib for i in self.daemon.incarnations), default=0.0), 1),
                       "worker_peak_rss_mib": round(self.worker_peak_rss_mib, 1), "worker_peak_pid": self.worker_peak_pid},
            "daemons": incarnations,
            "orphaned_workers": self.counts["orphaned_workers"],
            "problems": problems,
            "warnings": warnings,
            "scans": scans,
            "events": self.events,
        }

    @staticmethod
    def _done_flags(store: Path, n: int) -> list[bool]:
        from pipeline.store import open_live

        try:
            done = open_live(store)["frames/done"][:]
        except Exception:
            return [False] * n
        return [bool(i < done.shape[0] and done[i] == 1) for i in range(n)]

    def _compare(self, offline_config: Path) -> dict[str, Any]:
        """One good scan (preferably one resumed after a daemon kill) against `pipeline process` of the same file."""
        complete = [s for s in self.scans if s.writer_error is None and _attrs(s.store).get("status") == "complete"]
        if not complete:
            return {"scan": None, "equal": None, "difference": "no complete scan to compare"}
        resumed = [s for s in complete if "resumed_at" in _attrs(s.store)]
        scan = (resumed or complete)[0]
        out = self.root / "offline"
        command = [sys.executable, "-m", "pipeline", "process", "--config", str(offline_config), "--output-root", str(out),
                   "--workers", "1", "--no-progress", str(scan.plan.nxs_path)]
        started = time.time()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return {"scan": scan.plan.name, "equal": None, "difference": "`pipeline process` took over 600 s"}
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            return {"scan": scan.plan.name, "equal": None, "difference": f"`pipeline process` failed: {last}"}
        difference = stores_difference(scan.store, out / scan.store.name)
        return {"scan": scan.plan.name, "resumed": bool(resumed), "equal": difference is None, "difference": difference,
                "seconds": round(time.time() - started, 1)}


def stores_difference(live: Path, offline: Path) -> str | None:
    """None when two stores hold the same frames and tables; else the first difference, in words."""
    from pipeline.store import open_live

    a, b = open_live(live), open_live(offline)
    for name in ("tlm/labels", "ssl/clusters", "ssl/mask", "volume/labels", "frames/done", "frames/axis"):
        if a[name].shape != b[name].shape:
            return f"{name}: shape {a[name].shape} != {b[name].shape}"
        for index in range(a[name].shape[0]):
            if not np.array_equal(a[name][index], b[name][index], equal_nan=a[name].dtype.kind == "f"):
                return f"{name}: frame {index} differs"
    for table in ("peaks", "tlm/detections"):
        keys_a, keys_b = sorted(a[table].array_keys()), sorted(b[table].array_keys())
        if keys_a != keys_b:
            return f"{table}: columns {keys_a} != {keys_b}"
        for column in keys_a:
            x, y = a[table][column][:], b[table][column][:]
            if x.shape != y.shape or not np.allclose(x, y, rtol=1e-6, equal_nan=True):
                return f"{table}/{column} differs"
    return None


# --------------------------------------------------------------------------- faults


class FaultInjector:
    """Fires one fault at a time: the first round one of each kind, evenly spaced, then kinds and gaps at random.

    A fault whose moment is not right (no worker has joined yet, no finished scan to truncate, the
    daemon still starting) waits and is tried again a little later.
    """

    RETRY_S = 1.0

    def __init__(self, soak: Soak, kinds: list[str], every_s: float, rng: np.random.Generator) -> None:
        self.soak, self.kinds, self.every_s, self.rng = soak, kinds, every_s, rng
        order = [k for k in ("worker_kill", "hostile", "bad_file", "worker_stall", "daemon_restart") if k in kinds]
        self.first_round = order
        self.next_at = min(every_s, 3.0 + every_s / 2)
        self.pending: str | None = None
        self.bad_queue: list[str] = list(BAD_FILE_KINDS)  # each kind once, in this order, then shuffled rounds
        self.frozen: list[tuple[Any, float]] = []  # (process, resume at)

    def tick(self, elapsed: float) -> None:
        self._thaw()
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

    def _ready(self) -> dict[str, Any] | None:
        """The daemon's status once it is up with at least one worker, else None."""
        incarnation = self.soak.daemon.current
        if incarnation is None or incarnation.ready_at is None:
            self.soak._sample_status(force=True)
            incarnation = self.soak.daemon.current
            if incarnation is None or incarnation.ready_at is None:
                return None
        status = self.soak._sample_status(force=True)
        return status if status is not None and status["dispatch"]["workers"] else None

    def _worker_kill(self) -> bool:
        status = self._ready()
        if status is None:
            return False
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
        self.soak.event("worker_kill", pid=victim.pid, busy=victim.pid in busy, daemon_pid=self.soak.daemon.current.pid)
        return True

    def _worker_stall(self) -> bool:
        """SIGSTOP a worker for longer than workers.timeout_s, then SIGCONT: the dispatcher drops it meanwhile."""
        status = self._ready()
        if status is None or self.frozen:
            return False
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
        self.soak._stalled_frozen.add(victim.pid)
        self.soak.event("worker_stall", pid=victim.pid, seconds=hold, daemon_pid=self.soak.daemon.current.pid)
        return True

    def _thaw(self) -> None:
        for process, at in list(self.frozen):
            if time.monotonic() >= at:
                try:
                    process.resume()
                except Exception:
                    pass
                self.frozen.remove((process, at))
                # it may take a while to be heard of again; the zombie check starts after its grace period
                self.soak._stalled_frozen.discard(process.pid)
                self.soak.zombie_workers.pop(process.pid, None)

    def _daemon_restart(self) -> bool:
        if self._ready() is None:
            return False
        self.soak._sample_status(force=True)  # the rejected count of this daemon, as late as possible
        self._thaw_all()
        pid = self.soak.daemon.current.pid
        survivors = self.soak.daemon.kill()
        if survivors:
            self.soak.counts["orphaned_workers"] += len(survivors)
            self.soak.problems.append(f"worker process(es) {survivors} outlived daemon {pid} (kill -9) by {WORKERS_EXIT_S:g} s")
        self.soak.event("daemon_kill", pid=pid, orphaned_workers=survivors)
        incarnation = self.soak.daemon.start()
        self.soak.event("daemon_start", pid=incarnation.pid)
        return True

    def _thaw_all(self) -> None:
        for process, _ in self.frozen:
            try:
                process.resume()
            except Exception:
                pass
            self.soak._stalled_frozen.discard(process.pid)
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
        else:
            source = finished[int(self.rng.integers(0, len(finished)))].plan.nxs_path
            data = source.read_bytes()
            cut = int(len(data) * float(self.rng.uniform(0.3, 0.8)))
            _appear(path, lambda p: p.write_bytes(data[:cut]))
            detail = f"first {cut} of {len(data)} bytes of {source.name}"
        self.soak.bad_files.append(BadFile(path, kind, detail, time.time()))
        self.soak.event("bad_file", file=path.name, kind=kind, detail=detail)
        return True

    def _hostile(self) -> bool:
        import zmq

        status = self._ready()
        if status is None:
            return False
        endpoint = status["dispatch"]["endpoint"]
        count = int(self.rng.integers(50, 400))
        messages = hostile_messages(self.rng, count, self.soak.args.hostile_mix)
        sock = zmq.Context.instance().socket(zmq.DEALER)
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


# --------------------------------------------------------------------------- the printout


def format_report(report: dict[str, Any]) -> str:
    settings = report["settings"]
    memory = report["memory"]
    lines = [
        f"soak: {settings['seconds'] / 60:.1f} min, seed {settings['seed']}, {settings['workers']} workers on {settings['device']}, "
        f"faults {','.join(settings['faults']) or 'none'} about every {settings['fault_every_s']:g} s, "
        f"hostile mix {settings['hostile_mix']}",
        f"weights: tlm {settings['weights']['tlm']}, sslm {settings['weights']['sslm']}",
        f"daemon ready after {report['startup_s']:.0f} s; last scans finished {report['drain_s']:.0f} s after the time was up",
        "",
        f"scans written (good)         {report['scans_written']:>8}   ({report['scans_resumed']} resumed after a daemon kill)",
        f"frames written               {report['frames_written']:>8}",
        f"frames processed             {report['frames_processed']:>8}   (distinct in the audit log)",
        f"lost                         {report['lost']:>8}   ({report['lost_not_done']} not done in the store, "
        f"{report['lost_not_audited']} done without an audit line)",
        f"doubled                      {report['doubled']:>8}",
        f"good scans not complete      {len(report['good_not_complete']):>8}",
        f"failed scans                 {len(report['failed_scans']):>8}   (bad files injected: {report['bad_files_injected']})",
        f"daemon restarts survived     {report['restarts_survived']:>8}",
        f"worker kills                 {report['worker_kills']:>8}",
    ]
    if report["worker_stalls"]:
        lines.append(f"worker stalls (SIGSTOP)      {report['worker_stalls']:>8}")
    lines += [
        f"hostile messages sent        {report['hostile_sent']:>8}   in {report['hostile_bursts']} bursts",
        f"rejected by the daemons      {report['rejected']:>8}   (" + ", ".join(
            f"pid {d['pid']}: {d['rejected']} of {d['hostile_sent']} sent" for d in report["daemons"] if d["hostile_sent"] or d["rejected"]) + ")",
        f"peak RSS daemon              {memory['daemon_peak_rss_mib']:>8.0f} MiB",
        f"peak RSS worker              {memory['worker_peak_rss_mib']:>8.0f} MiB",
    ]
    for entry in report["failed_scans"]:
        lines.append(f"  failed: {entry.get('file') or entry.get('scan')}: {entry['end_reason']}")
    for entry in report["good_not_complete"]:
        lines.append(f"  NOT COMPLETE: {entry['scan']}: {entry['status']} ({entry['end_reason']})")
    for example in report["lost_examples"]:
        lines.append(f"  LOST: {example}")
    for example in report["doubled_examples"]:
        lines.append(f"  DOUBLED: {example['scan']} frame {example['frame']} done {example['times']} times (pids {example['pids']})")
    lines.append("daemon processes (pid: how it ended, lifetime, RSS when ready -> at the end, peak):")
    for d in report["daemons"]:
        ready = "-" if d["rss_when_ready_mib"] is None else f"{d['rss_when_ready_mib']:.0f}"
        last = "-" if d["rss_last_mib"] is None else f"{d['rss_last_mib']:.0f}"
        lines.append(f"  {d['pid']}: {d['how_ended']}, {d['lived_s']:.0f} s, {ready} -> {last} MiB, peak {d['peak_rss_mib']:.0f} MiB")
    compare = report.get("compare")
    if compare:
        if compare.get("equal"):
            lines.append(f"store of {compare['scan']}{' (resumed)' if compare.get('resumed') else ''} equals `pipeline process` "
                         f"of the same file, frame by frame")
        else:
            lines.append(f"compare with `pipeline process`: {compare.get('scan')}: {compare.get('difference')}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    for warning in report.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    if report.get("outputs"):
        lines.append(f"outputs kept in {report['outputs']}")
    lines.append("PASSED: nothing lost or doubled; every good scan complete, every bad file failed" if report["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.tools.soak ...` works without the rest of the CLI."""
    return run_standalone("soak", add_parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
