"""The web view in a real browser (Debian's headless chromium) while scans are written live.

A real `pipeline run` (models off: frames flow at once, no peaks) follows a simulated GDA 9 scan
that the simulator writes frame by frame, and serves the web view itself on a thread (`web.port`);
a real `pipeline web` process serves the same root and asks that daemon for its status. Beside the
daemon's scan, the project's writer grows a store of known peaks (`TruthStoreWriter`), for the
rocking curves. The browser must see the front page's frames-done count rise without a reload,
the scan page's frame and rocking curves (and see them grow), and `complete` once a scan is over.
Screenshots are checked for content (pixels); with `WEB_SCREENSHOTS=DIR` set, a small copy of each
page's screenshot is written there too (the README's pictures: `WEB_SCREENSHOTS=docs`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.store import StoreReader, schema
from pipeline.testing.configs import MODELS_OFF, free_port, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers, wait_until
from pipeline.testing.truth_stores import TruthStoreWriter
from pipeline.testing.web import browser_errors, colour_share, element_pixels, get, wait_in_page
from pipeline.web.render import SSL_COLOUR, TLM_COLOUR

pytestmark = pytest.mark.daemon

N_FRAMES = 30
RATE_HZ = 3.0
TRUTH_FRAMES = 24
RUNNING_BLUE = (0x0B, 0x63, 0xC5)  # the progress bar and the "running" status (style.css)


@dataclass
class Site:
    scans: Path
    config: Path
    web_port: int  # `pipeline web`
    daemon_web_port: int  # `pipeline run`'s own web view
    daemon: subprocess.Popen[bytes]
    web: subprocess.Popen[bytes]
    logs: Path
    writer: ScanWriter | None = None
    plan: ScanPlan | None = None
    truth: TruthStoreWriter | None = None
    grow: threading.Thread | None = None

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.web_port}{path}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("web-browser")
    scans = base / "scans"
    scans.mkdir()
    daemon_web_port, web_port = free_port(), free_port()
    config = write_config(base / "config.yaml", models=MODELS_OFF, web={"port": daemon_web_port, "poll_interval_s": 0.5})
    daemon = start_daemon(config, scans, base / "daemon.log")
    web = subprocess.Popen([sys.executable, "-m", "pipeline", "web", "--config", str(config), "--root", str(scans), "--port", str(web_port)],
                           stdout=(base / "web.log").open("w"), stderr=subprocess.STDOUT)
    site = Site(scans, config, web_port, daemon_web_port, daemon, web, base)
    earlier = TruthStoreWriter(scans, "earlier-scan", 8, seed=3, n_peaks=2)  # a finished scan beside the live ones
    earlier.write(8)
    earlier.finish()
    try:
        wait_for_workers(config, 1)
        wait_until(lambda: get(site.url("/api/scans")).status == 200, 30, "pipeline web answers")
        wait_until(lambda: get(site.url("/api/scans", daemon_web_port)).status == 200, 30, "pipeline run's web view answers")
        yield site
    finally:
        if site.writer is not None:
            site.writer.join(timeout=60)
        if site.grow is not None:
            site.grow.join(timeout=60)
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(timeout=30)
        except subprocess.TimeoutExpired:
            web.kill()
        stop_daemon(daemon)
    assert web.returncode == 0, (base / "web.log").read_text()[-3000:]
    assert daemon.returncode == 0, (base / "daemon.log").read_text()[-3000:]


def keep_screenshot(path: Path, name: str, height: int | None = None) -> None:
    """With WEB_SCREENSHOTS=DIR: a small copy (palette PNG, at most 1000 px wide, the top `height` pixels) for the README."""
    target = os.environ.get("WEB_SCREENSHOTS")
    if not target:
        return
    with Image.open(path) as picture:
        picture = picture.convert("RGB")
        if height is not None:
            picture = picture.crop((0, 0, picture.width, min(picture.height, height)))
        if picture.width > 1000:
            picture = picture.resize((1000, round(picture.height * 1000 / picture.width)), Image.Resampling.LANCZOS)
        Path(target).mkdir(parents=True, exist_ok=True)
        picture.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(Path(target) / name, optimize=True)


# -- the front page -------------------------------------------------------------------------------------


def grow_truth_store(truth: TruthStoreWriter) -> None:
    """The project's writer adds a frame every 0.3 s or so, as a slow scan would."""
    while truth.written < truth.n_frames:
        truth.write(1)
        time.sleep(0.15)


