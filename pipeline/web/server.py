"""Running the web view under uvicorn: `pipeline web` in the foreground, or on a thread of `pipeline run`.

The socket is bound when the server is made, so a port that is taken is one line at start (not a
thread that dies later), and port 0 gives a free port whose number is known at once. Which stores:
`--root` (or `web.roots`), else `output.root`, else the watched directories (and `output.requested_roots`); raw pixels only from
those and the config's watched directories and `follow.allowed_roots`. It needs no daemon: with one
answering at `daemon.control` (or in the same process), its scans' progress shows too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.config import LOOPBACK_HOSTS, Config, load_config
from pipeline.errors import PipelineError, UserError, reporting
from pipeline.live.confinement import is_inside
from pipeline.web.app import WebState, build_app
from pipeline.web.index import StoreIndex
from pipeline.web.monitor import Monitor
from pipeline.web.scanview import ScanViews

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765  # `pipeline web` when neither --port nor web.port says
START_TIMEOUT_S = 10.0
HEADER_TIMEOUT_S = 5.0  # a peer has this long, from its connection or its previous answer, to send a request's headers


class WebError(PipelineError):
    """The web view cannot start (its port is taken, its host is not an address here)."""


@dataclass(frozen=True)
class WebOptions:
    """Where the stores are, where raw pixels may come from, and where to listen."""

    roots: list[Path]
    raw_roots: list[Path]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    poll_interval_s: float = 1.0


def options_from(config: Config, default_port: int = DEFAULT_PORT) -> WebOptions:
    """The web view's options from a validated config; a UserError naming the problem when there is nothing to serve."""
    web = config.web
    roots = list(web.roots) or ([config.output.root] if config.output.root is not None else list(config.watch.dirs))
    if not web.roots:  # where follow requests may put stores too, unless inside a root already (listed once, not twice)
        roots += [root for root in config.output.requested_roots if not is_inside(root, roots)]
    if not roots:
        raise UserError("nothing to serve: give --root DIR, or set web.roots (or watch.dirs or output.root) in the config")
    for root in roots:  # one not made yet (a visit's folder before its first scan) is waited for, and said on the page
        if Path(root).exists() and not Path(root).is_dir():
            raise UserError(f"web root {root}: not a directory")
    raw_roots = list(dict.fromkeys([*roots, *config.watch.dirs, *config.follow.allowed_roots]))
    return WebOptions(roots=roots, raw_roots=raw_roots, host=web.host, port=default_port if web.port is None else web.port,
                      token=None if web.token is None else web.token.get_secret_value(), poll_interval_s=web.poll_interval_s)


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's headers: HEADER_TIMEOUT_S from the connection, or from
    the first byte of the next request on a kept-alive one. uvicorn itself waits for headers as long as a peer likes, so
    peers that connect and send nothing, or a byte now and then (slow loris), held the web view's sockets for good.
    A request whose headers are in is not timed: an event stream stays open as long as its page."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # between requests: a new one's headers are arriving
            self._arm()
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are in (also one pipelined behind the last answer)
            self._disarm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered
        if not self.transport.is_closing():
            log.debug("web view: %s sent no complete request within %.0f s; closed", self.client, HEADER_TIMEOUT_S)
            self.transport.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise WebError(f"web.host {host}: not an address of this machine ({error.strerror})") from None
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise WebError(f"web view {host}:{port}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock


class WebServer:
    """The application on a bound socket; `run` serves in the foreground, `start` on a thread, `stop` ends both."""

    def __init__(self, options: WebOptions) -> None:
        self.options = options
        self.socket = _bind(options.host, options.port)
        self.port: int = self.socket.getsockname()[1]
        self.index = StoreIndex(options.roots)
        self.monitor: Monitor | None = None
        self.state: WebState | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.options.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def _prepare(self, daemon_status: Callable[[], dict[str, Any] | None] | None) -> uvicorn.Server:
        # a live store holds the writer's temporary chunk files for a moment; zarr warns about each it meets
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component of a Zarr hierarchy")
        self.monitor = Monitor(self.index, daemon_status, self.options.poll_interval_s)
        self.state = WebState(self.index, self.monitor, ScanViews(self.options.raw_roots), self.options.raw_roots)
        app = build_app(self.state, self.options.token, loopback_only=self.options.host.strip("[]") in LOOPBACK_HOSTS)
        config = uvicorn.Config(app, http=HeaderDeadline, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self.monitor.start()
        return self._server

    def run(self, daemon_status: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then return (uvicorn stops on them; it raises the signal again once stopped,
        which the handlers set here take as done, so the command exits 0)."""
        server = self._prepare(daemon_status)
        stopped_by: list[str] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda number, _frame: stopped_by.append(signal.Signals(number).name))
        try:
            server.run(sockets=[self.socket])
        finally:
            self._close()
        log.info("web view stopped%s", f" ({stopped_by[0]})" if stopped_by else "")

    def start(self, daemon_status: Callable[[], dict[str, Any] | None] | None = None) -> WebServer:
        """Serve on a thread (beside the daemon); returns once requests are answered."""
        server = self._prepare(daemon_status)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.socket]}, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            self.stop()
            raise WebError(f"web view {self.url}: did not start within {START_TIMEOUT_S:.0f} s")
        return self

    def stop(self) -> None:
        """End the streams, let requests in flight finish (2 s at most), then stop looking at the stores."""
        if self.state is not None:
            self.state.closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()

    def _close(self) -> None:
        if self.state is not None:
            self.state.closing.set()
        if self.monitor is not None:
            self.monitor.stop()
        self.socket.close()


def serve_beside_daemon(config: Config) -> WebServer:
    """For `pipeline run` with `web.port` set: bound now (a taken port stops the start); `start(daemon.status)` serves."""
    return WebServer(options_from(config))


# -- the command -------------------------------------------------------------------------------


def cmd_web(args: argparse.Namespace) -> int:
    from pipeline.live.control import query_status
    from pipeline.logs import setup_logging

    config = load_config(args.config)
    overrides: dict[str, Any] = {}
    if args.root:
        overrides["web.roots"] = [str(Path(root).resolve()) for root in args.root]
    if args.host is not None:
        overrides["web.host"] = args.host
    if args.port is not None:
        overrides["web.port"] = args.port
    if args.log_level:
        overrides["daemon.log_level"] = args.log_level
    if overrides:
        config = config.with_overrides(overrides)
    options = options_from(config)
    setup_logging(config.daemon.log_level, None)
    server = WebServer(options)
    endpoint = config.daemon.control
    print(f"live web view of {', '.join(map(str, options.roots))} at {server.url} (Ctrl-C stops)", flush=True)
    for root in options.roots:
        if not Path(root).exists():
            print(f"web root {root} does not exist yet: its scans are listed once it does", flush=True)
    server.run(daemon_status=lambda: query_status(endpoint, timeout_s=0.5))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pipeline web`."""
    web = subparsers.add_parser(
        "web", help="a live web view of every scan's store: progress, frames with their masks, peaks, rocking curves",
        description="Serve a web page listing every scan store under the roots (newest first, updating by itself) and a page per "
                    "scan (the newest done frame with its masks, the maximum projection with the 3D peaks, their rocking curves, "
                    "the peaks table), with a JSON API under /api. It only reads the stores (and the daemon's status, when a "
                    "daemon answers at daemon.control), so it can run on any host that mounts them. Listens on 127.0.0.1 unless "
                    "web.host says otherwise, which needs web.token.")
    web.add_argument("--config", type=Path, help="YAML config (default: the packaged pipeline.yaml defaults)")
    web.add_argument("--root", action="append", type=Path, metavar="DIR",
                     help="look for stores under DIR (repeatable; default: web.roots, else output.root, else watch.dirs)")
    web.add_argument("--host", metavar="HOST", help="address to listen on (default web.host, 127.0.0.1); beyond loopback needs web.token")
    web.add_argument("--port", type=_port, metavar="N", help=f"port (default web.port, else {DEFAULT_PORT}; 0: any free port)")
    web.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="overrides daemon.log_level")
    web.set_defaults(func=reporting("web", cmd_web))


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value
