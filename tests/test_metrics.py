"""The Prometheus endpoint of a real daemon reports what it did."""

from __future__ import annotations

import urllib.request

import pytest

from pipeline.config import load_config
from pipeline.live.daemon import Daemon
from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.testing.configs import write_config

pytestmark = pytest.mark.daemon


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_frames_latency_workers_and_scans(tmp_path, untrained_weights):
    plan = ScanPlan(directory=tmp_path, name="metrics", layout="nexus", n_frames=5, rate_hz=100.0, seed=4)
    write_scan(plan)
    config = load_config(write_config(tmp_path / "c.yaml", untrained_weights, daemon={"metrics_port": 0}, follow={"idle_timeout_s": 2.0}))
    daemon = Daemon(config, watch=False).start()
    try:
        before = _scrape(daemon.metrics_port)
        assert before["pipeline_frames_done_total"] == 0
        daemon.add_scan(plan.nxs_path)
        assert daemon.wait_idle(timeout=120)
        after = _scrape(daemon.metrics_port)
    finally:
        daemon.shutdown()
    assert after["pipeline_frames_done_total"] == 5
    assert after["pipeline_frame_latency_seconds_count"] == 5
    assert after["pipeline_frame_latency_seconds_sum"] > 0
    assert after["pipeline_workers"] == 1
    assert after['pipeline_scans{status="complete"}'] == 1
    assert after["pipeline_queue_frames"] == 0 and after["pipeline_rejected_total"] == 0
