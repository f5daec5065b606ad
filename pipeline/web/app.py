"""The Starlette application: two pages, the JSON API under them, the update streams, the package's own scripts.

Pages: `/` (every scan) and `/scans/<id>` (one scan). API (JSON; errors are `{"error": "one line"}`):
`/api/scans`, `/api/scans/<id>`, `/api/curves/<id>`, `/api/stream` and `/api/stream/<id>`
(server-sent events), and PNGs: `/api/frame/<id>?frame=N&scale=log|linear&layers=tlm,ssl,boxes`,
`/api/projection/<id>`, `/api/quicklook/<id>`. Everything the pages load comes from `static/` in
this package (no CDN: beamline networks often have no internet). Bound to loopback, only requests
that name a loopback host are answered (a web page elsewhere cannot reach it through DNS
rebinding); with a token, every request must carry it.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import LOOPBACK_HOSTS
from pipeline.errors import one_line
from pipeline.live.confinement import is_inside
from pipeline.store.reader import QUICKLOOK_SUFFIX, StoreError, beside_store
from pipeline.web import render
from pipeline.web.index import StoreIndex
from pipeline.web.monitor import Monitor
from pipeline.web.scanview import ScanView, ScanViews
from pipeline.web.stream import scan_events, scans_events

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "pipeline_web_token"
LAYERS = ("tlm", "ssl", "boxes")
API_ADVANCE_S = 0.2  # a request adds this much of the frames done since the last look; /api/stream/<id> catches up the rest
FIRST_PASS_WAIT_S = 10.0  # /api/scans waits this long for the monitor's first look at the stores
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class WebState:
    """What the routes share: the index, the monitor, the scans' views, and the flag that ends the streams."""

    index: StoreIndex
    monitor: Monitor
    views: ScanViews
    raw_roots: list[Path]
    closing: threading.Event = field(default_factory=threading.Event)

    def lookup(self, scan_id: str) -> Path | None:
        return self.index.lookup(scan_id)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def not_found(scan_id: str) -> JSONResponse:
    return error(404, f"no scan {scan_id!r} under the roots")


# -- middleware ------------------------------------------------------------------------------


