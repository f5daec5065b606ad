"""A Zocalo service: a recipe step asks the running daemon to follow a scan now, and passes its store on once finished.

GDA starts processing at Diamond through Zocalo recipes over RabbitMQ. This service (a `workflows` CommonService)
takes recipe steps from the `pipeline.follow` queue whose parameters name a scan file, asks the daemon over its control
socket to follow that file now (no wait for inotify or polling), and once the scan's store is finished (complete,
incomplete or failed) sends `{scan, store, status, end_reason}` to the step's `finished` output. A request the daemon
refuses (a file outside its watched directories, not a regular file) goes to the step's `error` output as
`{scan, reason}`, the reason one line. The message is acknowledged only then, in one transaction with what is sent: a
service killed while it waits leaves the message unacknowledged, RabbitMQ delivers it again, and the daemon, asked a
second time, follows the scan once (it queues nothing for a scan it is following, and writes nothing to a store already
final for this very file).

Nothing waits on the transport's thread (acknowledging there deadlocks): the callback only records the request, and
the service's main loop looks at the stores between messages (its idle timer, every POLL_S). `zocalo` and `workflows`
are imported only when the service runs, so the pipeline works without them. `pipeline zocalo-service` starts it;
deploy/zocalo/recipe-pipeline.json is a recipe that uses it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.common.argtypes import zmq_endpoint
from pipeline.common.endpoints import check_endpoint
from pipeline.errors import PipelineError, UserError, one_line
from pipeline.live.control import ControlError, expand, query_status, request_follow
from pipeline.store import schema
from pipeline.store.reader import read_attributes
from pipeline.store.schema import Attr

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

QUEUE = "pipeline.follow"  # the queue the service takes its recipe steps from (scripts/rabbitmq/start.sh declares it)
FINISHED_OUTPUT = "finished"  # the step's output for {scan, store, status, end_reason}
ERROR_OUTPUT = "error"  # the step's output for {scan, reason}
SERVICE_NAME = "pipeline follow"
POLL_S = 0.5  # how often the stores of the scans waited for are looked at
DAEMON_CHECK_S = 2.0  # how often the daemon is asked about them (a scan it skipped writes nothing to its store)
RETRY_S = 5.0  # a daemon that does not answer is asked again this often, until the request's timeout
ASK_TIMEOUT_S = 5.0
PREFETCH = 64  # scans waited for at once: RabbitMQ delivers no more unacknowledged messages than this
DEFAULT_TIMEOUT_S = 24 * 3600.0  # a scan not finished after this long goes to the error output
HELP = "a Zocalo service: recipe steps ask the running daemon to follow a scan now, and get its store once finished"
_PLACEHOLDER = re.compile(r"^\{[^{}]*\}$")  # a recipe parameter the Dispatcher had no value for stays `{name}`


@dataclass(frozen=True)
class Settings:
    """What a recipe step does not say: the daemon's control endpoint, how long a scan may take."""

    control: str
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass
class Request:
    """One recipe step being served: the scan, the daemon asked, and what has been seen of them since."""

    scan: Path
    control: str
    deadline: float
    output_root: Path | None = None  # where the daemon is asked to put the store (else where it puts stores)
    answer: dict[str, Any] | None = None  # the daemon's `accepted` answer, once it gave one
    marker: str | None = None  # the store's status and times just after the daemon took the scan
    next_ask: float = 0.0
    next_daemon_check: float = 0.0
    daemon_done: int = 0  # daemon checks in a row that found it done with the scan
    said_unanswered: bool = False
    payload: dict[str, Any] = field(default_factory=dict)


Outcome = tuple[str, dict[str, Any]]
"""(the step's output, the message for it)."""


def _given(value: object) -> str | None:
    """A recipe parameter's text, or None when it is missing, empty or a placeholder nobody filled in."""
    if value is None:
        return None
    text = str(value).strip()
    return None if not text or _PLACEHOLDER.match(text) else text


