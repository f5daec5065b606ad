"""A drained stop waits for the quick looks still to draw only for a while, and leaves no drawing process behind.

Drawing a picture reads the scan's raw file in the painter's child, and a raw file can block that read for
ever (pixels in a FIFO; design notes: HDF5 and hostile files). The stop used to wait for the painter
until the end of its minute, then stop the workers: past the minute a supervisor (and `stop_daemon`)
gives, and the blocked child outlived the daemon. A backlog of pictures did the same on a loaded machine
(scripts/scan_setup_bench.py: 40 small scans finished at once, the stop 20-30 s, once over 60 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from pipeline.live.daemon import PICTURES_AT_STOP_S
from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store import open_live, store_status
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import poll, start_daemon, wait_for_workers

pytestmark = pytest.mark.daemon


def _painter_children(pid: int) -> list[int]:
    """The daemon's quick-look child processes (`python -m pipeline.live.painter`)."""
    children = []
    for line in subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout.splitlines():
        child, _, args = line.strip().partition(" ")
        if "pipeline.live.painter" in args:
            children.append(int(child))
    return children


def _pixels_behind_a_fifo(raw: Path, dataset: str) -> Path:
    """Replace `raw` by an HDF5 file whose `dataset` has the same shape and dtype, its pixels stored in a FIFO (HDF5
    external storage): a read of them blocks until something writes there. Returns the FIFO."""
    with h5py.File(raw, "r", locking=False) as source:
        shape, dtype = source[dataset].shape, source[dataset].dtype
    fifo = raw.with_name("pixels.fifo")
    os.mkfifo(fifo)
    replacement = raw.with_name(raw.name + ".new")
    with h5py.File(replacement, "w") as target:
        target.create_dataset(dataset, shape=shape, dtype=dtype, external=[(str(fifo), 0, h5py.h5f.UNLIMITED)])
    os.replace(replacement, raw)
    return fifo


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_blocked_quick_look_holds_the_stop_only_briefly(tmp_path: Path) -> None:
    scans, staged = tmp_path / "scans", tmp_path / "staged"
    scans.mkdir()
    staged.mkdir()
    write_scan(ScanPlan(directory=staged, name="blocked", layout="gda9", n_frames=3, rate_hz=1000.0, seed=5))
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF, follow={"idle_timeout_s": 5.0})
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, scans, log)
    fifo: Path | None = None
    painters: list[int] = []
    try:
        wait_for_workers(config, 1)
        for item in staged.iterdir():
            os.rename(item, scans / item.name)
        store = scans / "blocked.zarr"
        assert poll(lambda: store_status(store) == "complete", timeout=120, interval=0.005), log.read_text()[-3000:]
        # the raw file's pixels move into a FIFO before the painter's child (a second or more of imports) reads them:
        # that read then blocks for ever, as a hostile file can make it
        attrs = open_live(store).attrs
        fifo = _pixels_behind_a_fifo(Path(str(attrs["source_file"])), str(attrs["source_dataset"]))
        assert poll(lambda: bool(_painter_children(daemon.pid)), timeout=30), "no quick-look process started"
        painters = _painter_children(daemon.pid)
        time.sleep(1.0)  # the child at its picture
        stopping = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=PICTURES_AT_STOP_S + 25)  # was: the whole minute for the painter, then the workers' stop
        took = time.monotonic() - stopping
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if fifo is not None:  # let a reader still blocked on it go (its open returns, the read finds nothing)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert daemon.returncode == 0, log.read_text()[-3000:]
    assert took < PICTURES_AT_STOP_S + 20, f"stop took {took:.1f} s"
    assert poll(lambda: not any(_alive(pid) for pid in painters), timeout=5), f"quick-look process(es) {painters} outlived the daemon"
    text = log.read_text()
    assert "1 quick look(s) not drawn" in text and str(store) in text, text[-3000:]
    assert not (scans / "blocked.quicklook.png").exists()
    assert store_status(store) == "complete"  # the store itself was finished before, and stays so


def test_a_complete_store_without_its_quick_look_gets_it_at_the_next_start_and_is_not_rewritten(tmp_path: Path) -> None:
    """The stop above leaves a complete store without its picture; the next start draws it, and only it."""
    import sys

    write_scan(ScanPlan(directory=tmp_path, name="undrawn", layout="gda9", n_frames=4, rate_hz=1000.0, seed=8))
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF)
    command = [sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(tmp_path / "undrawn.nxs")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    store, picture = tmp_path / "undrawn.zarr", tmp_path / "undrawn.quicklook.png"
    assert picture.is_file() and store_status(store) == "complete"
    picture.unlink()  # as a stop that ran out of time for pictures leaves it
    metadata = {path: path.stat().st_mtime_ns for path in store.rglob("zarr.json")}
    ended = open_live(store).attrs["end_time"]

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "its quick look was never drawn: drawing it" in again.stderr, again.stderr[-2000:]
    assert picture.is_file() and picture.read_bytes().startswith(b"\x89PNG")
    assert store_status(store) == "complete" and open_live(store).attrs["end_time"] == ended
    assert {path: path.stat().st_mtime_ns for path in store.rglob("zarr.json")} == metadata  # not processed again

    third = subprocess.run(command, capture_output=True, text=True, timeout=300)  # with its picture: left alone
    assert third.returncode == 0 and "never drawn" not in third.stderr, third.stderr[-2000:]
