"""CurveZMQ: with authentication on, only workers whose public keys are listed get frames, and
nothing an unlisted peer sends is accepted."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
import zmq.auth

from pipeline.config import WorkerSettings
from pipeline.live import wire
from pipeline.live.dispatch import Dispatcher
from pipeline.live.security import apply_client
from pipeline.models.prediction import FramePrediction
from pipeline.testing.configs import write_config


def _client(endpoint: str, secret_file=None, server_public=None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 500)  # a peer whose handshake failed has nobody to send to
    if secret_file is not None:
        apply_client(sock, WorkerSettings(curve_secret_key=secret_file, server_public_key=server_public))
    sock.connect(endpoint)
    return sock


def _try_send(sock: zmq.Socket, parts: list[bytes]) -> bool:
    try:
        sock.send_multipart(parts)
        return True
    except zmq.Again:
        return False


def test_keys_generate_writes_a_loadable_pair(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "keys", "generate", "beamline-node", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    public, secret = zmq.auth.load_certificate(tmp_path / "beamline-node.key_secret")
    assert len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(tmp_path / "beamline-node.key") == (public, None)
    assert (tmp_path / "beamline-node.key_secret").stat().st_mode & 0o077 == 0

    again = subprocess.run([sys.executable, "-m", "pipeline", "keys", "generate", "beamline-node", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stderr) == (2, f"pipeline keys: {tmp_path / 'beamline-node.key'}: exists (workers and daemons "
                                                   "that hold this pair would be refused with a new one); give --force to replace it\n")
    assert zmq.auth.load_certificate(tmp_path / "beamline-node.key_secret") == (public, secret)  # the pair in use is kept
    forced = subprocess.run([sys.executable, "-m", "pipeline", "keys", "generate", "beamline-node", "--out", str(tmp_path), "--force"],
                            capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr
    new_public, new_secret = zmq.auth.load_certificate(tmp_path / "beamline-node.key_secret")
    assert new_public != public and len(new_secret) == 40 and zmq.auth.load_certificate(tmp_path / "beamline-node.key") == (new_public, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beamline-node.key", "beamline-node.key_secret"]


def test_key_files_have_their_modes_whatever_the_umask(tmp_path):
    """The secret is created 0600 (os.open with that mode, then renamed into place): pyzmq's create_certificates wrote it
    with the umask's mode and a chmod came after, so under umask 000 others could read it for that while."""
    import os

    from pipeline.live.security import generate_keys

    for umask in (0o000, 0o077):
        old_umask = os.umask(umask)
        try:
            public, secret = generate_keys(tmp_path / f"umask-{umask:03o}", "daemon")
        finally:
            os.umask(old_umask)
        assert (public.stat().st_mode & 0o777, secret.stat().st_mode & 0o777) == (0o644, 0o600)
        assert sorted(p.name for p in public.parent.iterdir()) == ["daemon.key", "daemon.key_secret"]


