"""What a person sees on the web view's pages on a first day, in a real browser (Debian's headless chromium).

Fixed after a user's first day: the frame had no colour bar; a failed scan's page said its reason
twice and showed empty picture boxes; the front page, a scan's page and the API gave different
counts (the arrays' allocated length passed for a total); and the daemon's problems (a watched
directory that does not exist) were nowhere on the page. Here an in-process web view serves a
finished scan, a running one (the writer has made room ahead of its done frames) and one that
failed before it had frames, with a stand-in for the daemon's status that reports problems.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.store import StoreReader, schema
from pipeline.store.writer import mark_failed
from pipeline.testing.truth_stores import TruthStoreWriter
from pipeline.testing.web import browser_errors, element_pixels, get, wait_in_page, web_server
from pipeline.web.render import grey

PROBLEMS = ["watch.dirs /data/visit-9: does not exist", "worker gpu1: exited 3 times in 60 s; not restarted"]
REASON = "failed.nxs: not an HDF5 file"


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        done = TruthStoreWriter(root, "done", 6, seed=3, n_peaks=2)
        done.write(6)
        done.finish()
        self.done = done.store_path
        self.live_writer = TruthStoreWriter(root, "live", 20, seed=5, n_peaks=2)
        self.live_writer.write(5)
        # room ahead of the done frames, as the daemon's writer makes, here past the 20 the file claims (a file may grow
        # beyond its claim; within it the writer grows to the claim exactly): the allocated length is neither count
        self.live_writer.store.ensure_frames(24)
        self.live = self.live_writer.store_path
        mark_failed(root / "failed.zarr", REASON, make_parents=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("web-pages"))


@pytest.fixture(scope="module")
def web(site: Site) -> Iterator[Any]:
    status = {"pid": 4242, "version": "test", "uptime_s": 5.0, "dispatch": {"workers": [], "queued": 0, "in_flight": 0},
              "waiting_scans": 0, "scans": [], "problems": PROBLEMS,
              "slurm_workers": {"name": "pipeline-worker-i16-control-4242", "wanted": 2, "max_jobs": 4, "unable": None,
                                "jobs": [{"job_id": "812", "state": "RUNNING", "reason": None, "node": "cs05r-sc-gpu01"},
                                         {"job_id": "813", "state": "PENDING", "reason": "Resources", "node": None}]}}
    with web_server([site.root], daemon_status=lambda: status) as server:
        yield server


def url(web: Any, path: str) -> str:
    return f"http://127.0.0.1:{web.port}{path}"


def test_the_front_page_shows_the_daemons_problems_and_one_count(site, web, browser, tmp_path):
    browser.get(url(web, "/"))
    wait_in_page(browser, "document.querySelectorAll('#scans tbody tr').length === 3", 20, "three scans listed")
    wait_in_page(browser, "!document.getElementById('problems').hidden", 10, "the daemon's problems shown")
    shown = browser.execute_script("return [...document.querySelectorAll('#problem-list li')].map((li) => li.textContent)")
    assert shown == PROBLEMS
    box = browser.execute_script("const r = document.getElementById('problems').getBoundingClientRect(); return [r.top, r.height]")
    table_top = browser.execute_script("return document.getElementById('scans').getBoundingClientRect().top")
    assert box[1] > 40 and box[0] < table_top  # above the scans, where it is seen first
    daemon = browser.execute_script("return document.getElementById('daemon').textContent")
    assert daemon.endswith("; SLURM job 812 RUNNING on cs05r-sc-gpu01, job 813 PENDING (Resources)"), daemon
    done = StoreReader(site.live).done_frames().size
    frames = browser.execute_script("return document.querySelector('tr[data-id=\"live\"] .frames').textContent")
    assert frames == f"{done} of 20" and StoreReader(site.live).frames_total not in (done, 20)  # the allocated length is no count
    failed = browser.execute_script("return document.querySelector('tr[data-id=\"failed\"] .status-cell').innerText")
    assert failed.count(REASON) == 1
    browser.save_screenshot(str(tmp_path / "front.png"))
    assert browser_errors(browser) == []


def test_a_running_scans_page_counts_as_the_front_page_and_the_api(site, web, browser):
    browser.get(url(web, "/scans/live"))
    wait_in_page(browser, "document.getElementById('progress').textContent.includes('frames done')", 20, "the progress line")
    done = StoreReader(site.live).done_frames().size
    progress = browser.find_element("id", "progress").text
    assert progress.startswith(f"{done} of 20 frames done"), progress
    listed = next(scan for scan in get(url(web, "/api/scans")).json()["scans"] if scan["id"] == "live")
    assert (listed["frames_done"], listed["frames_expected"]) == (done, 20)


def test_the_frame_has_a_colour_bar_with_the_scale_it_uses(site, web, browser, tmp_path):
    browser.get(url(web, "/scans/done"))
    image = "document.getElementById('frame-image')"
    wait_in_page(browser, f"{image}.complete && {image}.naturalWidth > 0 && !document.getElementById('colour-bar').hidden", 20,
                 "the frame and its colour bar")
    with StoreReader(site.done).raw_frames() as dataset:
        raw = np.asarray(dataset[5])
    top = float(np.clip(raw, 0, None).max())
    for scale in ("log", "linear"):
        if scale == "linear":
            browser.execute_script("const s = document.getElementById('scale'); s.value = 'linear'; s.dispatchEvent(new Event('change'));")
        wait_in_page(browser, f"document.getElementById('colour-bar').dataset.scale === '{scale}' && {image}.complete", 10, scale)
        bar = browser.execute_script("const b = document.getElementById('colour-bar'); return [b.dataset.max, "
                                     "document.getElementById('colour-bar-title').textContent]")
        assert float(bar[0]) == top and bar[1] == f"counts, {scale} scale"
        shot = tmp_path / f"colour-bar-{scale}.png"
        ramp = element_pixels(browser, shot, "#colour-bar-ramp")[1:-1, 1:-1]  # inside its 1 px border
        frame = element_pixels(browser, shot, "#frame-image")
        assert abs(ramp.shape[0] - frame.shape[0]) < 0.25 * frame.shape[0]  # beside the picture, about as tall
        column = ramp[:, ramp.shape[1] // 2, 0].astype(int)
        assert column[0] > 245 and column[-1] < 10 and (np.diff(column) <= 1).all()  # white at the top to black, evenly
        ticks = browser.execute_script(
            "const ramp = document.getElementById('colour-bar-ramp').getBoundingClientRect();"
            "return [...document.querySelectorAll('.colour-bar-tick')].map((t) => { const r = t.getBoundingClientRect();"
            " return [Number(t.dataset.value), t.textContent, (r.top + r.bottom) / 2 - ramp.top - 1]; })")
        assert len(ticks) >= 3 and ticks[-1][0] == top
        for value, text, y in ticks:  # each tick sits where the ramp has the grey that the picture gives its count
            expected = int(grey(np.array([value, top]), scale)[0])  # the grey of `value` in a frame whose top is `top`
            row = int(round(min(max(y, 0), column.size - 1)))
            assert abs(column[row] - expected) <= 6, (scale, value, text, column[row], expected)
        labels = [text for _, text, _ in ticks]
        assert (labels[0] == "≤ 1") if scale == "log" else (labels[0] == "0")
    browser.save_screenshot(str(tmp_path / "scan.png"))
    assert browser_errors(browser) == []


def test_a_failed_scans_page_says_why_once_and_shows_no_empty_pictures(site, web, browser, tmp_path):
    browser.get(url(web, "/scans/failed"))
    wait_in_page(browser, "document.body.dataset.status === 'failed' && !document.getElementById('no-frames').hidden", 20,
                 "the failed scan's page")
    text = browser.execute_script("return document.body.innerText")
    assert text.count(REASON) == 1, text
    assert browser.find_element("id", "reason").text == REASON
    assert not browser.find_element("id", "problem").is_displayed()
    shown_images = browser.execute_script("return [...document.images].filter((i) => i.getClientRects().length > 0).length")
    assert shown_images == 0
    for section in ("frame-section", "projection-section", "curves-section", "peaks-section"):
        assert not browser.find_element("id", section).is_displayed(), section
    assert "nothing to show" in browser.find_element("id", "no-frames").text
    browser.save_screenshot(str(tmp_path / "failed.png"))
    assert browser_errors(browser) == []
    detail = get(url(web, "/api/scans/failed")).json()
    assert detail["status"] == schema.STATUS_FAILED and detail["end_reason"] == REASON
