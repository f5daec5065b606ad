"""How the live web view holds up under many scans and one long scan: load times and the server's memory.

Builds (once, then reused) a root with STORES small finished stores (one written by the project's
writer, then copied) and one store of FRAMES frames (written by the project's writer from a
simulated scan that repeats every 200 frames), starts the real `pipeline web` on it as its own
process, and prints: how long until its first look at every store is served, how long the front
page, `/api/scans`, a scan's details, a frame picture and a full projection take, how long until
the long scan's projection covers all its frames, the server's RSS (sampled every 0.1 s), and,
with Debian's chromium there, how long a browser takes until each page shows its data.

Usage: python scripts/web_bench.py [--stores 300] [--frames 10000] [--data DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from pipeline.testing.configs import free_port
from pipeline.testing.daemons import wait_until
from pipeline.testing.truth_stores import TruthStoreWriter
from pipeline.testing.web import CHROMEDRIVER, CHROMIUM, chromium, events, get

BLOCK = 250  # frames the long store is written in at once


def build(data: Path, stores: int, frames: int) -> Path:
    """The root, made once per (stores, frames) and kept under `data`."""
    root = data / f"root-{stores}-{frames}"
    if (root / ".ready").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    small = TruthStoreWriter(root / "visit-small", "scan-0000", 8, seed=3, n_peaks=2)
    small.write(8)
    small.finish()
    for index in range(1, stores):
        shutil.copytree(small.store_path, root / "visit-small" / f"scan-{index:04d}.zarr")
    print(f"built {stores} small stores in {time.monotonic() - started:.1f} s", flush=True)
    started = time.monotonic()
    long = TruthStoreWriter(root / "visit-long", "long-scan", frames, seed=5, n_peaks=None, period=200, table_every=frames)
    while long.written < frames:
        long.write(BLOCK)
    long.finish()
    print(f"built a store of {frames} frames ({len(long.linker.peaks)} 3D peaks) in {time.monotonic() - started:.1f} s", flush=True)
    (root / ".ready").touch()
    return root


class RssSampler:
    """The server process's resident memory, sampled every 0.1 s on a thread: now and the highest seen."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.now())
            except psutil.Error:
                return
            time.sleep(0.1)

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed(url: str, times: int) -> dict[str, float]:
    """Median and slowest of `times` GETs (ms), and the answer's size (bytes)."""
    took: list[float] = []
    size = 0
    for _ in range(times):
        started = time.perf_counter()
        answer = get(url)
        took.append((time.perf_counter() - started) * 1000)
        assert answer.status == 200, (url, answer.status, answer.body[:200])
        size = len(answer.body)
    return {"median_ms": round(statistics.median(took), 1), "max_ms": round(max(took), 1), "bytes": size}


def browser_times(base: str, stores: int, long_id: str) -> dict[str, float]:
    """ms from navigation start until the front page lists every scan, and until the long scan's page shows its frame and curves."""
    driver = chromium()
    try:
        driver.get(base + "/")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and driver.execute_script("return document.querySelectorAll('#scans tbody tr').length") < stores + 1:
            time.sleep(0.02)
        front = driver.execute_script("return performance.now()")
        driver.get(f"{base}/scans/{long_id}")
        script = ("const i = document.getElementById('frame-image'), c = document.getElementById('curves');"
                  "return i.complete && i.naturalWidth > 0 && Number(c.dataset.series) > 0")
        while time.monotonic() < deadline + 60 and not driver.execute_script(script):
            time.sleep(0.02)
        scan = driver.execute_script("return performance.now()")
        return {"front_page_all_rows_ms": round(front, 1), "scan_page_frame_and_curves_ms": round(scan, 1)}
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=300)
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--data", type=Path, default=Path("/tmp/web-bench"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    root = build(args.data, args.stores, args.frames)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "web", "--root", str(root), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rss = RssSampler(server.pid)
    base = f"http://127.0.0.1:{port}"
    figures: dict[str, Any] = {"stores": args.stores + 1, "long_scan_frames": args.frames}
    long_id = "visit-long/long-scan"
    try:
        started = time.monotonic()
        wait_until(lambda: _answers(base), 60, "pipeline web answering")
        answer = get(base + "/api/scans")  # waits for the first look at every store
        assert len(answer.json()["scans"]) == args.stores + 1, len(answer.json()["scans"])
        figures["first_scans_list_s"] = round(time.monotonic() - started, 2)
        figures["rss_mib_after_first_look"] = round(rss.now() / 2**20, 1)
        figures["front_page_html"] = timed(base + "/", 20)
        figures["api_scans"] = timed(base + "/api/scans", 20)
        figures["api_scan_detail_long"] = timed(f"{base}/api/scans/{long_id}", 10)
        figures["api_frame_png_long"] = timed(f"{base}/api/frame/{long_id}?frame={args.frames - 1}", 10)
        started = time.monotonic()
        events(port, f"/api/stream/{long_id}", lambda name, data: name == "scan" and data["view"]["frames_covered"] == args.frames,
               timeout=600)
        figures["projection_covers_all_frames_s"] = round(time.monotonic() - started, 1)
        figures["api_projection_png_long"] = timed(f"{base}/api/projection/{long_id}", 5)
        figures["api_curves_long"] = timed(f"{base}/api/curves/{long_id}", 5)
        figures["rss_mib_after_long_scan"] = round(rss.now() / 2**20, 1)
        if CHROMIUM.exists() and CHROMEDRIVER.exists():
            figures["browser"] = browser_times(base, args.stores, long_id)
        figures["rss_mib_peak"] = round(rss.peak / 2**20, 1)
    finally:
        rss.stop()
        server.terminate()
        server.wait(timeout=30)
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _answers(base: str) -> bool:
    try:
        return get(base + "/static/style.css").status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