def test_only_listed_workers_get_frames_and_have_results_accepted(tmp_path, caplog):
    from pipeline.live.security import generate_keys

    _, daemon_secret = generate_keys(tmp_path / "daemon", "daemon")
    daemon_public = tmp_path / "daemon" / "daemon.key"
    allowed = tmp_path / "allowed"
    generate_keys(allowed, "trusted")
    _, stranger_secret = generate_keys(tmp_path / "elsewhere", "stranger")
    trusted_secret = (allowed / "trusted.key_secret").rename(tmp_path / "trusted.key_secret")  # the daemon holds public keys only

    results = []
    settings = WorkerSettings(credit=2, curve_secret_key=daemon_secret, authorized_keys=allowed)
    dispatcher = Dispatcher(settings, lambda d, r, e: results.append(r)).start()
    stranger = _client(dispatcher.endpoint, stranger_secret, daemon_public)
    plain = _client(dispatcher.endpoint)  # no CURVE at all
    trusted = _client(dispatcher.endpoint, trusted_secret, daemon_public)
    try:
        for sock, name in ((stranger, "stranger"), (plain, "plain")):
            _try_send(sock, wire.encode_control(wire.HELLO, {"name": name, "n": 2}))
        for index in range(2):
            dispatcher.submit("scan", index, np.full((4, 5), index, np.int32))
        time.sleep(1.0)
        assert dispatcher.stats()["workers"] == []  # neither handshake succeeded: no hello arrived
        assert not stranger.poll(200) and not plain.poll(200)  # and no frame went out
        # the daemon says whom it refused and why, once however often the stranger retries
        stranger_public = (tmp_path / "elsewhere" / "stranger.key").read_text().split('public-key = "')[1].split('"')[0]
        refusals = [r.getMessage().split(": ", 1) for r in caplog.records if r.getMessage().startswith("refused a worker from ")]
        assert [why for _, why in refusals] == [f"its CurveZMQ public key {stranger_public} is not among the keys allowed "
                                                f"(the daemon's own and workers.authorized_keys {allowed}); it gets no frames"], refusals

        trusted.send_multipart(wire.encode_control(wire.HELLO, {"name": "trusted", "n": 2}))
        received = []
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            if trusted.poll(200):
                received.append(wire.decode_frame(trusted.recv_multipart()))
        assert sorted(t.frame for t in received) == [0, 1]
        assert [w["name"] for w in dispatcher.stats()["workers"]] == ["trusted"]

        # a stranger replaying the trusted worker's result is never heard
        prediction = FramePrediction(np.zeros((4, 5), np.uint16), [], np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8))
        reply = wire.encode_result(wire.FrameResult(received[0].task, "scan", received[0].frame, "x", prediction))
        _try_send(stranger, reply)
        time.sleep(0.5)
        assert results == [] and dispatcher.stats()["rejected"] == 0
        trusted.send_multipart(reply)
        deadline = time.monotonic() + 5
        while not results and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(results) == 1 and results[0].frame == received[0].frame
    finally:
        for sock in (stranger, plain, trusted):
            sock.close(linger=0)
        dispatcher.stop()


@pytest.mark.daemon
def test_daemon_with_curve_on_serves_its_own_local_workers(tmp_path, untrained_weights):
    from pipeline.config import load_config
    from pipeline.live.daemon import Daemon
    from pipeline.live.security import generate_keys
    from pipeline.simulator.writers import ScanPlan, write_scan
    from pipeline.store import open_live
    from pipeline.testing.configs import write_config

    _, secret = generate_keys(tmp_path / "keys", "daemon")
    config = load_config(write_config(tmp_path / "c.yaml", untrained_weights, workers={"curve_secret_key": str(secret)},
                                      follow={"idle_timeout_s": 2.0}))
    plan = ScanPlan(directory=tmp_path, name="curve", layout="nexus", n_frames=4, rate_hz=100.0, seed=3)
    write_scan(plan)
    daemon = Daemon(config, watch=False).start()
    try:
        daemon.add_scan(plan.nxs_path)
        assert daemon.wait_idle(timeout=120)
    finally:
        daemon.shutdown()
    store = open_live(plan.nxs_path.with_suffix(".zarr"))
    assert store.attrs["status"] == "complete"
    assert store["frames/done"][:].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("setting", ["curve_secret_key", "server_public_key"])