class SecurityHeaders:
    """Every answer says: only this server's own scripts, styles and pictures; never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()
                            if name.lower().encode() not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TokenGate:
    """With a token set, a request must carry it: `Authorization: Bearer TOKEN`, the cookie this sets, or `?token=` once
    (answered with the cookie and a redirect to the same page without it, so the token leaves the address bar)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        if self._matches(bearer) or self._matches(request.cookies.get(TOKEN_COOKIE)):
            await self.app(scope, receive, send)
            return
        if self._matches(request.query_params.get("token")):
            rest = [(key, value) for key, value in request.query_params.multi_items() if key != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(TOKEN_COOKIE, self.token.decode(), httponly=True, samesite="strict", path="/")
            await response(scope, receive, send)
            return
        await PlainTextResponse("a token is needed: open the page once as /?token=TOKEN, or send Authorization: Bearer TOKEN\n",
                                status_code=401)(scope, receive, send)


# -- pages ------------------------------------------------------------------------------------


async def front_page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def scan_page(request: Request) -> Response:
    state: WebState = request.app.state.web
    scan_id = request.path_params["scan_id"]
    if state.lookup(scan_id) is None:
        return PlainTextResponse(f"no scan {scan_id!r} under the roots\n", status_code=404)
    return FileResponse(STATIC / "scan.html", media_type="text/html")


# -- the API --------------------------------------------------------------------------------


async def api_scans(request: Request) -> Response:
    state: WebState = request.app.state.web
    for _ in range(int(FIRST_PASS_WAIT_S / 0.05)):
        if state.monitor.refreshed.is_set():
            break
        await asyncio.sleep(0.05)
    version, scans, daemon = state.monitor.snapshot()
    return JSONResponse({"version": version, "ready": state.monitor.refreshed.is_set(), "roots": [str(root) for root in state.index.roots],
                         "problems": state.monitor.own_problems(), "daemon": daemon, "scans": scans})


def api_scan(request: Request) -> Response:
    state: WebState = request.app.state.web
    scan_id = request.path_params["scan_id"]
    path = state.lookup(scan_id)
    if path is None:
        return not_found(scan_id)
    try:
        return JSONResponse(state.views.get(scan_id, path).detail(state.monitor.get(scan_id)))
    except StoreError as problem:
        return error(409, one_line(problem))


def _advanced_view(request: Request) -> ScanView | Response:
    """The requested scan's view, fed the frames done since the last look; the error answer when there is none."""
    state: WebState = request.app.state.web
    scan_id = request.path_params["scan_id"]
    path = state.lookup(scan_id)
    if path is None:
        return not_found(scan_id)
    view = state.views.get(scan_id, path)
    try:
        view.advance(API_ADVANCE_S, wait=False)
    except StoreError as problem:
        return error(409, one_line(problem))
    if view.nothing_to_show is not None:
        return error(409, view.nothing_to_show)
    return view


def api_curves(request: Request) -> Response:
    view = _advanced_view(request)
    return view if isinstance(view, Response) else JSONResponse(view.curves())


def api_projection(request: Request) -> Response:
    view = _advanced_view(request)
    if isinstance(view, Response):
        return view
    scan_id = request.path_params["scan_id"]
    png = view.projection_png()
    if png is None:
        return error(409, view.problem or f"{scan_id}: no frame is done yet")
    progress = view.progress()
    return Response(png, media_type="image/png", headers={"X-Frames-Covered": str(progress["frames_covered"]),
                                                          "X-Peaks": str(progress["peaks_seen"]), "X-Version": str(progress["version"])})


def api_frame(request: Request) -> Response:
    state: WebState = request.app.state.web
    scan_id = request.path_params["scan_id"]
    path = state.lookup(scan_id)
    if path is None:
        return not_found(scan_id)
    query = request.query_params
    scale = query.get("scale", "log")
    if scale not in render.SCALES:
        return error(400, f"scale must be 'log' or 'linear', not {scale!r}")
    layers = set(filter(None, query.get("layers", ",".join(LAYERS)).split(",")))
    if not layers <= set(LAYERS):
        return error(400, f"layers must be among {', '.join(LAYERS)}, not {', '.join(sorted(layers - set(LAYERS)))}")
    view = state.views.get(scan_id, path)
    try:
        frame_text = query.get("frame")
        if frame_text is None:
            newest = (state.monitor.get(scan_id) or {}).get("newest_done")
            if newest is None:
                return error(409, f"{scan_id}: no frame is done yet")
            frame = int(newest)
        else:
            try:
                frame = int(frame_text)
            except ValueError:
                return error(400, f"frame must be a whole number, not {frame_text!r}")
        png, headers = view.frame_png(frame, scale, layers)
    except StoreError as problem:
        return error(404 if "out of range" in str(problem) or "not done" in str(problem) else 409, one_line(problem))
    return Response(png, media_type="image/png", headers=headers)


def api_quicklook(request: Request) -> Response:
    state: WebState = request.app.state.web
    scan_id = request.path_params["scan_id"]
    path = state.lookup(scan_id)
    if path is None:
        return not_found(scan_id)
    picture = beside_store(path, QUICKLOOK_SUFFIX)
    if picture.is_symlink() or not picture.is_file() or not is_inside(picture, state.index.roots):
        return error(404, f"{scan_id}: no quick look yet (made when the scan ends, or with `pipeline quicklook`)")
    return FileResponse(picture, media_type="image/png")


async def api_stream(request: Request) -> Response:
    state: WebState = request.app.state.web
    return StreamingResponse(scans_events(state.monitor, state.closing), media_type="text/event-stream",
                             headers={"X-Accel-Buffering": "no"})


async def api_scan_stream(request: Request) -> Response:
    state: WebState = request.app.state.web
    scan_id = request.path_params["scan_id"]
    if state.lookup(scan_id) is None:
        return not_found(scan_id)
    return StreamingResponse(scan_events(state.monitor, state.views, scan_id, state.lookup, state.closing),
                             media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


async def api_unknown(request: Request) -> Response:
    return error(404, f"no such API: {request.url.path} (see /api/scans)")


def build_app(state: WebState, token: str | None = None, loopback_only: bool = True) -> Starlette:
    """The application over `state`; `loopback_only` answers only requests addressed to a loopback name."""
    routes = [
        Route("/", front_page),
        Route("/scans/{scan_id:path}", scan_page),
        Route("/api/scans", api_scans),
        Route("/api/scans/{scan_id:path}", api_scan),
        Route("/api/curves/{scan_id:path}", api_curves),
        Route("/api/projection/{scan_id:path}", api_projection),
        Route("/api/frame/{scan_id:path}", api_frame),
        Route("/api/quicklook/{scan_id:path}", api_quicklook),
        Route("/api/stream", api_stream),
        Route("/api/stream/{scan_id:path}", api_scan_stream),
        Route("/api/{rest:path}", api_unknown),
        Mount("/static", app=StaticFiles(directory=STATIC, follow_symlink=False), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if loopback_only:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(_loopback_names())))
    if token is not None:
        middleware.append(Middleware(TokenGate, token=token))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.web = state
    return app


def _loopback_names() -> Sequence[str]:
    return (*LOOPBACK_HOSTS, "[::1]")
