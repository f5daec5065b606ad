"""`pipeline` command line: one sub-command per job, each with --help; errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline import __version__
from pipeline.common.argtypes import non_negative_int, one_line_errors, positive_float, positive_int, zmq_endpoint
from pipeline.common.file_names import name_problem
from pipeline.common.stop_signals import StopSignals
from pipeline.config import Config, DaemonSettings, load_config
from pipeline.errors import PipelineError, UserError, report

if TYPE_CHECKING:
    from pipeline.live.daemon import Daemon
    from pipeline.live.session import SessionState
    from pipeline.models.prediction import FramePredictor

log = logging.getLogger("pipeline")


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (default: the packaged pipeline.yaml defaults)")
    parser.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="overrides daemon.log_level")


def _config_from(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    config = load_config(args.config)
    wanted = {key: value for key, value in (overrides or {}).items() if value is not None}
    if getattr(args, "log_level", None):
        wanted["daemon.log_level"] = args.log_level
    return config.with_overrides(wanted) if wanted else config


def _setup_logging(config: Config) -> None:
    from pipeline.logs import setup_logging

    setup_logging(config.daemon.log_level, config.daemon.log_file)


# -- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    config = _config_from(args, {
        "watch.dirs": [str(Path(d).resolve()) for d in args.watch] if args.watch else None,
        "output.root": str(Path(args.output_root).resolve()) if args.output_root else None,
        "workers.local": args.workers,
        "workers.device": args.device,
        "daemon.control": args.control,
    })
    if not config.watch.dirs:
        raise UserError("nothing to watch: give --watch DIR or set watch.dirs in the config")
    _check_watched_directories(config)
    _check_output_root(config, "--output-root" if args.output_root else "output.root")

    from pipeline.live.daemon import Daemon

    _setup_logging(config)
    signals = StopSignals().install()
    web = None
    if config.web.port is not None:  # bound before the daemon starts: a taken port stops the start
        from pipeline.web.server import serve_beside_daemon

        web = serve_beside_daemon(config)
    daemon = Daemon(config).start()
    log.info("watching %s; workers connect to %s; `pipeline status` asks at %s", ", ".join(map(str, config.watch.dirs)),
             daemon.dispatcher.endpoint, config.daemon.control)
    if web is not None:
        web.start(daemon.status)
        log.info("live web view at %s", web.url)
    signals.wait()
    if web is not None:
        web.stop()
    daemon.shutdown(drain=True, hurry=signals.hurry)
    return signals.exit_code if signals.hurry.is_set() else 0  # a drained stop is the daemon's normal end


def _check_watched_directories(config: Config) -> None:
    """A watched path that can never be a directory (a regular file, a path through one) is a mistake: refused at start.
    One that does not exist yet is not: a visit's directory is often made after the daemon starts (`pipeline status` and
    the web front page say it is missing until then)."""
    from pipeline.live.watch import MISSING, directory_problem

    for directory in config.watch.dirs:
        problem = directory_problem(directory)
        if problem is not None and problem != MISSING:
            raise UserError(f"watched directory {directory}: {problem}")


def _check_output_root(config: Config, name: str) -> None:
    """Stores must be writable under output.root: said once at start (exit 2), not once per scan in the log."""
    root = config.output.root
    if root is None:
        return
    problem = output_root_problem(root)
    if problem is not None:
        raise UserError(f"{name} {root}: {problem}")


def output_root_problem(root: Path) -> str | None:
    """Why no store can be written under `root`, or None: tried for real (a file made and removed in it, or, while it
    does not exist, a folder made and removed in its nearest existing parent, where the daemon would make it)."""
    import tempfile

    existing = root
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            return f"{existing} is a link to nothing"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a regular file, not a directory" if existing.is_file() else f"{existing} is not a directory"
    try:
        if existing == root:
            with tempfile.TemporaryFile(dir=root, prefix=".pipeline-probe-"):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".pipeline-probe-"))
    except OSError as error:
        return f"cannot write in {existing} ({error.strerror})"
    return None


# -- worker ----------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, wrap_predictor: Callable[[FramePredictor], FramePredictor] | None = None) -> NoReturn:
    from pipeline.live.worker import run_worker

    config = _config_from(args)
    _setup_logging(config)
    if args.parent:
        _exit_with_parent(args.parent)
    signal.signal(signal.SIGTERM, _interrupt)
    code = run_worker(args.connect, config, device=args.device or config.workers.device, name=args.name, threads=args.threads,
                      wrap_predictor=wrap_predictor, leave_after_s=args.leave_after)
    _end_worker_now(code)


# how long a stopped worker waits for ZeroMQ to deliver what it still owes the daemon (its last results, its goodbye);
# the sockets' linger (2 s) bounds it as well
WORKER_DELIVERY_S = 3.0


def _end_worker_now(code: int) -> NoReturn:
    """End a worker without the interpreter's teardown of its modules: with torch and torchvision loaded that takes ~0.9 s
    (thousands of modules; `python -c "import torch, torchvision"` exits 0.9 s after its last line), and a daemon that
    stops, `pipeline process` at its end included, waits that long for its workers. The worker holds no file open for
    writing; what it must not lose is flushed first: the logs, and the messages still queued in ZeroMQ's sockets."""
    import zmq

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    delivered = threading.Thread(target=zmq.Context.instance().term, name="deliver", daemon=True)  # waits for the sockets' queues
    delivered.start()
    delivered.join(timeout=WORKER_DELIVERY_S)  # a socket left open (its thread stuck) would hold `term` for ever
    os._exit(code)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # the worker's loop finishes its batch and says bye


