"""Crashes mid-scan, for real: the finished store equals an undisturbed run, with no frame lost or doubled."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.store import open_live
from pipeline.testing.configs import write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers
from pipeline.testing.stores import assert_stores_equal, done_count, process_offline

pytestmark = pytest.mark.daemon


def test_daemon_killed_mid_scan_resumes_to_the_same_store(tmp_path, untrained_weights):
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, follow={"idle_timeout_s": 20.0})
    plan = ScanPlan(directory=scans, name="crash", layout="gda9", n_frames=16, rate_hz=3.0, seed=11)
    store = plan.nxs_path.with_suffix(".zarr")
    daemon = start_daemon(config, scans, tmp_path / "first.log")
    wait_for_workers(config, 1)
    writer = ScanWriter(plan).start()
    deadline = time.monotonic() + 120
    while done_count(store) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    done_at_kill = done_count(store)
    children = psutil.Process(daemon.pid).children(recursive=True)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    assert 4 <= done_at_kill < 16, done_at_kill
    psutil.wait_procs(children, timeout=10)  # local workers leave with their daemon
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert open_live(store).attrs["status"] == "running"  # the crash left it unfinished, not lying
    writer.join(timeout=60)

    restarted = start_daemon(config, scans, tmp_path / "second.log")
    try:
        wait_for_status([store], timeout=180)
    finally:
        stop_daemon(restarted)
    log = (tmp_path / "second.log").read_text()
    assert "resuming at frame" in log
    group = open_live(store)
    assert group.attrs["status"] == "complete", dict(group.attrs)
    assert group["frames/done"][:].tolist() == [1] * 16
    process_offline(config, plan.nxs_path, tmp_path / "offline")
    assert_stores_equal(store, tmp_path / "offline" / store.name)


def test_worker_killed_mid_scan_its_frames_go_elsewhere(tmp_path, untrained_weights):
    from pipeline.config import load_config
    from pipeline.live.daemon import Daemon

    scans = tmp_path / "scans"
    scans.mkdir()
    config_path = write_config(tmp_path / "config.yaml", untrained_weights, watch={"dirs": [str(scans)]},
                               workers={"local": 2, "timeout_s": 3.0, "heartbeat_s": 0.5, "credit": 4})
    config = load_config(config_path)
    frames_done: list[tuple[str, int]] = []
    daemon = Daemon(config, on_frame_done=lambda scan, index, timings: frames_done.append((scan, index))).start()
    plan = ScanPlan(directory=scans, name="worker-crash", layout="nexus", n_frames=16, rate_hz=4.0, seed=12)
    store = plan.nxs_path.with_suffix(".zarr")
    try:
        deadline = time.monotonic() + 120
        while len(daemon.dispatcher.stats()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        writer = ScanWriter(plan).start()
        while time.monotonic() < deadline:
            busy = [w for w in daemon.dispatcher.stats()["workers"] if w["in_flight"] > 0]
            if busy and done_count(store) >= 2:
                break
            time.sleep(0.02)
        victim = busy[0]
        os.kill(victim["pid"], signal.SIGKILL)
        writer.join(timeout=60)
        wait_for_status([store], timeout=180)
        stats = daemon.dispatcher.stats()
    finally:
        daemon.shutdown()
    assert stats["workers_lost"] >= 1
    assert stats["redispatched"] >= 1
    indices = [index for _, index in frames_done]
    lost, doubled = set(range(16)) - set(indices), len(indices) - len(set(indices))
    assert (lost, doubled) == (set(), 0)
    group = open_live(store)
    assert group.attrs["status"] == "complete"
    assert group["frames/done"][:].tolist() == [1] * 16
    process_offline(config_path, plan.nxs_path, tmp_path / "offline")
    assert_stores_equal(store, tmp_path / "offline" / store.name)
