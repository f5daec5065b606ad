"""Start errors said where the user looks: `pipeline run` refuses what can never work with one line and exit 2, says
where it looked for a daemon, and `pipeline status` shows what needs a person (a watched directory not there yet).

Everything runs as the user would: `python -m pipeline ...` child processes, real directories, real daemons.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.testing.configs import MODELS_OFF, control_endpoint, free_port, write_config
from pipeline.testing.daemons import stop_daemon
from pipeline.testing.files import nexus_file

MISSING = "watched directory does not exist (when it is created, it is picked up)"


def pipeline(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, timeout=timeout)


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], command: str, *wanted: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"pipeline {command}: "), result.stderr[-2000:]
    assert all(text in result.stderr for text in wanted), result.stderr


@contextlib.contextmanager
def unwritable_directory(path: Path) -> Iterator[Path]:
    """A directory nobody can write in: mode 0555 for a user; for root (who writes anyway), the immutable attribute."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root where this file system has no immutable attribute: no directory root cannot write in")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_run_refuses_an_output_root_through_a_regular_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    watched = tmp_path / "scans"
    watched.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = pipeline("run", "--config", str(config), "--watch", str(watched), "--output-root", str(a_file / "stores"))
    assert_one_line_refusal(result, "run", f"--output-root {a_file / 'stores'}: {a_file} is a regular file, not a directory")
    result = pipeline("run", "--config", str(write_config(tmp_path / "c2.yaml", None, output={"root": str(a_file)})),
                      "--watch", str(watched))
    assert_one_line_refusal(result, "run", f"output.root {a_file}: {a_file} is a regular file, not a directory")