def parse_request(parameters: object, settings: Settings, now: float) -> Request | str:
    """The request a recipe step's parameters make, or one line saying what is wrong with them.

    `scan` (required): the scan file's absolute path. `output_root`: a folder the store goes under (the daemon takes
    one inside its watched directories or output.root). `control`: the daemon's control endpoint; else `config`: a
    pipeline config file whose `daemon.control` names it; else the service's own. `timeout_s`: how long the scan may
    take before the step goes to the error output."""
    if not isinstance(parameters, dict):
        return f"recipe step parameters: a {type(parameters).__name__}, not a mapping"
    scan = _given(parameters.get("scan"))
    if scan is None:
        return "recipe step parameters: no `scan` (the scan file's absolute path)"
    output_root = _given(parameters.get("output_root"))
    if output_root is not None and not os.path.isabs(output_root):
        return f"recipe step parameter output_root {output_root!r}: not an absolute path"
    control = _given(parameters.get("control"))
    if control is not None:
        try:
            check_endpoint(control)
        except ValueError as error:
            return f"recipe step parameter control {control!r}: {error}"
    config_file = _given(parameters.get("config"))
    if control is None and config_file is not None:
        from pipeline.config import load_config

        try:
            control = load_config(Path(config_file)).daemon.control
        except (PipelineError, OSError, ValueError) as error:
            return f"recipe step parameter config {config_file}: {one_line(error)}"
    timeout_s = settings.timeout_s
    if (given := _given(parameters.get("timeout_s"))) is not None:
        try:
            timeout_s = float(given)
        except ValueError:
            timeout_s = math.nan
        if not timeout_s > 0 or math.isinf(timeout_s):
            return f"recipe step parameter timeout_s {given!r}: give a positive number of seconds"
    return Request(Path(scan), control or settings.control, deadline=now + timeout_s,
                   output_root=None if output_root is None else Path(output_root), payload={"scan": scan})


def _marker(store: Path) -> str | None:
    """What changes each time a run of the scan ends: its status, start, resume and end times, frames done."""
    attrs = read_attributes(store, follow_symlinks=False)
    if attrs is None:
        return None
    return json.dumps([attrs.get(name) for name in (Attr.STATUS, Attr.START_TIME, Attr.RESUMED_AT, Attr.END_TIME, Attr.FRAMES_DONE)],
                      default=str)


def _finished(request: Request, store: Path, attrs: dict[str, Any]) -> Outcome:
    return FINISHED_OUTPUT, {**request.payload, "store": str(store), "status": attrs.get(Attr.STATUS),
                             "end_reason": attrs.get(Attr.END_REASON)}


def _refused(request: Request, reason: str) -> Outcome:
    return ERROR_OUTPUT, {**request.payload, "reason": reason}


def step(request: Request, now: float, daemon_status: Callable[[str], dict[str, Any] | None]) -> Outcome | None:
    """Move one request on: ask the daemon (again, while none answers or after it restarted), then look at the store.
    The outcome once there is one; None while the scan is still being followed."""
    if request.answer is None:
        if now < request.next_ask:
            return None
        if now > request.deadline:
            return _refused(request, f"{request.scan}: no daemon answered at {expand(request.control)} before the timeout")
        try:
            answer = request_follow(request.control, request.scan, ASK_TIMEOUT_S, output_root=request.output_root)
        except ControlError as error:
            if not request.said_unanswered:
                log.warning("%s: %s; asking again every %g s", request.scan, error, RETRY_S)
                request.said_unanswered = True
            request.next_ask = now + RETRY_S
            return None
        if not answer.get("accepted"):
            return _refused(request, str(answer.get("reason") or f"{request.scan}: refused by the daemon"))
        request.answer = answer
        request.marker = _marker(Path(answer["store"]))
        request.next_daemon_check = now + DAEMON_CHECK_S
        log.info("%s: the daemon %s; store %s", request.scan, "follows it" if answer.get("queued") else "has it finished already",
                 answer["store"])
    store = Path(request.answer["store"])
    attrs = read_attributes(store, follow_symlinks=False) or {}
    status = attrs.get(Attr.STATUS)
    final = status in schema.FINAL_STATUSES
    if final and (not request.answer.get("queued") or _marker(store) != request.marker):
        return _finished(request, store, attrs)
    if now > request.deadline:
        return _refused(request, f"{request.scan}: not finished before the timeout (store {store} says {status or 'nothing'})")
    if now < request.next_daemon_check:
        return None
    request.next_daemon_check = now + DAEMON_CHECK_S
    return _ask_daemon(request, store, attrs, daemon_status(request.control))


def _ask_daemon(request: Request, store: Path, attrs: dict[str, Any], status: dict[str, Any] | None) -> Outcome | None:
    """What the daemon's status says about a scan whose store has not changed: a new daemon (asked again), or a scan it
    is done with (it found the store final, or the file no scan): then the store as it is, or the daemon's reason."""
    assert request.answer is not None
    if status is None:
        return None  # the daemon is away (restarting?): its successor is asked once it answers
    if status.get("pid") != request.answer.get("pid"):
        log.info("%s: the daemon at %s restarted; asking it again", request.scan, expand(request.control))
        request.answer, request.next_ask = None, 0.0
        return None
    entry = next((s for s in status.get("scans", []) if s.get("path") == request.answer.get("scan")), None)
    done = (entry is not None and status.get("waiting_scans") == 0 and entry.get("status") not in ("opening", "running")
            and not str(entry.get("status")).startswith("waiting"))
    request.daemon_done = request.daemon_done + 1 if done else 0
    if request.daemon_done < 2:  # twice in a row: not the moment between the scan leaving the queue and its start
        return None
    assert entry is not None
    if attrs.get(Attr.STATUS) in schema.FINAL_STATUSES:
        return _finished(request, store, attrs)
    reason = f" ({entry['reason']})" if entry.get("reason") else ""
    return _refused(request, f"{request.scan}: {entry.get('status')} by the daemon{reason}; no finished store at {store}")


