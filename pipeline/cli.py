"""`pipeline` command line: one sub-command per job, each with --help; errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.argtypes import one_line_errors
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError, UserError, report
from pipeline.stop_signals import StopSignals

if TYPE_CHECKING:
    from pipeline.live.daemon import Daemon
    from pipeline.models.prediction import FramePredictor

log = logging.getLogger("pipeline")


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (default: the packaged pipeline.yaml defaults)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="overrides daemon.log_level")


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
    from pipeline.live.daemon import Daemon

    config = _config_from(args, {
        "watch.dirs": [str(Path(d).resolve()) for d in args.watch] if args.watch else None,
        "output.root": str(Path(args.output_root).resolve()) if args.output_root else None,
        "workers.local": args.workers,
        "workers.device": args.device,
    })
    if not config.watch.dirs:
        raise UserError("nothing to watch: give --watch DIR or set watch.dirs in the config")
    _setup_logging(config)
    signals = StopSignals().install()
    web = None
    if config.web.port is not None:  # bound before the daemon starts: a taken port stops the start
        from pipeline.web.server import serve_beside_daemon

        web = serve_beside_daemon(config)
    daemon = Daemon(config).start()
    log.info("watching %s; workers connect to %s; status at %s", ", ".join(map(str, config.watch.dirs)), daemon.dispatcher.endpoint,
             config.daemon.control)
    if web is not None:
        web.start(daemon.status)
        log.info("live web view at %s", web.url)
    signals.requested.wait()
    if web is not None:
        web.stop()
    daemon.shutdown(drain=True, hurry=signals.hurry)
    return signals.exit_code if signals.hurry.is_set() else 0  # a drained stop is the daemon's normal end


# -- worker ----------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, wrap_predictor: Callable[[FramePredictor], FramePredictor] | None = None) -> int:
    from pipeline.live.worker import run_worker

    config = _config_from(args)
    _setup_logging(config)
    if args.parent:
        _exit_with_parent(args.parent)
    signal.signal(signal.SIGTERM, _interrupt)
    return run_worker(args.connect, config, device=args.device or config.workers.device, name=args.name, threads=args.threads,
                      wrap_predictor=wrap_predictor)


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
        if not scan.is_file():
            raise UserError(f"{scan}: no such scan file")
    config = _config_from(args, {
        "output.root": str(Path(args.output_root).resolve()) if args.output_root else None,
        "workers.local": args.workers,
        "workers.device": args.device,
        "follow.idle_timeout_s": args.idle_timeout,
    })
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
    for scan in scans:
        store = store_path_for(scan, config.output.root, config.watch.dirs)
        status = store_status(store, follow_symlinks=False)  # a planted link's target is not this scan's store
        print(f"{scan.name}: {status} -> {store}")
        worst = max(worst, 0 if status == schema.STATUS_COMPLETE else 1)
        complete += status == schema.STATUS_COMPLETE
        not_done += _frames_not_done(store)
    if signals.signal_name is not None:
        print(f"stopped by {signals.signal_name}: {complete} of {len(scans)} scan(s) complete, {not_done} frame(s) not done; "
              "the same command again resumes them", file=sys.stderr)
        return signals.exit_code
    return worst


def _frames_not_done(store: Path) -> int:
    """Frames the store has room for and has not done (0 for a store that is not there or cannot be read)."""
    from pipeline.store import StoreError, StoreReader

    try:
        reader = StoreReader(store)
        return max(0, int(reader.attrs.get("frames_expected") or reader.frames_total) - int(reader.done_frames().size))
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
    from pipeline.live.control import query_status

    config = _config_from(args)
    endpoint = args.endpoint or config.daemon.control
    status = query_status(endpoint)
    if status is None:
        print(f"no daemon answers at {endpoint} (is `pipeline run` running with this config?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    dispatch = status["dispatch"]
    print(f"daemon pid {status['pid']}, up {status['uptime_s']:.0f} s, workers at {dispatch['endpoint']}")
    print(f"queue: {dispatch['queued']} waiting, {dispatch['in_flight']} in flight; {dispatch['results']} results, "
          f"{dispatch['rejected']} rejected, {dispatch['redispatched']} re-dispatched")
    for worker in dispatch["workers"]:
        print(f"  worker {worker['name']} on {worker['device']}: {worker['frames_done']} frames, {worker['in_flight']} in flight")
    for scan in status["scans"]:
        reason = f" ({scan['reason']})" if scan["reason"] else ""
        print(f"  {scan['scan']}: {scan['status']}{reason}, {scan['frames_done']}/{scan['frames_read']} frames done, {scan['fps']} frames/s")
    return 0


# -- keys ------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from pipeline.live.security import generate_keys

    if not args.name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"key name {args.name!r}: use letters, digits, '-' and '_' only")
    public, secret = generate_keys(args.out, args.name)
    print(f"public key (share; put workers' keys in the daemon's workers.authorized_keys directory): {public}")
    print(f"secret key (keep private; set as workers.curve_secret_key): {secret}")
    return 0


# -- the parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Live peak segmentation for beamline scans.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="the daemon: watch directories, process every new scan live")
    _add_config_argument(run)
    run.add_argument("--watch", action="append", metavar="DIR", help="directory to watch (repeatable; overrides watch.dirs)")
    run.add_argument("--output-root", metavar="DIR", help="write stores here instead of beside each scan")
    run.add_argument("--workers", type=int, metavar="N", help="local worker processes (overrides workers.local)")
    run.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N (overrides workers.device)")
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="a worker that joins a daemon (locally or from another host)")
    _add_config_argument(worker)
    worker.add_argument("--connect", required=True, metavar="ENDPOINT", help="the daemon's worker endpoint, e.g. tcp://host:5555")
    worker.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N")
    worker.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    worker.add_argument("--name", help="name shown in `pipeline status`")
    worker.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    process = sub.add_parser("process", help="run existing scan files through the same path as the daemon")
    _add_config_argument(process)
    process.add_argument("scans", nargs="+", metavar="SCAN.nxs")
    process.add_argument("--output-root", metavar="DIR")
    process.add_argument("--workers", type=int, metavar="N")
    process.add_argument("--device", metavar="DEV")
    process.add_argument("--idle-timeout", type=float, default=5.0, metavar="S",
                         help="a file with no end marker is taken as ended after this long without a new frame (default 5)")
    process.add_argument("--force", action="store_true", help="rebuild a store that is already complete")
    process.add_argument("--no-progress", action="store_true", help="no progress bar")
    process.set_defaults(func=cmd_process)

    status = sub.add_parser("status", help="what a running daemon is doing")
    _add_config_argument(status)
    status.add_argument("--endpoint", help="the daemon's control endpoint (default: daemon.control)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    keys = sub.add_parser("keys", help="CurveZMQ key pairs for authenticating workers")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    generate = keys_sub.add_parser("generate", help="make a key pair: NAME.key (public) and NAME.key_secret")
    generate.add_argument("name", help="e.g. daemon, or the worker's host name")
    generate.add_argument("--out", type=Path, default=Path("keys"), help="directory for the key files (default ./keys)")
    generate.set_defaults(func=cmd_keys)

    from pipeline.models import commands as model_commands
    from pipeline.models import labels as label_commands
    from pipeline.pictures import view
    from pipeline.simulator import writers as simulate
    from pipeline.tools import bench, demo, soak
    from pipeline.web import server as web

    simulate.add_parser(sub)
    demo.add_parser(sub)
    model_commands.add_parsers(sub)
    label_commands.add_parser(sub)
    bench.add_parser(sub)
    soak.add_parser(sub)
    view.add_parsers(sub)
    web.add_parser(sub)
    return one_line_errors(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