def test_a_worker_with_a_key_file_holding_no_key_stops_with_one_line(tmp_path, setting):
    """It used to print a traceback from its socket's thread, say "connected" and wait for ever."""
    from pipeline.live.security import generate_keys

    _, secret = generate_keys(tmp_path, "node")
    placeholder = tmp_path / "placeholder"
    placeholder.write_text("REPLACE ME with the file pipeline keys generate writes\n")
    keys = {"curve_secret_key": secret, "server_public_key": tmp_path / "node.key", setting: placeholder}
    config = tmp_path / "worker.yaml"
    config.write_text("workers:\n" + "".join(f"  {key}: {value}\n" for key, value in keys.items())
                      + "models:\n  tlm: {enabled: false}\n  sslm: {enabled: false}\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline", "worker", "--connect", "tcp://127.0.0.1:9", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"workers.{setting} {placeholder}: holds no CurveZMQ key" in lines[0], done.stderr
    assert time.monotonic() - started < 20


def _stderr_until(process: subprocess.Popen, wanted: str, timeout: float) -> str:
    """The process's stderr lines read until one holds `wanted` (or the timeout): what a user sees on the worker's terminal."""
    assert process.stderr is not None
    descriptor = process.stderr.fileno()
    os.set_blocking(descriptor, False)
    seen, deadline = b"", time.monotonic() + timeout
    while wanted.encode() not in seen and time.monotonic() < deadline:
        try:
            seen += os.read(descriptor, 65536)
        except BlockingIOError:
            time.sleep(0.1)
    return seen.decode(errors="replace")


def test_a_worker_the_daemon_refuses_says_so(tmp_path):
    """libzmq refuses an unknown key in silence: the worker said "connected" and waited for ever."""
    from pipeline.live.security import generate_keys

    _, daemon_secret = generate_keys(tmp_path / "daemon", "daemon")
    daemon_public = tmp_path / "daemon" / "daemon.key"
    stranger_public, stranger_secret = generate_keys(tmp_path / "elsewhere", "stranger")
    dispatcher = Dispatcher(WorkerSettings(curve_secret_key=daemon_secret, authorized_keys=tmp_path / "none-yet"),
                            lambda d, r, e: None).start()
    models_off = "models:\n  tlm: {enabled: false}\n  sslm: {enabled: false}\n"
    (tmp_path / "stranger.yaml").write_text(f"workers:\n  curve_secret_key: {stranger_secret}\n  server_public_key: {daemon_public}\n"
                                            + models_off)
    (tmp_path / "plain.yaml").write_text(models_off)
    workers = {name: subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--connect", dispatcher.endpoint,
                                       "--config", str(tmp_path / f"{name}.yaml"), "--name", name],
                                      stderr=subprocess.PIPE) for name in ("stranger", "plain")}
    try:
        key = stranger_public.read_text().split('public-key = "')[1].split('"')[0]
        refused = _stderr_until(workers["stranger"], "refused", 60)
        assert (f"the daemon at {dispatcher.endpoint} refused this worker's CurveZMQ public key {key} (ZAP status 400): "
                "the daemon's workers.authorized_keys must hold this worker's public key file") in refused, refused
        refused += _stderr_until(workers["stranger"], "(not printed)", 3)  # libzmq tries again every 0.1 s or so
        assert refused.count("refused this worker") == 1, refused  # said once a minute at most
        mismatch = _stderr_until(workers["plain"], "handshake", 60)
        assert (f"the handshake with the daemon at {dispatcher.endpoint} failed (ZeroMQ error" in mismatch
                and "this worker runs without CurveZMQ" in mismatch), mismatch
        assert dispatcher.stats()["workers"] == []
        assert all(worker.poll() is None for worker in workers.values())  # still there, for a person to read and stop
    finally:
        for worker in workers.values():
            worker.terminate()
            worker.wait(timeout=30)
        dispatcher.stop()


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_secret_key_others_can_read_is_refused_in_one_line(tmp_path, command):
    """On the shared file system the nodes read, a secret key copied with the umask's mode (0644) is anyone's: the daemon
    and a worker refuse it at start, as ssh refuses such a private key, naming the file and the chmod."""
    from pipeline.live.security import generate_keys

    public, secret = generate_keys(tmp_path / "keys", "daemon")
    secret.chmod(0o644)
    watched = tmp_path / "scans"
    watched.mkdir()
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0, "curve_secret_key": str(secret),
                                                                   "server_public_key": str(public)},
                          models={"tlm": {"enabled": False}, "sslm": {"enabled": False}})
    argv = ["--watch", str(watched)] if command == "run" else ["--connect", "tcp://127.0.0.1:9"]
    done = subprocess.run([sys.executable, "-m", "pipeline", command, "--config", str(config), *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert (f"workers.curve_secret_key {secret}: readable by others (mode 0644): a secret key must be its owner's alone; "
            f"chmod 600 {secret}") in done.stderr, done.stderr