def _status_once(cache: dict[str, dict[str, Any] | None]) -> Callable[[str], dict[str, Any] | None]:
    """The daemon's status by endpoint, asked at most once per round over every request waiting."""

    def status(endpoint: str) -> dict[str, Any] | None:
        if endpoint not in cache:
            cache[endpoint] = query_status(endpoint, timeout_s=2.0)
        return cache[endpoint]

    return status


# -- the workflows service ----------------------------------------------------------------------


@functools.cache
def service_class() -> type:
    """The CommonService subclass, made on first use so that importing this module needs no `workflows`."""
    import workflows.recipe
    from workflows.services.common_service import CommonService

    class PipelineFollow(CommonService):
        """Recipe steps from QUEUE: the daemon follows the scan; the step's output gets the store once it is finished."""

        _service_name = SERVICE_NAME
        _logger_name = __name__

        def initializing(self) -> None:
            given = self._environment.get("pipeline") or {}
            self._settings = Settings(control=given.get("control") or _default_control(),
                                      timeout_s=float(given.get("timeout_s") or DEFAULT_TIMEOUT_S))
            self._waiting: list[tuple[Any, dict[str, Any], Request]] = []
            workflows.recipe.wrap_subscribe(self._transport, QUEUE, self.on_request, acknowledgement=True, prefetch_count=PREFETCH,
                                            log_extender=self.extend_log)
            self._register_idle(POLL_S, self.look)
            log.info("taking recipe steps from %s; daemon at %s", QUEUE, expand(self._settings.control))

        def on_request(self, rw: Any, header: dict[str, Any], message: Any) -> None:
            """A recipe step arrived (on the service's main thread, not the transport's): recorded, then looked at."""
            parameters = rw.recipe_step.get("parameters", {})
            request = parse_request(parameters, self._settings, time.monotonic())
            if isinstance(request, str):
                scan = parameters.get("scan") if isinstance(parameters, dict) else None
                self._reply(rw, header, (ERROR_OUTPUT, {"scan": None if scan is None else str(scan), "reason": request}))
                return
            if header.get("redelivered"):
                log.info("%s: delivered again (a service stopped before answering it); asking the daemon again", request.scan)
            self._waiting.append((rw, header, request))
            self.look()

        def look(self) -> None:
            """Every request waiting moved on; those with an outcome answered and acknowledged."""
            now = time.monotonic()
            cache: dict[str, dict[str, Any] | None] = {}  # the daemons' status, asked once per look
            for item in list(self._waiting):
                rw, header, request = item
                try:
                    outcome = step(request, now, _status_once(cache))
                except Exception as error:  # a bug must not end the service with every other request in it
                    log.exception("%s: looking at the scan failed", request.scan)
                    outcome = _refused(request, f"{request.scan}: the service failed ({type(error).__name__}: {one_line(error)})")
                if outcome is not None:
                    self._waiting.remove(item)
                    self._reply(rw, header, outcome)

        def _reply(self, rw: Any, header: dict[str, Any], outcome: Outcome) -> None:
            """Send the outcome to the step's output and acknowledge the message, in one transaction: both or neither."""
            channel, payload = outcome
            log.info("%s -> %s: %s", payload.get("scan"), channel, payload.get("status") or payload.get("reason"))
            transport = self._transport
            assert transport is not None, "a service with no transport takes no messages"
            transaction = transport.transaction_begin(subscription_id=header["subscription"])
            transport.ack(header, transaction=transaction)
            rw.send_to(channel, payload, transaction=transaction)
            transport.transaction_commit(transaction)

    PipelineFollow.__qualname__ = "PipelineFollow"  # found by name (module __getattr__) when a start method pickles it
    PipelineFollow.__module__ = __name__
    return PipelineFollow


def __getattr__(name: str) -> Any:
    """`pipeline.cluster.zocalo_service:PipelineFollow` (a `workflows.services` entry point) without importing workflows
    before it is asked for."""
    if name == "PipelineFollow":
        return service_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_control() -> str:
    from pipeline.config import DaemonSettings

    return DaemonSettings().control


