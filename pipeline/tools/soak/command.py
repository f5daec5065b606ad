"""The `pipeline soak` command line: its options, and the run that turns them into an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.common.argtypes import non_negative_int, one_line_errors, positive_float, positive_int, run_standalone
from pipeline.tools.soak.report import format_report
from pipeline.tools.soak.run import Soak
from pipeline.tools.soak.settings import DEFAULT_FAULTS, FAULT_KINDS, HOSTILE_MIXES, SoakError, SoakSettings, _range, fault_kinds

DEFAULTS = SoakSettings()


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `soak` sub-command; argument errors are one line and exit code 2."""
    parser = subparsers.add_parser(
        "soak", help="run the real daemon for minutes under simulated scans and random faults; count lost and doubled frames",
        description="Start `pipeline run` as a subprocess, write a stream of small simulated scans (all three layouts) into "
                    "its watched directory and inject faults at random (seeded): kill -9 of workers and of the daemon "
                    "(restarted: it resumes from frames/done), bad scan files, hostile messages on the worker port. At "
                    "the end, check the stores and the daemon's audit log: no frame lost or done twice, every good scan "
                    "complete, every bad file failed (a file with no detector frames skipped, no store). Exit code 0 only then.")
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=positive_float, default=None, metavar="N",
                          help="how long to inject faults and write scans (default 10)")
    duration.add_argument("--seconds", type=positive_float, default=None, metavar="S", help="the same in seconds")
    parser.add_argument("--seed", type=non_negative_int, default=DEFAULTS.seed, help="seed of scans and faults (default 0)")
    parser.add_argument("--config", type=Path, default=DEFAULTS.config, metavar="FILE",
                        help="YAML config for weights and settings (default: the built-in defaults); the soak sets the "
                             "watched directory, ports, audit log and short timeouts itself")
    parser.add_argument("--out", type=Path, default=DEFAULTS.out, metavar="DIR",
                        help="write scans, stores, logs and the audit log here (kept); default: a temporary directory, "
                             "removed unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    parser.add_argument("--workers", type=positive_int, default=DEFAULTS.workers, metavar="N", help="local worker processes (default 2)")
    parser.add_argument("--remote-workers", type=non_negative_int, default=DEFAULTS.remote_workers, metavar="N",
                        help="also run N `pipeline worker --connect` processes, as on other hosts: they outlive daemon "
                             "restarts and must join each new daemon (the soak restarts one that exits, as systemd "
                             "would) (default 0)")
    parser.add_argument("--device", default=DEFAULTS.device, metavar="DEV", help="auto | cpu | cuda | cuda:N (default: workers.device)")
    parser.add_argument("--json", type=Path, default=DEFAULTS.json, metavar="FILE", help="also save every figure here as JSON")
    parser.add_argument("--faults", type=fault_kinds, default=list(DEFAULTS.faults), metavar="KIND,...",
                        help=f"faults to inject, each at least once when the time allows: {', '.join(FAULT_KINDS)}, "
                             f"all or none (default {','.join(DEFAULT_FAULTS)})")
    parser.add_argument("--fault-every", type=positive_float, default=DEFAULTS.fault_every, metavar="S",
                        help="mean seconds between faults (default 20; the first round, one of each kind, is evenly spaced)")
    parser.add_argument("--hostile-mix", choices=HOSTILE_MIXES, default=DEFAULTS.hostile_mix,
                        help="basic: the garbage of tests/test_hostile.py; full: also messages that stress the JSON "
                             "parser (deep nesting, huge numbers) (default full)")
    parser.add_argument("--frames", type=_range(int, 1), default=DEFAULTS.frames, metavar="MIN,MAX",
                        help="frames per scan, drawn in this range (default 6,20)")
    parser.add_argument("--rate", type=_range(float, 0.1), default=DEFAULTS.rate, metavar="MIN,MAX",
                        help="frames per second a scan is written at, drawn in this range (default 5,20)")
    parser.add_argument("--parallel", type=positive_int, default=DEFAULTS.parallel, metavar="N", help="scans written at once (default 2)")
    parser.add_argument("--drain-timeout", type=positive_float, default=DEFAULTS.drain_timeout, metavar="S",
                        help="after the time is up, how long the last scans may take to finish (default 300)")
    parser.add_argument("--compare", dest="compare", action="store_true", default=DEFAULTS.compare,
                        help="compare one good scan's store with `pipeline process` of the same file (default)")
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip that comparison")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_soak)

    one_line_errors(parser)


def run_soak(args: argparse.Namespace) -> int:
    """`pipeline soak ...`: 0 when nothing was lost or doubled and every scan ended as it should; 1 otherwise."""
    settings = SoakSettings.from_args(args)
    try:
        report = Soak(settings).run()
    except SoakError as error:
        print(f"pipeline soak: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline soak: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if settings.json is not None:
        settings.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"figures saved in {settings.json}")
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.tools.soak ...` works without the rest of the CLI."""
    return run_standalone("soak", add_parser, argv)
