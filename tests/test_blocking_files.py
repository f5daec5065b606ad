"""Scan files that make HDF5 block, or read for ever, never stall the daemon (issue: HDF5 in reader processes).

A real `pipeline run` (models off: stores and timing are what is tested) watches a directory. Each test
builds its bad files there the way they arrive (bit rot in a v3 superblock, a FIFO behind a link, a
huge link tree), drops them beside a good scan that another process writes live, and checks: the good
scan completes every frame, each bad file's store ends `failed` with one line naming the file and what
went wrong, within its deadline, and `pipeline status` answers throughout. SIGTERM stops the daemon
within 30 s even while a reader is blocked inside HDF5.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.live.control import query_status
from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.store import open_live, store_status
from pipeline.testing.configs import MODELS_OFF, control_endpoint, write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers, wait_until
from pipeline.testing.files import appear, nexus_file

pytestmark = pytest.mark.daemon

STEP_TIMEOUT_S = 3.0
SHAPE = (195, 487)


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, size=(n, *SHAPE)).astype(np.int32)


class StatusWatch:
    """Asks `pipeline status`'s endpoint every 0.3 s on a thread and keeps the slowest answer (or the missing ones)."""

    def __init__(self, config: Path) -> None:
        self.endpoint = control_endpoint(config)
        self.slowest = 0.0
        self.unanswered = 0
        self.asked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            started = time.monotonic()
            answer = query_status(self.endpoint, timeout_s=5.0)
            self.asked += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.unanswered += answer is None

    def __enter__(self) -> StatusWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, untrained_weights):
    base = tmp_path_factory.mktemp("blocking")
    watched = base / "scans"
    watched.mkdir()
    config = write_config(base / "config.yaml", untrained_weights, models=MODELS_OFF,
                          readers={"step_timeout_s": STEP_TIMEOUT_S, "processes": 6},
                          daemon={"max_active_scans": 5}, watch={"recursive": True, "rescan_interval_s": 1.0},
                          follow={"idle_timeout_s": 10.0, "open_timeout_s": 10.0, "link_timeout_s": 10.0})
    process = start_daemon(config, watched, base / "daemon.log")
    wait_for_workers(config, 1)
    yield config, watched, process, base / "daemon.log"
    stop_daemon(process)


def _good_scan(directory: Path, name: str, n_frames: int = 20, seed: int = 1) -> tuple[ScanWriter, Path]:
    plan = ScanPlan(directory=directory, name=name, layout="gda9", n_frames=n_frames, rate_hz=10.0, seed=seed)
    return ScanWriter(plan).start(), plan.nxs_path.with_suffix(".zarr")


def _flipped_v3(path: Path, offset_from: str = "superblock") -> Path:
    """A finished scan written as SWMR writers write (superblock v3) with one bit flipped: bit rot or a half copy."""
    def write(target: Path) -> None:
        with h5py.File(target, "w", libver="latest") as handle:
            entry = handle.create_group("entry1")
            entry["scan_command"] = "scan eta 10 11 0.25 pil3_100k 1"
            entry["end_time"] = "2024-01-01T00:00:00"
            entry.create_group("pil3_100k").create_dataset("data", data=_frames(5), chunks=(1, *SHAPE), maxshape=(None, *SHAPE))
    temporary = path.with_name(path.name + ".part")  # flipped before it appears, as a damaged copy arrives
    write(temporary)
    raw = bytearray(temporary.read_bytes())
    if offset_from == "superblock":
        offset = 20
    else:  # inside the last object header (the frames' dataset was written last)
        offset = raw.rfind(b"OHDR") + 12
    raw[offset] ^= 0x01
    temporary.write_bytes(bytes(raw))
    os.replace(temporary, path)
    return path


def _assert_failed_soon(store: Path, needle: str, timeout: float) -> str:
    wait_for_status([store], timeout=timeout, wanted=("failed",))
    reason = open_live(store).attrs["end_reason"]
    assert "\n" not in reason and needle in reason, reason
    return reason


def _assert_good(store: Path, n_frames: int) -> None:
    wait_for_status([store], timeout=120, wanted=("complete",))
    assert open_live(store)["frames/done"][:].tolist() == [1] * n_frames


