"""The Zocalo service against a real RabbitMQ, zocalo's own Dispatcher and a real daemon.

scripts/rabbitmq/start.sh brings up Debian's rabbitmq-server on localhost (installing it if need be) and writes the
zocalo configuration; `zocalo.go` sends deploy/zocalo/recipe-pipeline.json with a scan path; the Dispatcher hands
the recipe's first step to `pipeline zocalo-service`, which asks the daemon to follow the scan and sends the finished
store on to the next step's queue, read here. The daemon polls its watched directory only every 10 minutes and ignores
files that were there when it started, so a store that appears within seconds was made because the service asked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from pipeline.live.control import query_status
from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.store import open_live, store_status
from pipeline.testing.configs import MODELS_OFF, control_endpoint, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_workers, wait_until
from pipeline.testing.files import nexus_file
from pipeline.testing.stores import done_count

pytestmark = pytest.mark.daemon

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # zocalo.service and zocalo.go, installed beside this Python
FOLLOWED, REFUSED, DISPATCH, SERVICE_QUEUE = "pipeline.followed", "pipeline.refused", "processing_recipe", "pipeline.follow"
PORT = int(os.environ.get("PIPELINE_RABBITMQ_PORT", "5672"))


class Broker:
    """The broker start.sh started: its zocalo configuration, and queues read and counted with pika."""

    def __init__(self, zocalo_config: Path) -> None:
        import pika

        self.zocalo_config = zocalo_config
        self.env = {**os.environ, "ZOCALO_CONFIG": str(zocalo_config)}
        self._connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", PORT, "/", pika.PlainCredentials("guest", "guest")))
        self._channel = self._connection.channel()

    def counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue."""
        method = self._channel.queue_declare(queue, passive=True).method
        return method.message_count, method.consumer_count

    def take(self, queue: str, timeout: float) -> dict[str, Any] | None:
        """The payload of the next message on `queue` (a recipe step's message), or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            method, _, body = self._channel.basic_get(queue, auto_ack=True)
            if method is not None:
                payload: dict[str, Any] = json.loads(body)["payload"]
                return payload
            if time.monotonic() > deadline:
                return None
            self._connection.sleep(0.1)

    def purge(self, *queues: str) -> None:
        for queue in queues:
            self._channel.queue_purge(queue)

    def wait_for_consumer(self, queue: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.counts(queue)[1] < 1:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nothing consumes {queue} (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            self._connection.sleep(0.2)

    def go(self, scan: Path, **parameters: str) -> None:
        """`zocalo.go` as a beamline would send it: the repository's recipe, the scan's path (and `parameters`) as parameters."""
        given = [argument for name, value in parameters.items() for argument in ("-s", f"{name}={value}")]
        sent = subprocess.run([str(BIN / "zocalo.go"), "-r", "recipe-pipeline", "-s", f"scan={scan}", *given, "--no-dcid"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and "Submitted" in sent.stdout, sent.stdout + sent.stderr

    def close(self) -> None:
        self._connection.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """RabbitMQ on localhost by the repository's script (never skipped: a broker that cannot start fails the tests)."""
    started = subprocess.run(["bash", str(REPO / "scripts/rabbitmq/start.sh")], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, f"scripts/rabbitmq/start.sh failed:\n{started.stderr[-3000:]}"
    ours = "already answers" not in started.stderr  # a broker someone else started is left running
    broker = Broker(Path(started.stdout.strip().splitlines()[-1]))
    try:
        yield broker
    finally:
        broker.close()
        if ours:
            subprocess.run(["bash", str(REPO / "scripts/rabbitmq/stop.sh")], capture_output=True, timeout=120)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's whole group (a workflows frontend and its service process), then SIGKILL if need be."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def dispatcher(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """zocalo's own Dispatcher service: recipes from `zocalo.go` become messages to their first step's queue."""
    log = tmp_path_factory.mktemp("dispatcher") / "dispatcher.log"
    broker.purge(DISPATCH)
    process = subprocess.Popen([str(BIN / "zocalo.service"), "-s", "Dispatcher"], env=broker.env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        broker.wait_for_consumer(DISPATCH, process, log)
        yield process
    finally:
        _stop(process)


class Daemon:
    """A real `pipeline run` that would notice no scan by itself for 10 minutes, with an audit line per frame done."""

    def __init__(self, directory: Path) -> None:
        self.scans = directory / "scans"
        self.scans.mkdir()
        self.audit = directory / "audit.jsonl"
        self.config = write_config(directory / "config.yaml", None, models=MODELS_OFF,
                                   watch={"mode": "polling", "poll_interval_s": 600.0, "rescan_interval_s": 600.0, "resume_existing": False},
                                   daemon={"audit_log": str(self.audit)}, output={"requested_roots": [str(self.scans / "processing")]})
        self.log = directory / "daemon.log"
        self.process = start_daemon(self.config, self.scans, self.log)

    def frames_done(self, scan: Path) -> list[int]:
        """Each frame of `scan` the daemon wrote, once per time it wrote it."""
        lines = [json.loads(line) for line in self.audit.read_text().splitlines()] if self.audit.exists() else []
        return sorted(line["frame"] for line in lines if line["scan"] == str(scan))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("daemon"))
    try:
        wait_for_workers(running.config, 1)
        yield running
    finally:
        stop_daemon(running.process)


@pytest.fixture
def service(broker: Broker, dispatcher: subprocess.Popen[bytes], daemon: Daemon, tmp_path: Path) -> Iterator[Any]:
    """`pipeline zocalo-service` for the daemon, as a factory: each call starts one and waits until it takes messages."""
    started: list[subprocess.Popen[bytes]] = []
    broker.purge(FOLLOWED, REFUSED, SERVICE_QUEUE)

    def start() -> subprocess.Popen[bytes]:
        log = tmp_path / f"service-{len(started)}.log"
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "zocalo-service", "--config", str(daemon.config)], env=broker.env,
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        broker.wait_for_consumer(SERVICE_QUEUE, process, log)
        return process

    try:
        yield start
    finally:
        for process in started:
            _stop(process)


