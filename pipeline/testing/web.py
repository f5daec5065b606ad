"""The web view under test: a real uvicorn server on a free port, plain HTTP requests, the event stream, Debian's chromium.

Chromium and its driver are Debian's (`apt-get install chromium chromium-driver`, which the README's
test command does): Selenium is pointed at both binaries, so its manager downloads nothing.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.web.server import WebOptions, WebServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@contextmanager
def web_server(roots: Sequence[Path], raw_roots: Sequence[Path] | None = None, token: str | None = None,
               poll_interval_s: float = 0.3, daemon_status: Callable[[], dict[str, Any] | None] | None = None) -> Iterator[WebServer]:
    """`pipeline web`'s server in this process, on a free loopback port, stopped afterwards; `daemon_status` stands for
    the daemon's status (as `pipeline run` gives its own web view)."""
    options = WebOptions(roots=list(roots), raw_roots=list(raw_roots if raw_roots is not None else roots), host="127.0.0.1", port=0,
                         token=token, poll_interval_s=poll_interval_s)
    server = WebServer(options).start(daemon_status)
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def image(self) -> np.ndarray:
        with Image.open(io.BytesIO(self.body)) as picture:
            assert picture.format == "PNG"
            return np.asarray(picture.convert("RGB"))


def get(url: str, headers: dict[str, str] | None = None, follow_redirects: bool = True, timeout: float = 30.0) -> Answer:
    """One GET; an HTTP error status is an answer too (its body holds the one-line error)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener() if follow_redirects else urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def raw_get(port: int, path: str, headers: dict[str, str] | None = None) -> Answer:
    """A GET of exactly `path` as written (urllib would normalise `..` and `%2F` away), on 127.0.0.1."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=bool(headers and "Host" in headers))
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def events(port: int, path: str, until: Callable[[str, Any], bool], timeout: float) -> list[tuple[str, Any]]:
    """Server-sent events from `path` until `until(name, data)` is true; AssertionError after `timeout` seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    seen: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        connection.request("GET", path, headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("content-type", "").startswith("text/event-stream")
        name, data = "message", ""
        while time.monotonic() < deadline:
            line = response.readline().decode()
            if not line:
                break
            line = line.rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif line == "" and data:
                payload = json.loads(data)
                seen.append((name, payload))
                if until(name, payload):
                    return seen
                name, data = "message", ""
    finally:
        connection.close()
    raise AssertionError(f"not seen within {timeout} s; events: {[n for n, _ in seen]}")


def chromium(scratch: Path, width: int = 1280, height: int = 1800) -> Any:
    """A headless Debian chromium under Selenium (nothing downloaded: both binaries are given). Its temporary
    folders (`org.chromium.Chromium.*`, which it leaves behind) go in `scratch`, not the machine's /tmp."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                     "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    environment = {**os.environ, "TMPDIR": str(scratch)}
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER), env=environment), options=options)


def wait_in_page(driver: Any, script: str, timeout: float, what: str) -> Any:
    """Poll a JavaScript expression in the page until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what} ({script})")


def browser_errors(driver: Any) -> list[str]:
    """What the page's console said at error level (a script that failed, a resource refused by the CSP)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def element_pixels(driver: Any, screenshot: Path, selector: str) -> np.ndarray:
    """The RGB pixels of the element `selector` in a screenshot just taken (the window's device pixels are CSS pixels)."""
    driver.save_screenshot(str(screenshot))
    # looked up and measured in one call: a chart redrawn meanwhile replaces its canvas (a held element would be stale)
    box = driver.execute_script("const e = document.querySelector(arguments[0]); if (!e) return null; "
                                "const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom];", selector)
    if box is None:
        raise AssertionError(f"no element {selector!r} on the page")
    with Image.open(screenshot) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    left, top, right, bottom = (int(round(v)) for v in box)
    return pixels[max(0, top):bottom, max(0, left):right]


def colour_share(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> float:
    """The fraction of `pixels` within `tolerance` (per channel) of `colour`."""
    close = np.all(np.abs(pixels.astype(np.int32) - np.array(colour)) <= tolerance, axis=-1)
    return float(close.mean()) if close.size else 0.0


@dataclass
class WebProcess:
    """A `pipeline web` process serving `roots` on a loopback port."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def peak_rss_mib(self) -> float:
        """The most resident memory the process has had so far (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmHWM for pid {self.process.pid}")


@contextmanager
def web_process(roots: Sequence[Path], log: Path, memory_limit_mib: int | None = None) -> Iterator[WebProcess]:
    """`pipeline web --root ...` as its own process (its memory measurable on its own), answering before this yields;
    `memory_limit_mib` caps its address space, so a test that watches a fault fail cannot take the machine's memory."""
    from pipeline.testing.configs import free_port

    def limit() -> None:
        if memory_limit_mib is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_mib * 2**20, memory_limit_mib * 2**20))

    port = free_port()
    arguments = [sys.executable, "-m", "pipeline", "web", "--port", str(port)]
    for root in roots:
        arguments += ["--root", str(root)]
    with log.open("wb") as output:
        process = subprocess.Popen(arguments, stdout=output, stderr=subprocess.STDOUT, preexec_fn=limit)
    web = WebProcess(process, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"pipeline web exited {process.returncode}: {log.read_text()[-2000:]}")
            try:
                if get(web.url("/api/scans")).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"pipeline web did not answer within 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield web
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