def test_a_flipped_bit_in_a_v3_file_fails_its_scan_alone(daemon):
    config, watched, _, _ = daemon
    directory = watched / "flipped"
    directory.mkdir()
    with StatusWatch(config) as status:
        writer, good = _good_scan(directory, "good", seed=2)
        started = time.monotonic()
        superblock = _flipped_v3(directory / "rot_superblock.nxs")
        header = _flipped_v3(directory / "rot_header.nxs", offset_from="object header")
        reason = _assert_failed_soon(superblock.with_suffix(".zarr"), "rot_superblock.nxs", timeout=60)
        assert "did not answer within 3 s while opening the scan file" in reason
        elapsed = time.monotonic() - started
        wait_for_status([header.with_suffix(".zarr")], timeout=60)  # ends one way or another (failed: HDF5 reads garbage)
        _assert_good(good, 20)
        writer.join(timeout=30)
    assert elapsed < 40, f"the flipped file's scan took {elapsed:.0f} s to fail"
    assert status.asked >= 5 and status.unanswered == 0 and status.slowest < 3.0, vars(status)


def test_a_fifo_behind_any_kind_of_link_is_refused_at_once(daemon):
    config, watched, _, _ = daemon
    directory = watched / "fifos"
    directory.mkdir()
    for name in ("linked.h5", "virtual.h5", "raw.bin", "scan_fifo.nxs"):
        os.mkfifo(directory / name)
    with StatusWatch(config) as status:
        writer, good = _good_scan(directory, "good", seed=3)
        external = nexus_file(directory / "external.nxs", link="linked.h5")

        def virtual(target: Path) -> None:
            with h5py.File(target, "w") as handle:
                layout = h5py.VirtualLayout(shape=(5, *SHAPE), dtype="int32")
                layout[:] = h5py.VirtualSource("virtual.h5", "data", shape=(5, *SHAPE))
                handle.create_group("entry1/pil3_100k").create_virtual_dataset("data", layout)
                handle["entry1/end_time"] = "2024-01-01T00:00:00"

        def external_raw(target: Path) -> None:
            with h5py.File(target, "w") as handle:
                handle.create_group("entry1/pil3_100k").create_dataset("data", shape=(5, *SHAPE), dtype="int32",
                                                                       external=[(str(directory / "raw.bin"), 0, h5py.h5f.UNLIMITED)])
                handle["entry1/end_time"] = "2024-01-01T00:00:00"

        vds = appear(directory / "vds.nxs", virtual)
        raw = appear(directory / "rawstore.nxs", external_raw)
        for scan, needle in ((external, "FIFO"), (vds, "FIFO"), (raw, "FIFO")):
            _assert_failed_soon(scan.with_suffix(".zarr"), needle, timeout=30)
        _assert_good(good, 20)
        assert not (directory / "scan_fifo.zarr").exists()  # the watcher offers regular files only: the FIFO is never opened
        writer.join(timeout=30)
    assert status.unanswered == 0 and status.slowest < 3.0, vars(status)


def test_huge_link_trees_are_refused_naming_the_limit(daemon):
    config, watched, _, _ = daemon
    directory = watched / "trees"
    directory.mkdir()

    def many_links(target: Path) -> None:
        with h5py.File(target, "w") as handle:
            handle.create_group("entry1/pil3_100k").create_dataset("data", data=_frames(3), chunks=(1, *SHAPE))
            handle["entry1/end_time"] = "2024-01-01T00:00:00"
            links = handle.create_group("entry1/links")
            for index in range(100_000):
                links[f"l{index}"] = h5py.ExternalLink("elsewhere.h5", "/x")

    def deep(target: Path) -> None:
        with h5py.File(target, "w") as handle:
            handle.create_group("entry1/pil3_100k").create_dataset("data", data=_frames(3), chunks=(1, *SHAPE))
            handle["entry1/end_time"] = "2024-01-01T00:00:00"
            handle.create_group("/".join(["g"] * 2000))

    with StatusWatch(config) as status:
        writer, good = _good_scan(directory, "good", seed=4)
        links = appear(directory / "links.nxs", many_links)
        nested = appear(directory / "nested.nxs", deep)
        _assert_failed_soon(links.with_suffix(".zarr"), "more than 20,000 links (follow.max_links)", timeout=60)
        _assert_failed_soon(nested.with_suffix(".zarr"), "deeper than 32 (follow.max_group_depth)", timeout=60)
        _assert_good(good, 20)
        writer.join(timeout=30)
    assert status.unanswered == 0 and status.slowest < 3.0, vars(status)