def test_run_and_process_refuse_an_output_root_they_cannot_write_in(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    watched = tmp_path / "scans"
    watched.mkdir()
    scan = nexus_file(watched / "scan1.nxs", np.ones((2, 195, 487), dtype=np.uint32))
    with unwritable_directory(tmp_path / "locked") as locked:
        for root in (locked, locked / "not-yet"):  # the root itself, and where it would be made
            result = pipeline("run", "--config", str(config), "--watch", str(watched), "--output-root", str(root))
            assert_one_line_refusal(result, "run", f"--output-root {root}: cannot write in {locked} (")
        result = pipeline("process", "--config", str(config), str(scan), "--output-root", str(locked))
        assert_one_line_refusal(result, "process", f"--output-root {locked}: cannot write in {locked} (")
        assert list(locked.iterdir()) == []


def test_run_refuses_a_watched_path_that_is_a_regular_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    a_file = tmp_path / "scan-list.txt"
    a_file.write_text("x")
    result = pipeline("run", "--config", str(config), "--watch", str(a_file))
    assert_one_line_refusal(result, "run", f"watched directory {a_file}: is a regular file, not a directory")
    result = pipeline("run", "--config", str(config), "--watch", str(tmp_path), "--watch", str(a_file / "visit"))
    assert_one_line_refusal(result, "run", f"watched directory {a_file / 'visit'}: cannot exist: {a_file} is a file")


@pytest.mark.daemon
def test_process_says_why_a_scan_has_no_store_and_never_prints_none(tmp_path: Path) -> None:
    """The output root is writable but this scan's store cannot be made (its place is taken by a directory that
    cannot be changed or moved aside): the scan's own failure is printed, not `None`, and the exit code is 1."""
    config = write_config(tmp_path / "config.yaml", None, models=MODELS_OFF)
    scan = nexus_file(tmp_path / "scan1.nxs", np.ones((2, 195, 487), dtype=np.uint32))
    out = tmp_path / "out"
    out.mkdir()
    with unwritable_directory(out / "scan1.zarr") as blocked:
        result = pipeline("process", "--config", str(config), str(scan), "--output-root", str(out), "--no-progress",
                          "--workers", "1", "--idle-timeout", "2", timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "None" not in result.stdout
    assert result.stdout.startswith(f"scan1.nxs: failed (cannot create its store {blocked} (")
    assert result.stdout.endswith(f"); no store at {blocked}\n"), result.stdout


def wait_for_answer(endpoint: str, daemon: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.poll() is None, log.read_text()[-3000:]
        result = pipeline("status", "--endpoint", endpoint)
        if result.returncode == 0:
            return result
        time.sleep(0.3)
    raise AssertionError(f"no daemon answered at {endpoint} within {timeout} s: {log.read_text()[-3000:]}")


@pytest.mark.daemon
def test_a_missing_watched_directory_is_a_problem_in_status_until_it_is_made(tmp_path: Path) -> None:
    """Not a refusal: a visit's directory is often made after the daemon starts. `run --control` puts the daemon where
    asked (not at the config's daemon.control), and `pipeline status` asking the config's says where it asked."""
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    control = f"tcp://127.0.0.1:{free_port()}"
    visit = tmp_path / "visit-1"
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(visit),
                               "--control", control], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        shown = wait_for_answer(control, daemon, log)
        elsewhere = pipeline("status", "--config", str(config))
        visit.mkdir()
        deadline = time.monotonic() + 30
        while f"problem: {visit}" in (cleared := pipeline("status", "--endpoint", control)).stdout and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        stop_daemon(daemon)
    assert daemon.returncode == 0, log.read_text()[-3000:]
    assert f"problem: {visit}: {MISSING}\n" in shown.stdout, shown.stdout
    assert f"{visit}: {MISSING}" in log.read_text()
    assert elsewhere.returncode == 1
    assert elsewhere.stderr.startswith(f"no daemon answers at {control_endpoint(config)} (daemon.control in {config}); ")
    assert cleared.returncode == 0 and "problem:" not in cleared.stdout, cleared.stdout


def test_status_names_the_endpoint_it_tried_and_where_it_came_from(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    config = write_config(tmp_path / "config.yaml")
    bare = tmp_path / "bare.yaml"
    bare.write_text("workers:\n  local: 0\n")
    cases = [([], f"ipc://{home}/.pipeline/control (the default daemon.control)"),
             (["--config", str(bare)], f"ipc://{home}/.pipeline/control (the default daemon.control, not set in {bare})"),
             (["--config", str(config)], f"{control_endpoint(config)} (daemon.control in {config})"),
             (["--config", str(config), "--endpoint", "tcp://127.0.0.1:1"], "tcp://127.0.0.1:1 (from --endpoint)")]
    for argv, said in cases:
        result = subprocess.run([sys.executable, "-m", "pipeline", "status", *argv], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith(f"no daemon answers at {said}; "), result.stderr
        assert result.stderr.count("\n") == 1


def test_status_is_not_held_by_a_socket_file_a_dead_daemon_left(tmp_path: Path) -> None:
    """A daemon killed with -9 leaves its socket file; nothing listens there: said at once, not after the timeout."""
    import socket

    path = tmp_path / "control"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(path))
    assert path.exists()
    result = pipeline("status", "--endpoint", f"ipc://{path}")
    assert result.returncode == 1 and result.stderr.startswith(f"no daemon answers at ipc://{path} (from --endpoint)")


def test_a_second_daemon_on_the_same_control_endpoint_says_how_to_give_it_another(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    watched = tmp_path / "scans"
    watched.mkdir()
    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watched)],
                             stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for_answer(control_endpoint(config), first, log)
        # where the refused daemon makes its private folder (RunFolder: $TMPDIR); short, for the socket file in it
        private = Path(tempfile.mkdtemp(prefix="second-"))
        second = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watched)],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(private)})
        other = f"tcp://127.0.0.1:{free_port()}"
        third = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(watched),
                                  "--control", other], stdout=(tmp_path / "third.log").open("w"), stderr=subprocess.STDOUT)
        try:
            answer = wait_for_answer(other, third, tmp_path / "third.log")
        finally:
            third.send_signal(signal.SIGTERM)
            third.wait(timeout=60)
    finally:
        stop_daemon(first)
    assert second.returncode == 1
    assert f"daemon.control {control_endpoint(config)}: address in use" in second.stderr
    assert list(private.iterdir()) == []  # its private folder went with it (the next start called it a killed daemon's)
    private.rmdir()
    assert "--control" in second.stderr
    assert answer.stdout.startswith(f"daemon pid {third.pid}, ")