# -- `pipeline zocalo-service` --------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """`pipeline zocalo-service`: its options."""
    parser = sub.add_parser("zocalo-service", help=HELP, description=(
        f"Run the Zocalo service that recipe steps on the {QUEUE} queue reach (deploy/zocalo/recipe-pipeline.json): each "
        "names a scan file, which the running daemon is asked to follow now; once the scan's store is finished, "
        f"{{scan, store, status}} goes to the step's `{FINISHED_OUTPUT}` output, and a refusal to its `{ERROR_OUTPUT}` output "
        "with one line saying why. RabbitMQ is reached as zocalo's configuration says (ZOCALO_CONFIG or --zocalo-config). "
        "Needs `pip install zocalo workflows`."))
    parser.add_argument("--config", type=Path, help="the daemon's YAML config: its daemon.control is asked (default: the packaged defaults)")
    parser.add_argument("--control", type=zmq_endpoint, metavar="ENDPOINT", help="the daemon's control endpoint (overrides daemon.control); a "
                                                              "recipe step's `control` or `config` parameter overrides both")
    parser.add_argument("--zocalo-config", type=Path, metavar="FILE", help="zocalo's configuration file (default: $ZOCALO_CONFIG)")
    parser.add_argument("--environment", "-e", action="append", metavar="NAME",
                        help="zocalo configuration environment(s) to activate (default: `default`)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"a scan not finished after S seconds goes to the error output (default {DEFAULT_TIMEOUT_S:g}; "
                             "a step's timeout_s parameter overrides it)")
    parser.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO", help="log level (default INFO)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Connect to RabbitMQ as zocalo's configuration says and serve recipe steps until SIGINT or SIGTERM."""
    from pipeline.config import load_config
    from pipeline.logs import setup_logging

    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout}: give a positive number of seconds")
    control = args.control or load_config(args.config).daemon.control
    zocalo_config = args.zocalo_config or os.environ.get("ZOCALO_CONFIG")
    if not zocalo_config:
        raise UserError("no zocalo configuration: give --zocalo-config FILE or set ZOCALO_CONFIG (scripts/rabbitmq/start.sh writes one)")
    try:
        import workflows
        import workflows.frontend
        import zocalo.configuration
    except ImportError as error:
        raise UserError(f"zocalo-service needs the zocalo and workflows packages ({one_line(error)}): pip install zocalo workflows") from None
    setup_logging(args.log_level)
    if args.log_level != "DEBUG":
        logging.getLogger("pika").setLevel(logging.WARNING)  # a dozen lines per connection at INFO
    try:
        configuration = zocalo.configuration.from_file(str(zocalo_config))
        configuration.activate(args.environment or None)
    except Exception as error:  # zocalo's own errors (ConfigurationError, ValueError): one line naming the file
        raise UserError(f"zocalo configuration {zocalo_config}: {one_line(error)}") from None
    for signum in (signal.SIGINT, signal.SIGTERM):  # inherited by the service's process, forked by the frontend
        signal.signal(signum, _interrupt)
    chatty = [logging.getLogger(name) for name in ("pika", "workflows.transport")]
    levels = [logger.level for logger in chatty]
    for logger in chatty:  # a broker that is not there: pika and workflows log tracebacks; one line below says it
        logger.setLevel(logging.CRITICAL)
    try:
        frontend = workflows.frontend.Frontend(service=service_class(), transport_command_channel="command", environment={
            "config": configuration, "pipeline": {"control": control, "timeout_s": args.timeout}})
    except (AssertionError, workflows.Disconnected):  # how workflows says its transport cannot connect
        raise PipelineError(f"cannot reach RabbitMQ at {_broker_address()} ({zocalo_config}); is the broker running? "
                            "(scripts/rabbitmq/start.sh starts one)") from None
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    try:
        frontend.run()
    except KeyboardInterrupt:
        log.info("stopped; messages not yet answered are delivered again to the next service")
    return 0


def _broker_address() -> str:
    """host:port of the broker the zocalo configuration's pika plugin set, for the one line that says it is not there."""
    from workflows.transport.pika_transport import PikaTransport

    return f"{PikaTransport.defaults.get('--rabbit-host')}:{PikaTransport.defaults.get('--rabbit-port')}"


def _interrupt(_signum: int, _frame: Any) -> None:
    """The first SIGINT or SIGTERM stops this process cleanly (the frontend stops its service, the service disconnects:
    messages not yet answered go back to their queue); the next, such as the frontend's SIGTERM to a service already
    stopping (a whole process group signalled), would only cut that short."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt
