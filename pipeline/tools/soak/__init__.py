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

Where each part lives:

- `settings`: `SoakSettings` (every option, built once by `SoakSettings.from_args`), the option
  parsers (`fault_kinds`, `_range`), the fault kinds, the soak's timeouts and `free_port`;
- `command`: the argparse parts: `add_parser`, `run_soak`, `main`;
- `run`: `Soak`, one soak from set-up to report;
- `processes`: the daemon subprocess (`DaemonProcess`, one `Incarnation` per start) and the
  remote workers (`RemoteWorkers`);
- `scans`: what goes into the watched directory: `GoodScan`, `BadFile`;
- `faults`: `FaultInjector`, one fault at a time;
- `hostile`: `hostile_messages` and `HostileSenders`, the `hostile` fault's material;
- `report`: `format_report` and the parts of the report that need no `Soak`.
"""

from pipeline.tools.soak.command import add_parser, main, run_soak
from pipeline.tools.soak.hostile import HostileSenders, hostile_messages
from pipeline.tools.soak.settings import SoakSettings

__all__ = ["HostileSenders", "SoakSettings", "add_parser", "hostile_messages", "main", "run_soak"]
