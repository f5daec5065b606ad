"""Back-pressure. Workers far slower than the detector: memory stays bounded (credit-based flow),
frames wait in the file, nothing is dropped.

A real `pipeline run` daemon with one real worker process, made slow on purpose with the worker's
test kit's slow worker (`pipeline.testing.slow_worker`, `PIPELINE_WORKER_DELAY_S` in the daemon's
environment, so only its workers are slow), follows a scan written at 50 Hz, more
than 15 times faster than the worker takes it (0.3 s per frame; the models are off, the delay is the work). While
it works, the test samples what `pipeline status --json` reports (through the same `query_status`
call) and the daemon process's RSS (psutil).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from pipeline.live.control import query_status
from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.store import open_live
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers
from pipeline.testing.slow_worker import DELAY_ENV
from pipeline.testing.stores import assert_stores_equal

pytestmark = pytest.mark.daemon

N_FRAMES = 60
RATE_HZ = 50.0
WORKER_DELAY_S = 0.3  # per frame, on top of the models' own time
CREDIT = 4
MIB = 2**20


def test_a_slow_worker_holds_memory_bounded_frames_wait_in_the_file_and_none_is_dropped(tmp_path, untrained_weights, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    audit = tmp_path / "audit.jsonl"
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF,  # the delay alone makes the worker slow
                          workers={"local": 1, "credit": CREDIT, "batch_size": 4, "timeout_s": 20.0,
                                   "command": [sys.executable, "-m", "pipeline.testing.slow_worker"]},
                          follow={"idle_timeout_s": 10.0}, daemon={"audit_log": str(audit)})
    # the bound on frames the daemon holds: a worker's credit, plus the dispatcher's queue (Daemon: max(16, 2 * credit))
    queue_limit = max(16, CREDIT * 2)
    bound = CREDIT + queue_limit
    endpoint = yaml.safe_load(config.read_text())["daemon"]["control"]

    with monkeypatch.context() as patch:  # only the daemon (and the worker it starts) is slow, not `pipeline process` below
        patch.setenv(DELAY_ENV, str(WORKER_DELAY_S))
        daemon = start_daemon(config, scans, tmp_path / "daemon.log")
    plan = ScanPlan(directory=scans, name="flood", layout="nexus", n_frames=N_FRAMES, rate_hz=RATE_HZ, seed=50)
    store = plan.nxs_path.with_suffix(".zarr")
    samples: list[dict] = []  # one per status poll while the scan runs
    offline, offline_log = None, tmp_path / "offline.log"
    try:
        wait_for_workers(config, 1)
        process = psutil.Process(daemon.pid)
        rss_idle = process.memory_info().rss
        writer = ScanWriter(plan).start()
        read_when_written = None  # frames the daemon had read when the whole scan was in the file
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = query_status(endpoint, timeout_s=5.0)
            assert status is not None, "the daemon stopped answering"
            scan = next((s for s in status["scans"] if s["path"] == str(plan.nxs_path)), None)
            dispatch = status["dispatch"]
            samples.append({"queued": dispatch["queued"], "in_flight": dispatch["in_flight"], "rss": process.memory_info().rss,
                            "read": scan["frames_read"] if scan else 0, "done": scan["frames_done"] if scan else 0})
            if read_when_written is None and not writer.is_alive():
                writer.join()
                read_when_written, done_when_written = samples[-1]["read"], samples[-1]["done"]
                # the file is whole: `pipeline process` of it runs meanwhile (the slow worker mostly sleeps)
                offline = subprocess.Popen([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--output-root",
                                            str(tmp_path / "offline"), "--no-progress", str(plan.nxs_path)],
                                           stdout=offline_log.open("w"), stderr=subprocess.STDOUT)
            if scan is not None and scan["status"] in ("complete", "incomplete", "failed"):
                break
            time.sleep(0.2)
        wait_for_status([store], timeout=10)
        final = query_status(endpoint, timeout_s=5.0)["dispatch"]
    finally:
        stop_daemon(daemon)
        if offline is not None:
            offline.wait(timeout=300)
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert f"{DELAY_ENV}: this worker sleeps" in log  # the worker really was slowed down

    held = [s["queued"] + s["in_flight"] for s in samples]
    quarter = next(i for i, s in enumerate(samples) if s["done"] >= N_FRAMES // 4)
    rss_quarter = samples[quarter]["rss"]
    rss_after = max(s["rss"] for s in samples[quarter:])
    growth = rss_after - rss_quarter
    print(f"\nback-pressure: {N_FRAMES} frames written at {RATE_HZ:g} Hz, one worker at +{WORKER_DELAY_S} s/frame, "
          f"{len(samples)} status samples")
    print(f"  frames held by the daemon (queued + in flight): max {max(held)} (queued max {max(s['queued'] for s in samples)}, "
          f"in flight max {max(s['in_flight'] for s in samples)}); bound {bound} = credit {CREDIT} + queue {queue_limit}")
    print(f"  frames read when the writer had written all {N_FRAMES}: {read_when_written} ({done_when_written} done); "
          f"max frames read but not yet done: {max(s['read'] - s['done'] for s in samples)}")
    print(f"  daemon RSS: idle {rss_idle / MIB:.1f} MiB, at {N_FRAMES // 4} frames done {rss_quarter / MIB:.1f} MiB, "
          f"max after {rss_after / MIB:.1f} MiB, end {samples[-1]['rss'] / MIB:.1f} MiB; growth after the first quarter "
          f"{growth / MIB:+.1f} MiB (the scan's frames: {N_FRAMES * 195 * 487 * 4 / MIB:.1f} MiB)")
    print(f"  dispatcher: {final}")

    # memory bounded: never more frames in the daemon than credit + queue, and no growth as the scan goes on
    assert max(held) <= bound, held
    assert max(s["queued"] for s in samples) == queue_limit  # the queue did fill: back-pressure was exercised
    assert growth < 150 * MIB, growth
    # frames waited in the file: when the detector had written them all, most were still unread
    assert read_when_written is not None and read_when_written < N_FRAMES // 2, read_when_written
    # nothing dropped or doubled
    group = open_live(store)
    assert group.attrs["status"] == "complete", dict(group.attrs)
    assert group["frames/done"][:].tolist() == [1] * N_FRAMES
    assert (final["sent"], final["results"]) == (N_FRAMES, N_FRAMES), final
    assert (final["redispatched"], final["failed"], final["rejected"], final["workers_lost"]) == (0, 0, 0, 0), final
    lines = [json.loads(line) for line in audit.read_text().splitlines()]  # `pipeline process` below appends its own
    done = [line["frame"] for line in lines if line["pid"] == daemon.pid and line["scan"] == str(plan.nxs_path)]
    assert sorted(done) == list(range(N_FRAMES)), done  # each frame done exactly once
    assert offline.returncode == 0, offline_log.read_text()[-3000:]
    assert_stores_equal(store, tmp_path / "offline" / store.name)
