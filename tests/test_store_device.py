"""The store says which device its frames were really made on, not what the daemon's config asked for.

Facilities run GPU workers on SLURM or Kubernetes under a daemon whose own `workers.device` is `cpu`
(it has no GPU) or `auto`; the store's `device` attribute is what a reader uses to compare runs. A real
daemon with no local workers and a device it does not have, a real `pipeline worker --device cpu`
joining it from outside, a scan written by the simulator: the store ends saying `cpu`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store import StoreReader, schema
from pipeline.testing.configs import MODELS_OFF, free_port, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers


def test_the_store_records_the_device_its_workers_used(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF, workers={"local": 0, "device": "cuda:3", "bind": endpoint})
    scans = tmp_path / "scans"
    scans.mkdir()
    daemon = start_daemon(config, scans, tmp_path / "daemon.log")
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--config", str(config), "--connect", endpoint,
                               "--device", "cpu", "--name", "outside"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_workers(config, 1)
        plan = ScanPlan(directory=scans, name="scan-1", layout="gda9", n_frames=5, rate_hz=50.0, seed=1)
        write_scan(plan)
        store = plan.nxs_path.with_suffix(".zarr")
        wait_for_status([store], timeout=120)
    finally:
        stop_daemon(daemon)
        worker.wait(timeout=60)
    reader = StoreReader(store)
    assert reader.status == schema.STATUS_COMPLETE, (tmp_path / "daemon.log").read_text()[-3000:]
    assert reader.attrs[schema.Attr.DEVICE] == "cpu"
    assert reader.attrs["config"]["workers"]["device"] == "cuda:3"  # what was asked stays in the config it records