def _finished_scan(path: Path, frames: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    return nexus_file(path, rng.poisson(3.0, size=(frames, 195, 487)).astype(np.int32))


def test_a_recipe_makes_the_daemon_follow_a_scan_it_had_not_noticed(broker: Broker, daemon: Daemon, service: Any) -> None:
    service()
    scan = _finished_scan(daemon.scans / "triggered.nxs")
    time.sleep(1.0)
    status = query_status(control_endpoint(daemon.config), timeout_s=5.0)
    assert status is not None and status["scans"] == [], "the daemon found the scan by itself: the test would prove nothing"

    sent = time.monotonic()
    broker.go(scan)
    followed = broker.take(FOLLOWED, timeout=90)
    took = time.monotonic() - sent
    store = scan.with_suffix(".zarr")
    assert followed is not None, f"nothing reached {FOLLOWED}; refused: {broker.take(REFUSED, 0.5)}\n{daemon.log.read_text()[-3000:]}"
    assert {k: followed[k] for k in ("scan", "store", "status")} == {"scan": str(scan), "store": str(store), "status": "complete"}
    assert took < 60, took
    assert open_live(store)["frames/done"][:].tolist() == [1] * 6
    assert daemon.frames_done(scan) == list(range(6))
    ended = open_live(store).attrs["end_time"]

    broker.go(scan)  # the same request again (GDA resends; a message delivered twice): answered, nothing written again
    again = broker.take(FOLLOWED, timeout=60)
    assert again is not None and (again["store"], again["status"]) == (str(store), "complete")
    assert open_live(store).attrs["end_time"] == ended and daemon.frames_done(scan) == list(range(6))
    assert broker.take(REFUSED, timeout=0.5) is None


def test_a_recipe_names_the_output_root_and_one_outside_where_the_daemon_writes_is_refused(broker: Broker, daemon: Daemon,
                                                                                           service: Any, tmp_path: Path) -> None:
    """GDA's recipe may name where the store goes (a visit's processing folder): the daemon takes one its config lists
    (output.requested_roots) and refuses any other with one line."""
    service()
    scan = _finished_scan(daemon.scans / "sample2" / "rooted.nxs", frames=3)
    processing = daemon.scans / "processing"
    broker.go(scan, output_root=str(processing))
    followed = broker.take(FOLLOWED, timeout=90)
    store = processing / "sample2" / "rooted.zarr"  # the scan's folder under the watched directory, kept under the root
    assert followed is not None, f"refused: {broker.take(REFUSED, 0.5)}\n{daemon.log.read_text()[-3000:]}"
    assert (followed["store"], followed["status"]) == (str(store), "complete"), followed
    assert open_live(store)["frames/done"][:].tolist() == [1] * 3 and not scan.with_suffix(".zarr").exists()

    elsewhere = tmp_path / "elsewhere"
    other = _finished_scan(daemon.scans / "unrooted.nxs", frames=3)
    broker.go(other, output_root=str(elsewhere))
    refused = broker.take(REFUSED, timeout=60)
    assert refused == {"scan": str(other), "reason": f"{other}: output root {elsewhere} is not one of output.requested_roots "
                                                     f"({processing}); no store is written elsewhere"}, refused
    assert not elsewhere.exists() and not other.with_suffix(".zarr").exists()
    broker.go(other, output_root="processing")
    refused = broker.take(REFUSED, timeout=60)
    assert refused == {"scan": str(other), "reason": "recipe step parameter output_root 'processing': not an absolute path"}, refused
    assert broker.counts(SERVICE_QUEUE) == (0, 1) and broker.take(FOLLOWED, timeout=0.5) is None


def test_a_file_outside_the_watched_directories_is_refused_on_the_error_path(broker: Broker, daemon: Daemon, service: Any,
                                                                             tmp_path: Path) -> None:
    service()
    outside = _finished_scan(tmp_path / "elsewhere" / "secret.nxs")
    link = daemon.scans / "link.nxs"
    link.symlink_to(outside)  # a link inside the watched directory leads outside it: refused all the same
    for scan in (outside, link):
        broker.go(scan)
        refused = broker.take(REFUSED, timeout=60)
        assert refused == {"scan": str(scan), "reason": f"{scan}: outside the watched directories ({daemon.scans}); nothing outside them is read"}
    assert broker.counts(SERVICE_QUEUE) == (0, 1)  # both acknowledged
    assert broker.take(FOLLOWED, timeout=0.5) is None
    assert not outside.with_suffix(".zarr").exists() and not link.with_suffix(".zarr").exists()

    counters = daemon.scans / "counters.nxs"  # inside, accepted, but a scan of counters only: the daemon makes no store
    with h5py.File(counters, "w") as handle:
        handle["entry1/scan_command"] = "scan eta 10 11 0.25 ct 1"
        handle["entry1/measurement/eta"] = np.arange(10, 11.25, 0.25)
    broker.go(counters)
    refused = broker.take(REFUSED, timeout=90)
    assert refused is not None and refused["scan"] == str(counters), broker.take(FOLLOWED, 0.5)
    assert refused["reason"].startswith(f"{counters}: skipped by the daemon (not a detector scan"), refused
    assert refused["reason"].endswith(f"; no finished store at {counters.with_suffix('.zarr')}"), refused

    pasted = "http://127.0.0.1:8765"  # the web view's address where the daemon's control endpoint belongs
    broker.go(counters, control=pasted)
    refused = broker.take(REFUSED, timeout=60)
    assert refused == {"scan": str(counters), "reason": f"recipe step parameter control '{pasted}': not a ZeroMQ endpoint: write "
                                                        "tcp://HOST:PORT or ipc://PATH"}, refused
    assert broker.counts(SERVICE_QUEUE) == (0, 1)


def test_a_killed_service_leaves_the_message_to_be_delivered_again_and_the_scan_is_written_once(broker: Broker, daemon: Daemon,
                                                                                              service: Any) -> None:
    first = service()
    plan = ScanPlan(directory=daemon.scans, name="interrupted", layout="gda9", n_frames=24, rate_hz=3.0, seed=41)
    writer = ScanWriter(plan).start()
    try:
        wait_until(plan.nxs_path.exists, 60, f"{plan.nxs_path} written")
        broker.go(plan.nxs_path)
        store = plan.nxs_path.with_suffix(".zarr")
        wait_until(lambda: done_count(store) >= 2, 60, "2 frames done: the service is waiting for the store")
        assert store_status(store) == "running"
        os.killpg(first.pid, signal.SIGKILL)  # the service and its frontend, killed while they wait
        first.wait(timeout=20)
        wait_until(lambda: broker.counts(SERVICE_QUEUE) == (1, 0), 30, "the unacknowledged message back in its queue")
        assert broker.take(FOLLOWED, timeout=0.5) is None

        service()  # a restarted service takes the message again, asks the daemon again, and waits for the same store
        followed = broker.take(FOLLOWED, timeout=120)
        assert followed is not None, broker.take(REFUSED, 0.5)
        assert (followed["store"], followed["status"]) == (str(store), "complete")
        writer.join(timeout=60)
    finally:
        writer.kill()
    assert open_live(store)["frames/done"][:].tolist() == [1] * 24
    assert daemon.frames_done(plan.nxs_path) == list(range(24))  # every frame once: the second request queued nothing
    assert broker.counts(SERVICE_QUEUE) == (0, 1) and broker.take(FOLLOWED, timeout=1.0) is None