TRUNCATING_WRITER = r"""
import sys, h5py, numpy as np
directory, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(5)
detector = h5py.File(f"{directory}/{name}-det.h5", "w", libver="latest")
data = detector.create_dataset("entry/instrument/detector/data", shape=(0, 195, 487), maxshape=(None, 195, 487), dtype="int32",
                               chunks=(1, 195, 487))
nexus = h5py.File(f"{directory}/{name}.nxs.part", "w", libver="latest")
entry = nexus.create_group("entry")
entry["instrument/pil3_100k/data"] = h5py.ExternalLink(f"{name}-det.h5", "/entry/instrument/detector/data")
entry["scan_command"] = f"scan eta 0 {n - 1} 1 pil3_100k 1"
keys = entry.create_dataset("diamond_scan/keys/uniqueKeys", shape=(n,), dtype="int32", chunks=(n,), fillvalue=0)
finished = entry.create_dataset("diamond_scan/scan_finished", data=[0], dtype="int32", chunks=(1,), maxshape=(None,))
entry["diamond_scan/scan_shape"] = [n]
detector.swmr_mode = True
nexus.swmr_mode = True
import os; os.replace(f"{directory}/{name}.nxs.part", f"{directory}/{name}.nxs")
written = 0
for line in sys.stdin:
    command, first, last = line.split()
    first, last = int(first), int(last)
    if command == "write":
        for index in range(first, last):  # as the simulated detector writes: one flushed frame at a time
            data.resize(index + 1, axis=0)
            data.id.write_direct_chunk((index, 0, 0), (rng.poisson(3.0, size=(195, 487)) + 1).astype("int32").data)
            data.flush()
            detector.flush()
    elif command == "key":
        keys[first:last] = np.arange(first, last) + 1
        keys.flush()
        nexus.flush()
    elif command == "finish":
        finished[0] = 1
        finished.flush()
        nexus.flush()
        break
    print("ok", flush=True)
nexus.close(); detector.close()
"""


def test_frames_cut_out_by_a_truncation_leave_the_scan_incomplete_naming_them(daemon, tmp_path):
    config, watched, _, _ = daemon
    directory = watched / "truncated"
    directory.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", TRUNCATING_WRITER, str(directory), "cut", "40"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    store = directory / "cut.zarr"

    def command(text: str) -> None:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(text + "\n")
        writer.stdin.flush()
        if not text.startswith("finish"):
            assert writer.stdout.readline().strip() == "ok"

    command("write 0 10")
    command("key 0 10")
    wait_until(lambda: store_status(store) == "running" and open_live(store)["frames/done"][:10].sum() == 10, 60, "frames 0-9 done")
    command("write 10 30")  # on disk, not keyed yet: not read
    detector = directory / "cut-det.h5"
    size = detector.stat().st_size
    with h5py.File(detector, "r", swmr=True, locking=False) as handle:
        chunk = handle["entry/instrument/detector/data"].id.get_chunk_info_by_coord((20, 0, 0))
    os.truncate(detector, chunk.byte_offset)  # frames from 20 on are cut out; the writer writes on
    assert detector.stat().st_size < size
    command("write 30 40")
    command("key 10 40")
    command("finish 0 0")
    writer.wait(timeout=30)
    wait_for_status([store], timeout=60)
    group = open_live(store)
    assert group.attrs["status"] == "incomplete", dict(group.attrs)
    lost = group.attrs["lost_frames"]
    assert lost == list(range(20, 30)), lost
    assert "10 frame(s) lost: the detector file was truncated while being read (20, 21" in group.attrs["end_reason"]
    done = group["frames/done"][:]
    assert done[:20].tolist() == [1] * 20 and done[20:30].tolist() == [0] * 10 and done[30:].tolist() == [1] * 10


