"""`pipeline soak`, for real and short: the daemon as a subprocess under scans and every kind of fault.

The long test runs the real soak for under a minute of faults with tiny scans and untrained
weights, forcing each fault kind at least once (`--fault-every` short: the first round is one of
each kind), and checks the figures it reports against what must hold: nothing lost or doubled
across worker kills and daemon kill -9 restarts, every bad file failed, every hostile message
rejected. The quick tests cover the command line and the soak's hostile messages on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from pipeline.config import WorkerSettings
from pipeline.live import wire
from pipeline.live.dispatch import Dispatcher
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import poll as _wait
from pipeline.tools.soak import hostile_messages

pytestmark = pytest.mark.daemon

FORCED = "worker_kill,daemon_restart,bad_file,hostile,hung_worker,rogue_worker,idle_connections,disk_full"


def _soak(*args: str, timeout: float = 420, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.tools.soak", "--no-progress", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)




def test_soak_with_every_fault_loses_and_doubles_nothing(tmp_path, untrained_weights):
    config = write_config(tmp_path / "c.yaml", untrained_weights, models=MODELS_OFF)  # the faults are the test, not the models
    figures = tmp_path / "soak.json"
    result = _soak("--seconds", "50", "--fault-every", "5", "--faults", FORCED, "--hostile-mix", "basic", "--frames", "4,8",
                   "--rate", "5,10", "--seed", "3", "--config", str(config), "--out", str(tmp_path / "soak"), "--json", str(figures))
    printout = result.stdout + result.stderr
    assert figures.exists(), printout[-4000:]
    report = json.loads(figures.read_text())
    assert result.returncode == 0, printout[-4000:]
    assert report["passed"] and report["problems"] == [], printout[-4000:]

    # nothing lost, nothing done twice, by any of the daemon processes
    assert report["lost"] == 0 and report["doubled"] == 0, printout[-4000:]
    assert report["frames_processed"] == report["frames_written"] > 0
    assert report["audit_lines"] == report["frames_written"]  # each frame done exactly once across restarts
    assert report["scans_written"] >= 3 and {s["layout"] for s in report["scans"]} == {"gda9", "gda8", "nexus"}
    assert all(s["status"] == "complete" for s in report["scans"]), report["scans"]

    # every kind of fault happened, and the daemon came through
    assert report["restarts_survived"] >= 1 and len(report["daemons"]) == report["restarts_survived"] + 1
    assert all(d["how_ended"] == "killed" for d in report["daemons"][:-1]) and report["daemons"][-1]["how_ended"] == "stopped"
    assert report["worker_kills"] >= 1
    assert report["orphaned_workers"] == 0  # local workers leave with a killed daemon
    assert report["bad_files_injected"] >= 1
    assert len(report["failed_scans"]) == sum(not bad["skipped"] for bad in report["bad_files"])
    for bad in report["bad_files"]:  # a file with no detector frames is no scan: skipped, no store; every other one failed
        if bad["skipped"]:
            assert bad["kind"] == "no_detector" and bad["status"] is None, bad
        else:
            assert bad["status"] == "failed" and bad["file"] in bad["end_reason"], bad
    assert report["hostile_sent"] > 0 and report["rejected"] > 0
    for daemon in report["daemons"]:  # rejections are counted per daemon process: each counts what it was sent
        if daemon["hostile_sent"] and daemon["how_ended"] == "stopped":
            assert daemon["rejected"] >= daemon["hostile_sent"], daemon
    assert report["hung_workers"] >= 1 and report["rogue_workers"] >= 1 and report["idle_connection_bursts"] >= 1
    assert report["disk_full_faults"] + report["disk_full_skipped"] >= 1  # (skipped, and said so, where no tmpfs can be mounted)
    assert report["forged_sent"] > 0 and report["forged_accepted"] == 0  # every forgery rejected, no frame credited to a rogue
    assert report["memory"]["daemon_peak_rss_mib"] > 0 and report["memory"]["worker_peak_rss_mib"] > 0
    assert report["compare"]["equal"] is True, report["compare"]

    for line in ("lost                                0", "doubled                             0", "PASSED"):
        assert line in result.stdout, result.stdout


def test_soak_command_line_errors_are_one_line(tmp_path):
    for args, words in ((["--faults", "meteor"], "unknown fault 'meteor'"), (["--minutes", "0"], "must be a finite number > 0"),
                        (["--frames", "9,3"], "MIN <= MAX"), (["--seconds", "5", "--minutes", "1"], "not allowed with")):
        result = _soak(*args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, (args, result.stderr)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    result = _soak("--seconds", "5", timeout=60, env={**os.environ, "PIPELINE_WEIGHTS_DIR": str(empty)})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no TLM weights" in result.stderr and "Traceback" not in result.stderr
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("workers: {local: -1}\n")
    result = _soak("--seconds", "5", "--config", str(bad_config), timeout=60)
    assert result.returncode == 2 and "workers.local" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _attack(mix: str, count: int) -> tuple[Dispatcher, list, int]:
    results: list = []
    dispatcher = Dispatcher(WorkerSettings(credit=2, timeout_s=30), lambda d, r, e: results.append(r)).start()
    attacker = zmq.Context.instance().socket(zmq.DEALER)
    attacker.connect(dispatcher.endpoint)
    messages = hostile_messages(np.random.default_rng(7), count, mix)
    try:
        for parts in messages:
            attacker.send_multipart(parts)
        _wait(lambda: dispatcher.stats()["rejected"] == len(messages) or not dispatcher._thread.is_alive(), timeout=20)
    finally:
        attacker.close(linger=0)
    return dispatcher, results, len(messages)


def _honest_worker_is_served(dispatcher: Dispatcher) -> bool:
    worker = zmq.Context.instance().socket(zmq.DEALER)
    worker.connect(dispatcher.endpoint)
    try:
        worker.send_multipart(wire.encode_control(wire.HELLO, {"name": "honest", "n": 2, "device": "cpu"}))
        frame = np.arange(20, dtype=np.int32).reshape(4, 5)
        dispatcher.submit("scan", 0, frame)
        if not worker.poll(5000):
            return False
        return wire.decode_frame(worker.recv_multipart()).frame == 0
    finally:
        worker.close(linger=0)


def test_basic_hostile_messages_are_all_rejected():
    """The soak's basic mix holds no valid hello: a dispatcher rejects and counts every message, and serves on."""
    dispatcher, results, count = _attack("basic", 1500)
    try:
        assert dispatcher.stats()["rejected"] == count and dispatcher.stats()["workers"] == [] and results == []
        assert _honest_worker_is_served(dispatcher)
    finally:
        dispatcher.stop()


def test_full_hostile_mix_is_rejected_and_the_dispatcher_keeps_serving():
    """Deeply nested JSON and over-long integers in a hello from a stranger: rejected like any garbage, not fatal."""
    dispatcher, results, count = _attack("full", 600)
    try:
        assert dispatcher._thread.is_alive(), "the dispatch thread died"
        assert dispatcher.stats()["rejected"] == count and results == []
        assert _honest_worker_is_served(dispatcher)
    finally:
        dispatcher.stop()


def test_hostile_senders_read_the_replies_and_stay_open_until_their_daemon_is_gone():
    """A burst's socket is not closed while the daemon may still answer it: closing over unread replies makes
    the kernel reset the connection, and the reset throws away the burst's tail before the daemon reads it."""
    from pipeline.tools.soak import HostileSenders

    dispatcher = Dispatcher(WorkerSettings(credit=2, timeout_s=30), lambda d, r, e: None).start()
    senders = HostileSenders()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(dispatcher.endpoint)
    try:
        for _ in range(200):  # a stray heartbeat is answered with "rejoin": 200 replies come back
            sock.send_multipart([wire.HEARTBEAT, b"[]"])
        senders.add(sock, daemon_pid=1001)
        assert _wait(lambda: dispatcher.stats()["rejected"] == 200, timeout=20), dispatcher.stats()
        assert sock.poll(2000), "the daemon sent no rejoin back"
        time.sleep(0.2)  # the last replies reach the sender
        senders.service(current_pid=1001)
        assert not sock.closed and senders.open == [(sock, 1001)]
        assert sock.poll(0) == 0, "service() left replies unread"
        senders.service(current_pid=1002)  # that daemon was restarted: its sockets go
        assert sock.closed and senders.open == []
    finally:
        if not sock.closed:
            sock.close(linger=0)
        dispatcher.stop()