def _exit_with_parent(parent: int) -> None:
    """A local worker must not outlive the daemon that started it."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# -- process ---------------------------------------------------------------------------------


def cmd_process(args: argparse.Namespace) -> int:
    import shutil

    from pipeline.live.daemon import Daemon
    from pipeline.store import schema, store_path_for, store_status

    scans = [Path(p).resolve() for p in args.scans]
    for scan in scans:
        _check_scan_file(scan)
    config = _config_from(args, {
        "output.root": str(Path(args.output_root).resolve()) if args.output_root else None,
        "workers.local": args.workers,
        "workers.device": args.device,
        "follow.idle_timeout_s": args.idle_timeout,
    })
    _check_output_root(config, "--output-root" if args.output_root else "output.root")
    _setup_logging(config)
    signals = StopSignals().install()
    daemon = Daemon(config, watch=False, control=False).start()
    drain = True
    try:
        for scan in scans:
            store = store_path_for(scan, config.output.root, config.watch.dirs)
            if args.force and store.exists():
                shutil.rmtree(store)
            daemon.add_scan(scan)
        _wait_with_progress(daemon, disable=args.no_progress, stop=signals.requested)
    except PipelineError:
        drain = False  # no worker can run: nothing in flight would ever arrive
        raise
    finally:
        daemon.shutdown(drain=drain, timeout=60.0 if drain else 5.0, hurry=signals.hurry)
    worst, complete, not_done = 0, 0, 0
    sessions = {str(session.store_path): session.state for session in list(daemon.sessions.values())}
    for scan in scans:
        store = store_path_for(scan, config.output.root, config.watch.dirs)
        status = store_status(store, follow_symlinks=False)  # a planted link's target is not this scan's store
        if status is not None:
            print(f"{scan.name}: {status}{_why_said(scan, store, status, sessions.get(str(store)))} -> {store}")
        else:  # no store could be made or read: what the scan's session said, not a status the store does not hold
            state = sessions.get(str(store))
            reason = state.reason.removeprefix(f"{scan}: ") if state is not None else ""
            said = "not started" if state is None else f"{state.status} ({reason})" if reason else state.status
            print(f"{scan.name}: {said}; no store at {store}")
        worst = max(worst, 0 if status == schema.STATUS_COMPLETE else 1)
        complete += status == schema.STATUS_COMPLETE
        not_done += _frames_not_done(store)
    if signals.signal_name is not None:
        left = ("; the same command again resumes them" if complete < len(scans) or not_done
                else ": nothing was left to do (the stop came as the last frames were written)")
        print(f"stopped by {signals.signal_name}: {complete} of {len(scans)} scan(s) complete, {not_done} frame(s) not done{left}",
              file=sys.stderr)
        return signals.exit_code
    return worst


def _check_scan_file(scan: Path) -> None:
    """A scan file `process` can read, or one line saying what the path is instead (a folder of scans, a store)."""
    unusable = name_problem(scan)
    if unusable is not None:
        raise UserError(unusable)
    if scan.is_file():
        return
    if (scan / "zarr.json").is_file():
        raise UserError(f"{scan}: a store, not a scan file; give the scan file it was made from (its source_file attribute)")
    if scan.is_dir():
        raise UserError(f"{scan}: a folder, not a scan file; give the scan files in it, e.g. {scan}/*.nxs")
    raise UserError(f"{scan}: {'not a regular file' if scan.exists() else 'no such scan file'}")


def _why_said(scan: Path, store: Path, status: str, state: SessionState | None) -> str:
    """` (why)` after a store's status in the summary: what ended a store that is not complete (also one this run kept,
    whose reason was only in an earlier run's log), and that a complete one was kept."""
    from pipeline.store import schema
    from pipeline.store.reader import read_attributes

    kept = state is None or state.reason == "already processed"  # None: the daemon saw the store final for this very file
    if status == schema.STATUS_COMPLETE:
        return " (already complete: kept; --force rebuilds it)" if kept else ""
    reason = str((read_attributes(store, follow_symlinks=False) or {}).get(schema.Attr.END_REASON) or "")
    reason = " ".join(reason.removeprefix(f"{scan}: ").split())
    if kept:
        return f" (kept from an earlier run{': ' + reason if reason else ''}; --force tries again)"
    return f" ({reason})" if reason else ""


def _frames_not_done(store: Path) -> int:
    """Frames the scan announced (else the store has room for) and that are not done; 0 for a store that is not there or
    cannot be read."""
    from pipeline.store import StoreError, StoreReader
    from pipeline.store.schema import Attr

    try:
        reader = StoreReader(store)
        return max(0, int(reader.attrs.get(Attr.FRAMES_EXPECTED) or reader.frames_total) - int(reader.done_frames().size))
    except (StoreError, OSError, ValueError, TypeError):
        return 0


def _wait_with_progress(daemon: Daemon, disable: bool, stop: threading.Event) -> None:
    """A progress bar of frames done over frames read, across the scans being processed, until done or `stop`."""
    from tqdm import tqdm

    with tqdm(desc="process", unit="frame", disable=disable or None, leave=False) as bar:
        while not daemon.wait_idle(timeout=0.5) and not stop.is_set():
            unable = daemon.local_workers.unable
            if unable is not None and not daemon.dispatcher.stats()["workers"]:
                raise PipelineError(unable)  # nothing would ever process the frames
            scans = daemon.status()["scans"]
            bar.total = sum(s["frames_read"] for s in scans) or None
            bar.n = sum(s["frames_done"] for s in scans)
            bar.refresh()


# -- status ----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.live.control import expand, query_status

    config = _config_from(args)
    endpoint, source = control_endpoint(args.endpoint, config, args.config)
    status = query_status(endpoint)
    if status is None:
        print(f"no daemon answers at {expand(endpoint)} ({source}); is `pipeline run` running with this config? "
              "(--endpoint or --config names another daemon)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    dispatch = status["dispatch"]
    print(f"daemon pid {status['pid']}, up {status['uptime_s']:.0f} s, workers at {dispatch['endpoint']}")
    for problem in status.get("problems") or []:  # what needs a person first: a watched directory that is not there
        print(f"problem: {' '.join(str(problem).split())}")
    print(f"queue: {dispatch['queued']} waiting, {dispatch['in_flight']} in flight; {dispatch['results']} results, "
          f"{dispatch['rejected']} rejected, {dispatch['redispatched']} re-dispatched")
    for worker in dispatch["workers"]:
        print(f"  worker {worker['name']} on {worker['device']}: {worker['frames_done']} frames, {worker['in_flight']} in flight")
    slurm = status.get("slurm_workers")
    if slurm:
        print(f"SLURM worker jobs {slurm['name']}: {len(slurm['jobs'])} of at most {slurm['max_jobs']} ({slurm['wanted']} wanted), "
              f"logs {slurm['logs']}")
        for job in slurm["jobs"]:
            where = f" on {job['node']}" if job.get("node") else ""
            reason = f" ({job['reason']})" if job.get("reason") else ""
            print(f"  slurm job {job['job_id']}: {job['state']}{reason}{where}")
        if slurm.get("unable"):
            print(f"  cannot submit: {slurm['unable']}")
    for scan in status["scans"]:
        reason = f" ({scan['reason']})" if scan["reason"] else ""
        progress = f", {scan['frames_done']}/{scan['frames_read']} frames done, {scan['fps']} frames/s" if scan["frames_read"] else ""
        print(f"  {scan['scan']}: {scan['status']}{reason}{progress}")
    return 0


def control_endpoint(option: str | None, config: Config, config_file: Path | None) -> tuple[str, str]:
    """The control endpoint `pipeline status` asks, and where it came from, in words (said when nothing answers)."""
    if option:
        return option, "from --endpoint"
    if config.daemon.control != DaemonSettings().control:
        return config.daemon.control, f"daemon.control in {config_file}"
    where = f", not set in {config_file}" if config_file is not None else ""
    return config.daemon.control, f"the default daemon.control{where}"


# -- keys ------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from pipeline.live.security import generate_keys

    if not args.name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"key name {args.name!r}: use letters, digits, '-' and '_' only")
    public, secret = generate_keys(args.out, args.name, replace=args.force)
    print(f"public key (share; put workers' keys in the daemon's workers.authorized_keys directory): {public}")
    print(f"secret key (keep private; set as workers.curve_secret_key): {secret}")
    return 0


# -- the parser ------------------------------------------------------------------------------

# Sub-commands whose parsers live beside their code: (name, module, the module's function that adds its parsers, the
# one-line help of `pipeline --help`). Those modules import numpy, scipy, matplotlib, h5py and torch (seconds on a busy
# machine), so only the chosen command's module is imported; the others are listed by their help line alone
# (tests/test_cli_startup.py checks these lines against the modules' own). A module's commands stay together, in its order.
OTHER_COMMANDS: list[tuple[str, str, str, str]] = [
    ("simulate", "pipeline.simulator.writers", "add_parser", "write simulated scans live, with ground truth (a beamline stand-in)"),
    ("demo", "pipeline.tools.demo", "add_parser", "simulated scans written live and processed live, with a summary"),
    ("train", "pipeline.models.commands", "add_parsers",
     "train a model on synthetic frames, or fine-tune it on labelled frames (--labels)"),
    ("evaluate", "pipeline.models.commands", "add_parsers", "evaluate the models on a held-out synthetic set"),
    ("labels", "pipeline.models.labels", "add_parser",
     "labelled frames in DiPID's format (a Zooniverse export): export a store's masks, check a CSV"),
    ("bench", "pipeline.tools.bench", "add_parser", "measure throughput, latency, stage times and memory against DiPID's way"),
    ("soak", "pipeline.tools.soak", "add_parser",
     "run the real daemon for minutes under simulated scans and random faults; count lost and doubled frames"),
    ("show", "pipeline.pictures.view", "add_parsers", "one frame of a scan with its masks and boxes drawn over it, as a PNG"),
    ("view", "pipeline.pictures.view", "add_parsers", "open a scan's frames and masks in napari (or draw the 3D peaks without it)"),
    ("quicklook", "pipeline.pictures.view", "add_parsers", "(re)make a scan's quick-look PNG: peak projection and rocking curves"),
    ("web", "pipeline.web.server", "add_parser",
     "a live web view of every scan's store: progress, frames with their masks, peaks, rocking curves"),
    ("zocalo-service", "pipeline.cluster.zocalo_service", "add_parser",
     "a Zocalo service: recipe steps ask the running daemon to follow a scan now, and get its store once finished"),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that sub-command's module is imported (the others are listed
    by their help line), so `pipeline --version`, `status` and `run --help` start without torch."""
    parser = argparse.ArgumentParser(prog="pipeline", description="Live peak segmentation for beamline scans: `pipeline run` "
                                     "watches directories and segments every frame of each new scan as it is written; "
                                     "`pipeline COMMAND --help` explains each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="the daemon: watch directories, process every new scan live",
                         description="Watch directories for scan files, follow each one while it is written and segment "
                                     "every frame with the TLM and SSLM, writing <scan>.zarr beside it (or under "
                                     "--output-root). Stops on Ctrl-C or SIGTERM after the frames in flight are written; "
                                     "a restarted daemon resumes unfinished scans. `pipeline status` asks it what it is doing.")
    _add_config_argument(run)
    run.add_argument("--watch", action="append", metavar="DIR",
                     help="directory to watch, and everything below it (repeatable; overrides watch.dirs). One that does "
                          "not exist yet is picked up when it is created; a regular file is refused")
    run.add_argument("--output-root", metavar="DIR", help="write stores under DIR, mirroring the watched tree, instead of beside "
                                                          "each scan (overrides output.root); it must be writable")
    run.add_argument("--workers", type=non_negative_int, metavar="N", help="local worker processes to start (overrides workers.local; "
                                                                           "0: only workers that join with `pipeline worker`)")
    run.add_argument("--device", metavar="DEV", help="where local workers run the models: auto | cpu | cuda | cuda:N (overrides workers.device)")
    run.add_argument("--control", type=zmq_endpoint, metavar="ENDPOINT",
                     help="where `pipeline status` reaches this daemon (overrides daemon.control, default "
                          f"{DaemonSettings().control}); give each daemon on one account its own, e.g. ipc://~/.pipeline/i16")
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="a worker that joins a daemon (locally or from another host)",
                            description="Run the models for a daemon: connect to its worker endpoint (workers.bind on the "
                                        "daemon's host), take frames, send back masks. The daemon starts workers.local of these "
                                        "itself; start more by hand, e.g. on a GPU host.")
    _add_config_argument(worker)
    worker.add_argument("--connect", type=zmq_endpoint, required=True, metavar="ENDPOINT", help="the daemon's worker endpoint, e.g. tcp://host:5555")
    worker.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N (default: workers.device)")
    worker.add_argument("--threads", type=non_negative_int, default=0, metavar="N", help="torch CPU threads (0: torch's default)")
    worker.add_argument("--name", help="name shown in `pipeline status`")
    worker.add_argument("--leave-after", type=positive_float, metavar="S",
                        help="end (exit code 3) when no daemon has been reachable for S seconds: what a batch job's worker "
                             "wants, so that a daemon killed or down frees its node (default: wait for the daemon for ever)")
    worker.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    process = sub.add_parser("process", help="run existing scan files through the same path as the daemon",
                             description="Process finished (or still growing) scan files through the daemon's own path, with "
                                         "local workers, then print each scan's status and store. Exit 0 when every store is "
                                         "complete. A store already complete or failed for this very file is kept (and said so) unless --force.")
    _add_config_argument(process)
    process.add_argument("scans", nargs="+", metavar="SCAN.nxs", help="the scan files")
    process.add_argument("--output-root", metavar="DIR", help="write stores under DIR instead of beside each scan "
                                                              "(overrides output.root); it must be writable")
    process.add_argument("--workers", type=positive_int, metavar="N", help="local worker processes (overrides workers.local)")
    process.add_argument("--device", metavar="DEV", help="where the workers run the models: auto | cpu | cuda | cuda:N "
                                                         "(overrides workers.device)")
    process.add_argument("--idle-timeout", type=positive_float, default=5.0, metavar="S",
                         help="a file with no end marker is taken as ended after this long without a new frame (default 5)")
    process.add_argument("--force", action="store_true", help="rebuild a store that is already complete or failed")
    process.add_argument("--no-progress", action="store_true", help="no progress bar")
    process.set_defaults(func=cmd_process)

    status = sub.add_parser("status", help="what a running daemon is doing",
                            description="Ask a running `pipeline run` for its workers, queue, scans and problems. It asks at "
                                        "--endpoint, else daemon.control of --config, else the default; exit 1 when nothing answers.")
    _add_config_argument(status)
    status.add_argument("--endpoint", type=zmq_endpoint, metavar="ENDPOINT", help="the daemon's control endpoint (overrides daemon.control)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    keys = sub.add_parser("keys", help="CurveZMQ key pairs for authenticating workers",
                          description="Make CurveZMQ key pairs: the daemon's and each remote worker's (see workers.curve_secret_key).")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    generate = keys_sub.add_parser("generate", help="make a key pair: NAME.key (public) and NAME.key_secret",
                                   description="Write NAME.key (public: share it) and NAME.key_secret (private, mode 0600).")
    generate.add_argument("name", help="e.g. daemon, or the worker's host name")
    generate.add_argument("--out", type=Path, default=Path("keys"), help="directory for the key files (default ./keys)")
    generate.add_argument("--force", action="store_true", help="replace a pair of that name already there (workers and daemons "
                                                                "that hold it are refused from their next start)")
    generate.set_defaults(func=cmd_keys)

    chosen = next((module for name, module, _, _ in OTHER_COMMANDS if name == command), None)
    added: set[str] = set()
    for name, module, adder, help_line in OTHER_COMMANDS:
        if module not in added and (command is None or module == chosen):
            getattr(importlib.import_module(module), adder)(sub)
            added.add(module)
        if name not in sub.choices:
            sub.add_parser(name, help=help_line)
    return one_line_errors(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), ""))  # the top level has no option with a value
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PipelineError as error:  # a bad config, argument, scan, weights file or store: one line, never a traceback
        report(args.command, error)
        return error.exit_code
    except (PermissionError, FileNotFoundError) as error:
        report(args.command, error)
        return 1
    except KeyboardInterrupt:
        return 130
