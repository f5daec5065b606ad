"""A store's lock file goes with its writer (issue 26, point 9), and the lock still guards the store.

`<scan>.zarr.lock` beside a store is the flock that gives a store one writer. It used to stay beside
every finished store. Now its holder removes it as it lets go (finished, failed, or at a normal exit),
while the guarantees stay: two writers never hold one store's lock at once, even while holders keep
removing and recreating the file under each other; a lock left by a kill -9 does not block the next writer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.simulator.writers import ScanPlan, ScanWriter, write_scan
from pipeline.store import read_attributes, schema
from pipeline.store.writer import StoreBusy, StoreLock
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_workers, wait_until

ROOT = Path(__file__).resolve().parents[1]


def _process(config: Path, *scans: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", *map(str, scans)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def _locks(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.lock"))


@pytest.mark.daemon
def test_process_leaves_no_lock_file_beside_its_stores(tmp_path: Path, untrained_weights) -> None:
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)
    plans = [ScanPlan(directory=tmp_path / "scans", name=f"s-{layout}", layout=layout, n_frames=3, rate_hz=1000.0, seed=i)
             for i, layout in enumerate(("nexus", "gda9"))]
    for plan in plans:
        write_scan(plan)
    result = _process(config, *(plan.nxs_path for plan in plans))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for plan in plans:
        assert read_attributes(plan.nxs_path.with_suffix(".zarr"))[schema.Attr.STATUS] == schema.STATUS_COMPLETE
    assert _locks(tmp_path) == []


def test_a_released_lock_removes_its_file_and_a_held_one_still_refuses(tmp_path: Path) -> None:
    store = tmp_path / "a.zarr"
    first = StoreLock(store)
    first.acquire()
    assert first.path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(StoreBusy, match=rf"being written by another process \(pid {os.getpid()}\)"):
        StoreLock(store).acquire()  # a second flock of the same file, even in one process, is refused
    first.release()
    assert not first.path.exists()
    first.release()  # twice is harmless
    second = StoreLock(store)
    second.acquire()
    assert second.path.exists()
    second.release()
    assert _locks(tmp_path) == []


_CONTENDER = """
    import os, sys, time
    from pathlib import Path
    from pipeline.store.writer import StoreBusy, StoreLock
    store, sentinel, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    held = busy = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lock = StoreLock(store)
        try:
            lock.acquire()
        except StoreBusy:
            busy += 1
            continue
        try:
            fd = os.open(sentinel, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside too
        except FileExistsError:
            print("TWO WRITERS", flush=True)
            sys.exit(3)
        os.close(fd)
        os.unlink(sentinel)
        held += 1
        lock.release()
    print(held, busy, flush=True)
"""


def test_writers_racing_for_one_store_never_hold_it_together(tmp_path: Path) -> None:
    """Four processes take and let go of one store's lock as fast as they can for 3 s, each removing the file
    as it lets go: a sentinel made with O_EXCL inside the lock proves no two were ever inside at once. The race
    that removal opens (B opens the file, A removes it and lets go, B's flock of the removed file succeeds
    while C locks a new one) is what StoreLock re-checks for; without that check this test sees two writers."""
    store, sentinel = tmp_path / "raced.zarr", tmp_path / "inside"
    contenders = [_python(_CONTENDER, str(store), str(sentinel), "3") for _ in range(4)]
    outputs = [process.communicate(timeout=60) for process in contenders]
    for process, (out, err) in zip(contenders, outputs):
        assert process.returncode == 0, out + err[-2000:]
    counts = [tuple(map(int, out.split())) for out, _err in outputs]
    assert all(held > 10 for held, _busy in counts), counts  # each really took the lock, many times
    assert sum(busy for _held, busy in counts) > 10, counts  # and they really contended
    assert _locks(tmp_path) == []


_HOLDER = """
    import sys, time
    from pathlib import Path
    from pipeline.store.writer import StoreLock
    StoreLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    if sys.argv[2] == "exit":
        sys.exit(0)  # a normal exit without letting go: the exit handler does
    time.sleep(120)
"""


def test_a_normal_exit_removes_a_lock_still_held(tmp_path: Path) -> None:
    store = tmp_path / "c.zarr"
    holder = _python(_HOLDER, str(store), "exit")
    out, err = holder.communicate(timeout=60)
    assert (holder.returncode, out) == (0, "held\n"), err[-2000:]
    assert _locks(tmp_path) == []


@pytest.mark.daemon
def test_after_a_kill_9_the_next_run_takes_the_store(tmp_path: Path, untrained_weights) -> None:
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)
    plan = ScanPlan(directory=tmp_path / "scans", name="killed", layout="gda9", n_frames=3, rate_hz=1000.0, seed=7)
    write_scan(plan)
    store = plan.nxs_path.with_suffix(".zarr")
    holder = _python(_HOLDER, str(store), "sleep")
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        busy = _process(config, plan.nxs_path)  # held: refused with the holder's pid
        assert busy.returncode != 0 and f"being written by another process (pid {holder.pid})" in busy.stdout + busy.stderr
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert _locks(tmp_path) == ["killed.zarr.lock"]  # a kill -9 runs no exit handler: the file stays
    result = _process(config, plan.nxs_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    attrs = read_attributes(store)
    assert (attrs[schema.Attr.STATUS], attrs[schema.Attr.FRAMES_DONE]) == (schema.STATUS_COMPLETE, plan.n_frames)
    assert _locks(tmp_path) == []


@pytest.mark.daemon
def test_a_daemon_stopped_mid_scan_leaves_no_lock_file(tmp_path: Path, untrained_weights) -> None:
    """SIGTERM while a scan is half written: the daemon drains and exits normally, its lock files with it."""
    scans = tmp_path / "scans"
    scans.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)
    plan = ScanPlan(directory=scans, name="halfway", layout="gda9", n_frames=40, rate_hz=2.0, seed=8)
    lock = plan.nxs_path.with_suffix(".zarr.lock")
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, scans, log)
    writer = ScanWriter(plan).start()
    try:
        wait_for_workers(config, 1)
        wait_until(lock.exists, 120, "the daemon to lock the store")
        assert writer.is_alive()  # the scan is still being written
    finally:
        stop_daemon(daemon)
        writer.join(timeout=60)
    assert daemon.returncode == 0, log.read_text()[-3000:]
    assert _locks(tmp_path) == [], log.read_text()[-3000:]