def test_the_front_page_follows_a_live_scan(site, browser, tmp_path):
    site.plan = ScanPlan(directory=site.scans, name="live-web", layout="gda9", n_frames=N_FRAMES, rate_hz=RATE_HZ, seed=4)
    site.writer = ScanWriter(site.plan).start()
    site.truth = TruthStoreWriter(site.scans, "truth-live", TRUTH_FRAMES, seed=5, n_peaks=3, table_every=3)
    site.truth.write(6)  # the rest while the scan's page is looked at (the next test)
    browser.get(site.url("/"))
    row = 'document.querySelector(\'tr[data-id="live-web"]\')'
    wait_in_page(browser, f"{row} && {row}.dataset.status === 'running'", 60, "the live scan listed as running")
    browser.execute_script("window.sameDocument = true")  # gone if the page were reloaded
    wait_in_page(browser, "document.querySelector('tr[data-id=\"truth-live\"]') && document.querySelectorAll('#scans tbody tr').length === 3",
                 10, "the three scans listed")
    done = f"Number({row}.querySelector('.frames-done').textContent)"
    first = browser.execute_script(f"return {done};")
    later = wait_in_page(browser, f"window.sameDocument && {done} > {first} && {done}", 30, "frames done rising without a reload")
    assert first < later < N_FRAMES or later == N_FRAMES
    assert browser.execute_script(f"return {row}.querySelector('.frames').textContent").endswith(f" of {N_FRAMES}")
    assert browser.find_element("id", "daemon").text.startswith("daemon pid ")  # `pipeline web` asked the daemon
    assert browser.find_element("id", "connection").text == "live"
    screenshot = tmp_path / "front.png"
    table = element_pixels(browser, screenshot, "#scans")
    assert table.shape[0] > 50 and table.std() > 20, "the table of scans looks blank"
    assert colour_share(table, RUNNING_BLUE, tolerance=30) > 0.001, "no progress bar or running status drawn"
    bottom = browser.execute_script("return document.getElementById('scans').getBoundingClientRect().bottom")
    keep_screenshot(screenshot, "web-front.png", height=int(bottom) + 24)
    assert browser_errors(browser) == []


# -- a scan's page --------------------------------------------------------------------------------------


