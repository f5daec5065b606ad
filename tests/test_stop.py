"""SIGTERM drains and closes every store consistently; a second SIGTERM stops at once, still without
corruption; either way a restart finishes the scan to the same store as an undisturbed run."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.store import open_live
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers
from pipeline.testing.stores import assert_stores_equal, done_count, process_offline

pytestmark = pytest.mark.daemon


def _run_until(config, scans, plan, log, frames_done: int, signals: int):
    daemon = start_daemon(config, scans, log)
    wait_for_workers(config, 1)
    writer = ScanWriter(plan).start()
    store = plan.nxs_path.with_suffix(".zarr")
    deadline = time.monotonic() + 120
    while done_count(store) < frames_done and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(signals):
        daemon.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    daemon.wait(timeout=60)
    return daemon, writer, store


def test_sigterm_drains_then_a_restart_completes_the_scan(tmp_path, untrained_weights):
    scans = tmp_path / "scans"
    scans.mkdir()
    # models off: frames are done as soon as they are read, so the stop comes while the writer still has frames to write
    # (with the models on a loaded machine, 3 frames done could take longer than the whole scan)
    config = write_config(tmp_path / "config.yaml", untrained_weights, follow={"idle_timeout_s": 20.0}, models=MODELS_OFF)
    plan = ScanPlan(directory=scans, name="drain", layout="gda9", n_frames=14, rate_hz=2.5, seed=31)
    daemon, writer, store = _run_until(config, scans, plan, tmp_path / "first.log", frames_done=3, signals=1)
    assert daemon.returncode == 0
    group = open_live(store)
    assert group.attrs["status"] == "incomplete" and group.attrs["end_reason"] == "stopped"
    done = group["frames/done"][:]
    assert done.sum() >= 3 and done.tolist() == [1] * int(done.sum()) + [0] * (len(done) - int(done.sum()))  # drained: a clean prefix
    writer.join(timeout=60)

    restarted = start_daemon(config, scans, tmp_path / "second.log")
    try:
        wait_for_status([store], timeout=180, wanted=("complete", "failed"))
    finally:
        stop_daemon(restarted)
    assert open_live(store)["frames/done"][:].tolist() == [1] * 14
    process_offline(config, plan.nxs_path, tmp_path / "offline")
    assert_stores_equal(store, tmp_path / "offline" / store.name)


def test_second_sigterm_stops_at_once_and_done_frames_stay_true(tmp_path, untrained_weights):
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, follow={"idle_timeout_s": 20.0})
    plan = ScanPlan(directory=scans, name="abrupt", layout="nexus", n_frames=14, rate_hz=3.0, seed=32)
    daemon, writer, store = _run_until(config, scans, plan, tmp_path / "first.log", frames_done=3, signals=2)
    assert daemon.returncode == 128 + signal.SIGTERM  # not a normal end: frames in flight were left
    assert (open_live(store).attrs["status"], open_live(store).attrs["end_reason"]) == ("incomplete", "stopped")  # never `running`
    writer.join(timeout=60)
    process_offline(config, plan.nxs_path, tmp_path / "offline")
    reference = open_live(tmp_path / "offline" / store.name)
    group = open_live(store)
    done = np.flatnonzero(group["frames/done"][:])
    assert done.size >= 3
    for index in done:  # every frame marked done is exactly what an undisturbed run wrote
        for name in ("tlm/labels", "ssl/clusters", "ssl/mask", "volume/labels"):
            np.testing.assert_array_equal(group[name][index], reference[name][index], err_msg=f"{name} {index}")

    restarted = start_daemon(config, scans, tmp_path / "second.log")
    try:
        wait_for_status([store], timeout=180, wanted=("complete", "failed"))
    finally:
        stop_daemon(restarted)
    assert_stores_equal(store, tmp_path / "offline" / store.name)


def test_ctrl_c_in_the_terminal_leaves_the_store_saying_stopped(tmp_path, untrained_weights):
    """Ctrl-C signals the terminal's whole process group: the daemon and, before, its workers too (whose frames in
    flight then never came back, so the store said `running` for ever). Now the store ends `incomplete`/`stopped`."""
    import os
    import subprocess
    import sys

    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, follow={"idle_timeout_s": 20.0})  # models on: frames in flight
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(scans)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # its own group, as a shell's job
    try:
        wait_for_workers(config, 1)
        plan = ScanPlan(directory=scans, name="interrupted", layout="gda9", n_frames=60, rate_hz=5.0, seed=33)
        writer = ScanWriter(plan).start()
        store = plan.nxs_path.with_suffix(".zarr")
        deadline = time.monotonic() + 120
        while done_count(store) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(daemon.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        daemon.wait(timeout=90)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    writer.kill()
    assert daemon.returncode == 0, log.read_text()[-2000:]
    group = open_live(store)
    assert group.attrs["status"] == "incomplete" and group.attrs["end_reason"] == "stopped", dict(group.attrs)
    done = group["frames/done"][:]
    assert 2 <= done.sum() < 60


@pytest.mark.parametrize("signal_name, count", [("SIGINT", 1), ("SIGTERM", 1), ("SIGINT", 2)])
def test_process_stopped_by_a_signal_says_what_was_left_and_a_rerun_resumes(tmp_path, signal_name, count):
    """Issue 26: one Ctrl-C of `pipeline process` was ignored until the scan ended, two (or a SIGTERM) left the store
    `running`, and SIGTERM exited 0. Now: non-zero (128 + the signal), one line saying what was left, the store
    `incomplete`/`stopped`, and the same command again completes it."""
    import os
    import subprocess
    import sys

    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", follow={"idle_timeout_s": 20.0}, models=MODELS_OFF)
    n_frames = 80  # 20 s of writing: the signal must come while the scan is still being written, even on a slow machine
    plan = ScanPlan(directory=scans, name="interrupted", layout="gda9", n_frames=n_frames, rate_hz=4.0, seed=34)
    writer = ScanWriter(plan).start()
    store = plan.nxs_path.with_suffix(".zarr")
    command = [sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(plan.nxs_path)]
    deadline = time.monotonic() + 60
    while not plan.nxs_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while done_count(store) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(count):
            os.killpg(process.pid, getattr(signal, signal_name))  # the terminal's Ctrl-C reaches the whole group
            time.sleep(0.2)
        stopped_at = time.monotonic()
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + getattr(signal, signal_name), err[-3000:]
    assert took < 30, took
    group = open_live(store)
    assert (group.attrs["status"], group.attrs["end_reason"]) == ("incomplete", "stopped"), dict(group.attrs)
    done = int(group["frames/done"][:].sum())
    assert 3 <= done < n_frames
    assert f"interrupted.nxs: incomplete (stopped) -> {store}" in out
    assert f"interrupted.nxs: incomplete (stopped), {done}/{n_frames} frames done, " in err  # the scan's, not those read
    summary = [line for line in err.splitlines() if line.startswith(f"stopped by {signal_name}")]
    assert summary == [f"stopped by {signal_name}: 0 of 1 scan(s) complete, {n_frames - done} frame(s) not done; "
                       "the same command again resumes them"], err[-3000:]
    if (signal_name, count) != ("SIGINT", 1):
        writer.kill()  # the resume is checked once, below
        return
    writer.join(timeout=60)
    again = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming at frame {done}" in again.stderr
    group = open_live(store)
    assert group.attrs["status"] == "complete" and group["frames/done"][:].tolist() == [1] * n_frames