def test_sigterm_stops_the_daemon_within_30_s_while_a_reader_is_blocked(tmp_path, untrained_weights):
    watched = tmp_path / "scans"
    watched.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF, readers={"step_timeout_s": 60.0})
    process = start_daemon(config, watched, tmp_path / "daemon.log")
    try:
        wait_for_workers(config, 1)
        writer, good = _good_scan(watched, "good", n_frames=200, seed=6)  # still being written at the stop
        store = _flipped_v3(watched / "rot.nxs").with_suffix(".zarr")
        endpoint = control_endpoint(config)
        wait_until(lambda: any(s["scan"] == "rot.nxs" for s in (query_status(endpoint, 3.0) or {}).get("scans", [])), 30, "rot.nxs opened")
        time.sleep(1.0)  # its reader is inside HDF5's retry loop now
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        stopped_in = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
        writer.kill()
    assert process.returncode == 0 and stopped_in < 30
    assert store_status(good) in (None, "incomplete")  # stopped (no store if its reader had not opened it yet: a loaded machine)
    assert store_status(store) in (None, "failed")


def test_a_live_scan_is_not_queued_behind_a_backlog_of_finished_files(tmp_path, untrained_weights):
    watched = tmp_path / "scans"
    watched.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF, watch={"recursive": True})
    process = start_daemon(config, watched, tmp_path / "daemon.log")
    try:
        wait_for_workers(config, 1)
        staging = tmp_path / "staging"
        staging.mkdir()
        frames = _frames(2, seed=7)
        for index in range(200):
            nexus_file(staging / f"old_{index:03d}.nxs", frames)
        os.rename(staging, watched / "backlog")  # 200 finished scans arrive at once (a copied visit)
        time.sleep(1.0)  # the daemon has found them and started on them
        writer, live = _good_scan(watched, "live", n_frames=40, seed=8)
        started = time.monotonic()
        wait_until(lambda: store_status(live) == "running" and open_live(live)["frames/done"][:].any(), 10,
                   "the live scan's first frame done within 10 s")
        first_frame_s = time.monotonic() - started
        backlog_done = sum(store_status(store) == "complete" for store in (watched / "backlog").glob("*.zarr"))
        writer.join(timeout=60)
    finally:
        stop_daemon(process)
    assert first_frame_s < 10 and backlog_done < 200, (first_frame_s, backlog_done)  # it went before the backlog's end


def _reader_pids(daemon_pid: int) -> list[int]:
    """The daemon's reader processes (children running pipeline.live.reader_process)."""
    pids = []
    for task in Path(f"/proc/{daemon_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"pipeline.live.reader_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(int(child))
    return pids


def _gone(pid: int) -> bool:
    """The process has ended (no such process, or a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_readers_do_not_outlive_a_daemon_killed_while_one_is_blocked(tmp_path, untrained_weights):
    """kill -9 of the daemon (OOM killer, a node's watchdog) while a reader is inside HDF5's retry loop: the reader, which
    runs no Python while HDF5 holds the interpreter lock, must still end (the kernel's parent-death signal), not linger
    for minutes holding the file and a slot."""
    watched = tmp_path / "scans"
    watched.mkdir()
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF, readers={"step_timeout_s": 120.0})
    process = start_daemon(config, watched, tmp_path / "daemon.log")
    readers: list[int] = []
    try:
        wait_for_workers(config, 1)
        _flipped_v3(watched / "rot.nxs")
        endpoint = control_endpoint(config)
        wait_until(lambda: any(s["scan"] == "rot.nxs" for s in (query_status(endpoint, 3.0) or {}).get("scans", [])), 30, "rot.nxs opened")
        time.sleep(1.0)  # its reader is inside HDF5's retry loop now
        readers = _reader_pids(process.pid)
        assert readers, "no reader process found"
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in readers) and time.monotonic() < deadline:
            time.sleep(0.1)
        lingering = [pid for pid in readers if not _gone(pid)]
    finally:
        if process.poll() is None:
            process.kill()
        for pid in readers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert lingering == [], f"readers {lingering} outlived the daemon"