def test_the_scan_page_shows_the_frame_and_growing_rocking_curves(site, browser, tmp_path):
    truth = site.truth
    assert truth is not None, "the front page's test starts the store"
    browser.get(site.url("/scans/truth-live"))
    image = "document.getElementById('frame-image')"
    curves = "document.getElementById('curves')"
    wait_in_page(browser, f"{image}.complete && {image}.naturalWidth > 0 && {image}.dataset.frame === '5'", 30, "a frame picture")
    wait_in_page(browser, f"Number({curves}.dataset.series) >= 1 && {curves}.querySelector('canvas')", 30, "rocking curves drawn")
    browser.execute_script("window.sameDocument = true")
    frame, points = browser.execute_script(f"return [Number({image}.dataset.frame), Number({curves}.dataset.points)];")
    assert frame == 5 and points > 0
    site.grow = grow = threading.Thread(target=grow_truth_store, args=(truth,), daemon=True)
    grow.start()  # now the store grows: the page must follow without a reload
    wait_in_page(browser, f"window.sameDocument && Number({image}.dataset.frame) > {frame} && Number({curves}.dataset.points) > {points}",
                 60, "the newest frame and the curves following the scan")
    assert browser.find_element("id", "frame-image").get_property("naturalWidth") == 974

    screenshot = tmp_path / "scan.png"
    frame_pixels = element_pixels(browser, screenshot, "#frame-image")
    assert frame_pixels.std() > 10, "the frame picture looks blank"
    projection = element_pixels(browser, screenshot, "#projection-image")
    assert projection.std() > 10, "the projection looks blank"
    chart = element_pixels(browser, screenshot, "#curves canvas")
    colours = [tuple(int(s["colour"][i:i + 2], 16) for i in (1, 3, 5))
               for s in get(site.url("/api/curves/truth-live")).json()["series"]]
    drawn = sum(colour_share(chart, colour, tolerance=25) for colour in colours) * chart.shape[0] * chart.shape[1]
    assert drawn > 300, f"the rocking curves have only {drawn:.0f} pixels drawn"
    grow.join(timeout=60)
    truth.finish()
    wait_in_page(browser, "document.body.dataset.status === 'complete' && document.body.dataset.framesDone === '24'", 30,
                 "the page showing the finished store")
    wait_in_page(browser, f"document.getElementById('peaks').tBodies[0].rows.length === {len(truth.linker.peaks)}", 10, "the peaks table")
    slider = browser.find_element("id", "frame-slider")
    busiest = int(np.argmax([np.count_nonzero(truth.truth(i)) for i in range(TRUTH_FRAMES)]))
    browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", slider, busiest)
    wait_in_page(browser, f"{image}.dataset.frame === '{busiest}' && {image}.complete", 10, "the slider's frame")
    masked = element_pixels(browser, screenshot, "#frame-image")
    assert colour_share(masked, TLM_COLOUR, 30) > 0.0005 and colour_share(masked, SSL_COLOUR, 30) > 0.0005, "no mask outlines drawn"
    assert not browser.find_element("id", "follow").is_selected()

    header = browser.find_element("css selector", '#peaks th[data-column="voxels"]')
    header.click()
    header.click()  # descending
    column = list(schema.PEAK_COLUMNS).index("voxels")
    shown = [int(row.text.replace(",", "")) for row in browser.find_elements("css selector", f"#peaks tbody td:nth-child({column + 1})")]
    assert shown == sorted(StoreReader(truth.store_path).table(schema.PEAKS)["voxels"].tolist(), reverse=True)
    browser.set_window_size(1280, 2150)  # the whole page, for the README's picture
    element_pixels(browser, screenshot, "body")
    bottom = browser.execute_script("return document.getElementById('peaks').getBoundingClientRect().bottom")
    keep_screenshot(screenshot, "web-scan.png", height=int(bottom) + 24)
    browser.set_window_size(1280, 1800)
    assert browser_errors(browser) == []


# -- the end of a scan ----------------------------------------------------------------------------------


def test_a_finished_scan_shows_complete(site, browser):
    assert site.writer is not None and site.plan is not None
    site.writer.join(timeout=60)
    store = site.plan.nxs_path.with_suffix(".zarr")
    wait_for_status([store], timeout=60)
    reader = StoreReader(store)
    assert reader.status == "complete" and reader.done_frames().size == N_FRAMES
    browser.get(site.url("/"))
    row = 'document.querySelector(\'tr[data-id="live-web"]\')'
    wait_in_page(browser, f"{row} && {row}.dataset.status === 'complete'", 30, "the scan shown complete")
    assert browser.execute_script(f"return {row}.querySelector('.frames').textContent").startswith(f"{N_FRAMES} of {N_FRAMES}")
    browser.get(site.url("/scans/live-web"))
    wait_in_page(browser, "document.body.dataset.status === 'complete'", 30, "the scan's page shown complete")
    assert browser.find_element("id", "status").text == "complete"
    for port in (site.web_port, site.daemon_web_port):  # `pipeline web`, and `pipeline run`'s own thread

        def listed(port: int = port) -> dict[str, Any]:
            return next(s for s in get(site.url("/api/scans", port)).json()["scans"] if s["id"] == "live-web")

        wait_until(lambda: listed()["status"] == "complete" and listed()["daemon"] is not None, 30, f"complete on port {port}")
        scan = listed()
        assert (scan["status"], scan["frames_done"], scan["frames_expected"]) == ("complete", N_FRAMES, N_FRAMES)
        assert scan["daemon"]["frames_done"] == N_FRAMES and scan["daemon"]["status"] == "complete", port
    assert browser_errors(browser) == []