def test_a_temporary_folder_too_deep_for_a_socket_file_or_a_taken_workers_port_is_one_line(tmp_path: Path) -> None:
    """Both were tracebacks from ZeroMQ's bind; and nothing of the refused start is left behind."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0})
    refused = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--watch", str(tmp_path)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(deep)})
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
    assert refused.stderr.startswith(f"pipeline run: the workers' socket file {deep}/pipeline-run-"), refused.stderr
    assert "a socket file path longer than Linux allows (107 bytes)" in refused.stderr and "set TMPDIR" in refused.stderr
    assert list(deep.iterdir()) == []

    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "config.yaml", None, workers={"local": 0, "bind": f"tcp://127.0.0.1:{port}"})
        refused = pipeline("run", "--config", str(config), "--watch", str(tmp_path))
    assert refused.returncode == 1 and refused.stderr == (f"pipeline run: workers.bind tcp://127.0.0.1:{port}: address in use "
                                                          "(another daemon, or another program, listens there)\n"), refused.stderr


@pytest.mark.parametrize(("argv", "option", "wanted"), [
    (["status", "--endpoint", "http://127.0.0.1:8765"], "--endpoint", "not a ZeroMQ endpoint: write tcp://HOST:PORT or ipc://PATH"),
    (["status", "--endpoint", "tcp://127.0.0.1"], "--endpoint", "no HOST:PORT after tcp://"),
    (["status", "--endpoint", "tcp://127.0.0.1:70000"], "--endpoint", "the port must be 0-65535"),
    (["worker", "--connect", "foo"], "--connect", "not a ZeroMQ endpoint"),
    (["run", "--watch", ".", "--workers", "0", "--control", "tcp://127.0.0.1:99999"], "--control", "the port must be 0-65535"),
])
def test_a_bad_endpoint_on_the_command_line_is_one_line(argv: list[str], option: str, wanted: str) -> None:
    """ZeroMQ raised these as tracebacks, or (a port above 65535) bound port 99999 - 65536 = 34463 without a word."""
    result = pipeline(*argv)
    assert_one_line_refusal(result, argv[0], f"argument {option}: {wanted}", f"(got '{argv[-1]}')")


def test_a_bad_endpoint_in_the_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0, "bind": "tcp://127.0.0.1:65536"})
    assert_one_line_refusal(pipeline("run", "--config", str(config), "--watch", str(tmp_path)), "run",
                            f"{config}: workers.bind: the port must be 0-65535 (or * for any free one), not '65536'")
    config = write_config(tmp_path / "config.yaml", None, workers={"local": 0}, daemon={"control": "/tmp/control"})
    assert_one_line_refusal(pipeline("status", "--config", str(config)), "status",
                            f"{config}: daemon.control: not a ZeroMQ endpoint")


@pytest.mark.daemon
def test_a_relative_control_socket_in_a_config_is_beside_the_config_whoever_starts_the_daemon(tmp_path: Path) -> None:
    """Like every path in a config file: the daemon started from / (as systemd starts it) and `pipeline status` started
    elsewhere mean the same socket file. It was taken from each process's own working directory: the daemon made
    /ctl/control and status looked for ./ctl/control."""
    (tmp_path / "ctl").mkdir(mode=0o700)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "scans").mkdir()
    config = write_config(tmp_path / "cfg" / "run.yaml", None, workers={"local": 0}, watch={"dirs": ["../scans"]},
                          daemon={"control": "ipc://../ctl/control"})
    elsewhere = tmp_path / "a" / "b"  # ../ctl from here is a/ctl; from tmp_path, where status runs, it is outside tmp_path
    elsewhere.mkdir(parents=True)
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config)], cwd=elsewhere,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        answer = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and daemon.poll() is None:
            answer = subprocess.run([sys.executable, "-m", "pipeline", "status", "--config", str(config)], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=60)
            if answer.returncode == 0:
                break
            time.sleep(0.3)
    finally:
        stop_daemon(daemon)
    assert answer is not None and answer.returncode == 0, (answer.stderr if answer else "", log.read_text()[-3000:])
    assert answer.stdout.startswith(f"daemon pid {daemon.pid}, ")
    assert f"`pipeline status` asks at ipc://{tmp_path / 'ctl' / 'control'}" in log.read_text()
    assert not (tmp_path / "a" / "ctl").exists()


def test_process_says_why_in_its_summary_and_that_a_complete_store_was_kept(tmp_path: Path) -> None:
    """The summary said only `failed -> STORE` (the reason was in one log line, and not at all on a second run), and a
    worker still starting when the bad file had failed printed `pipeline worker: ...: cannot read config` after it."""
    config = write_config(tmp_path / "config.yaml", None, models=MODELS_OFF)
    bad = tmp_path / "bad.nxs"
    bad.write_text("hello\n")
    why = "not an HDF5 file (starts with b'hello\\n')"
    for said in (f"failed ({why})", f"failed (kept from an earlier run: {why}; --force tries again)"):
        result = pipeline("process", "--config", str(config), str(bad), "--no-progress", "--workers", "1")
        assert result.returncode == 1, result.stderr[-3000:]
        assert result.stdout == f"bad.nxs: {said} -> {tmp_path / 'bad.zarr'}\n"
        assert "pipeline worker:" not in result.stderr, result.stderr[-3000:]

    scan = nexus_file(tmp_path / "good.nxs", np.ones((3, 195, 487), dtype=np.uint32))
    said = []
    for _run in range(2):
        result = pipeline("process", "--config", str(config), str(scan), "--no-progress", "--workers", "1", "--idle-timeout", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        said.append(result.stdout)
    assert said == [f"good.nxs: complete -> {tmp_path / 'good.zarr'}\n",
                    f"good.nxs: complete (already complete: kept; --force rebuilds it) -> {tmp_path / 'good.zarr'}\n"]


def test_process_says_what_a_path_is_when_it_is_not_a_scan_file(tmp_path: Path) -> None:
    store = tmp_path / "scans" / "scan1.zarr"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    for path, said in ((tmp_path / "scans", "a folder, not a scan file; give the scan files in it, e.g. "
                                            f"{tmp_path / 'scans'}/*.nxs"),
                       (store, "a store, not a scan file; give the scan file it was made from (its source_file attribute)"),
                       (tmp_path / "missing.nxs", "no such scan file")):
        result = pipeline("process", str(path))
        assert (result.returncode, result.stderr) == (2, f"pipeline process: {path}: {said}\n")
