"""Descriptor exhaustion costs a scan a retry, never the scan: 400 idle connections under a 300-descriptor limit.

A real `pipeline run` starts with its open-file limit at 300 (soft and hard, so it cannot raise
it). A hostile local process keeps 400 plain TCP connections open to the worker port, opening a
new one whenever the daemon drops one, while a finished scan appears. Before, the scan failed
with EMFILE for good, unrecorded, and status stopped answering. Now the scan stalls ("waiting for
file descriptors" in the log), idle connections are dropped after the handshake interval, and
once the attack stops the scan is tried again by itself and completes; status answers again.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.live.control import query_status
from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store import StoreReader, schema, store_status
from pipeline.testing.configs import MODELS_OFF, control_endpoint, free_port, write_config
from pipeline.testing.daemons import poll, stop_daemon, wait_for_status, wait_for_workers, wait_until

pytestmark = pytest.mark.daemon

LIMIT = 300
CONNECTIONS = 400


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def _hold_connections(port: int, stop: threading.Event, counts: list[int]) -> None:
    """Keep up to CONNECTIONS idle connections open, replacing those the daemon closes."""
    held: list[socket.socket] = []
    while not stop.is_set():
        alive = []
        for connection in held:
            try:
                connection.setblocking(False)
                if connection.recv(1) == b"":  # closed by the daemon
                    connection.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                connection.close()
                continue
            alive.append(connection)
        held = alive
        while len(held) < CONNECTIONS and not stop.is_set():
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except OSError:
                break
        counts.append(len(held))
        stop.wait(0.2)
    for connection in held:
        connection.close()


def test_idle_connections_cost_a_retry_not_the_scan(tmp_path: Path, untrained_weights) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    port = free_port()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF,
                          workers={"bind": f"tcp://127.0.0.1:{port}"})
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(scans)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=_limited)
    stop, counts = threading.Event(), []
    attacker = threading.Thread(target=_hold_connections, args=(port, stop, counts), daemon=True)
    try:
        wait_for_workers(config, 1)
        attacker.start()
        wait_until(lambda: counts and max(counts) >= LIMIT - 100, 30, "the connections to pile up")
        # the daemon drops idle connections after 5 s, and the attacker refills the table: a scan that comes in a moment
        # with descriptors free completes at once (a loaded machine's timing), so scans come until one finds none free
        plans: list[ScanPlan] = []
        for attempt in range(5):
            plan = ScanPlan(directory=scans, name=f"starved{attempt}", layout="gda9", n_frames=5, seed=3 + attempt)
            write_scan(plan)
            plans.append(plan)
            store = plan.nxs_path.with_suffix(".zarr")
            poll(lambda store=store: _starved(log) or store_status(store) == schema.STATUS_COMPLETE, 30)
            if _starved(log):
                break
        assert _starved(log), f"no scan of {len(plans)} stalled for want of descriptors:\n{log.read_text()[-3000:]}"
        time.sleep(2)
        stop.set()
        attacker.join(timeout=10)
        wait_for_status([plan.nxs_path.with_suffix(".zarr") for plan in plans], timeout=120)
        assert query_status(control_endpoint(config), timeout_s=5.0) is not None  # status answers again
    finally:
        stop.set()
        stop_daemon(daemon)
    text = log.read_text()
    for plan in plans:
        reader = StoreReader(plan.nxs_path.with_suffix(".zarr"))
        assert reader.status == schema.STATUS_COMPLETE, (reader.attrs, text[-3000:])
        assert reader.done_frames().tolist() == list(range(5))
    assert "Too many open files" in text and "resuming the scan" in text


def _starved(log: Path) -> bool:
    text = log.read_text()
    return "waiting for file descriptors" in text or "for want of file descriptors" in text
