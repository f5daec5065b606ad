"""Writer crash. The detector's writer killed mid-scan: no partial frame is ever processed, and the
scan ends at the idle timeout marked incomplete.

One real daemon (`pipeline run`, one real worker process) serves the module. The writers are real
processes killed with SIGKILL, so their files are left exactly as a crashed beamline leaves them
(SWMR files still flagged open for writing, no end marker):

- `ScanWriter.kill()` in each of the three layouts, part-way through a slow scan: the store holds
  exactly the frames the file proves complete (the keys for GDA 9, the rows whose data is there
  for the others), each equal to what `pipeline process` makes of the same killed file;
- the hard case, made deterministic: a NeXus-layout writer that grows its dataset by one frame
  (shape flushed, so a SWMR reader sees the new row) and kills itself before writing that frame's
  data. The row reads as the fill value (zeros) and its chunk was never written; the daemon must
  never hand it to a worker.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.simulator.synth import FRAME_SHAPE, RockingScan
from pipeline.simulator.writers import DETECTOR_DATASET, DETECTOR_NAME, END_TIME_DTYPE, ScanPlan, ScanWriter
from pipeline.store import open_live
from pipeline.testing.configs import write_config
from pipeline.testing.daemons import start_daemon, stop_daemon, wait_for_status, wait_for_workers
from pipeline.testing.stores import assert_stores_equal

pytestmark = pytest.mark.daemon

IDLE_TIMEOUT_S = 4.0
RATE_HZ = 4.0
N_FRAMES = 20


@dataclass
class Live:
    config: Path
    watched: Path
    log: Path
    endpoint: str


@pytest.fixture(scope="module")
def live(tmp_path_factory, untrained_weights):
    """One `pipeline run` daemon with one worker, a short idle timeout and a short settle time."""
    import yaml

    root = tmp_path_factory.mktemp("writer-crash")
    watched = root / "watched"
    watched.mkdir()
    config = write_config(root / "config.yaml", untrained_weights,
                          follow={"idle_timeout_s": IDLE_TIMEOUT_S, "settle_s": 0.3})
    log = root / "daemon.log"
    daemon = start_daemon(config, watched, log)
    try:
        wait_for_workers(config, 1)
        yield Live(config, watched, log, yaml.safe_load(config.read_text())["daemon"]["control"])
    finally:
        stop_daemon(daemon)
    assert daemon.returncode == 0, log.read_text()[-3000:]


# -- helpers -----------------------------------------------------------------------------------


def _store(nxs: Path) -> Path:
    return nxs.with_suffix(".zarr")


def _scan_status(live: Live, nxs: Path) -> dict:
    """The daemon's own account of a scan (`pipeline status --json`), e.g. how many frames it read."""
    from pipeline.live.control import query_status

    status = query_status(live.endpoint, timeout_s=5.0)
    assert status is not None, "the daemon does not answer"
    found = [scan for scan in status["scans"] if scan["path"] == str(nxs)]
    assert len(found) == 1, status["scans"]
    return found[0]


def _offline(live: Live, nxs_paths: list[Path], root: Path) -> None:
    """`pipeline process` on the killed files, as they are: incomplete, like the live stores."""
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(live.config), "--output-root", str(root),
                             "--idle-timeout", str(IDLE_TIMEOUT_S), "--no-progress", *map(str, nxs_paths)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]  # 1: not every scan complete
    for nxs in nxs_paths:
        assert f"{nxs.name}: incomplete (" in result.stdout and f") -> {root / _store(nxs).name}\n" in result.stdout, result.stdout


def _frames_dataset(plan: ScanPlan) -> tuple[Path, str]:
    if plan.layout == "nexus":
        return plan.nxs_path, f"entry1/{DETECTOR_NAME}/data"
    return plan.detector_path, DETECTOR_DATASET


def _open(path: Path) -> h5py.File:
    return h5py.File(path, "r", swmr=True, locking=False)  # the killed writer left it flagged open for SWMR writing


def _whole_rows(plan: ScanPlan) -> tuple[int, int]:
    """(rows the frames dataset has, leading rows holding exactly the frame the writer meant) in the killed file."""
    scan = plan.rocking_scan()
    path, dataset = _frames_dataset(plan)
    with _open(path) as handle:
        data = handle[dataset]
        rows = int(data.shape[0])
        whole = 0
        while whole < rows and np.array_equal(data[whole], scan.frame(whole)[0]):
            whole += 1
    return rows, whole


def _keyed(plan: ScanPlan) -> int:
    """GDA 9: the frames whose key the writer set (it sets them in order, only once the frame is flushed)."""
    with _open(plan.nxs_path) as handle:
        keys = handle["entry/diamond_scan/keys/uniqueKeys"][:]
    keyed = np.flatnonzero(keys)
    assert keyed.tolist() == list(range(keyed.size)), keys  # a prefix
    return int(keyed.size)


def _assert_ended_incomplete_with(store: Path, frames: int) -> None:
    group = open_live(store)
    attrs = dict(group.attrs)
    assert (attrs["status"], attrs["end_reason"]) == ("incomplete", "idle_timeout"), attrs
    assert attrs["frames_total"] == frames and attrs["frames_done"] == frames, attrs
    # trimmed to the frames the scan has: nothing past the last complete frame is done, or even there
    assert group["frames/done"][:].tolist() == [1] * frames
    assert group["tlm/labels"].shape[0] == frames
    assert "all_zero" not in (attrs.get("bad_frames") or {}), attrs["bad_frames"]
    assert attrs["failed_frames"] == []


# -- the tests ---------------------------------------------------------------------------------


def test_writers_killed_mid_scan_end_incomplete_with_exactly_the_frames_in_the_file(live, tmp_path):
    directory = live.watched / "killed"
    plans = [ScanPlan(directory=directory, name=f"killed-{layout}", layout=layout, n_frames=N_FRAMES, rate_hz=RATE_HZ, seed=30 + i)
             for i, layout in enumerate(("gda9", "gda8", "nexus"))]
    writers = [ScanWriter(plan).start() for plan in plans]
    deadline = time.monotonic() + 120
    for i, writer in enumerate(writers):  # kill each a few frames in, at a different point of the frame period
        while writer.frames_written < 4 + i and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(i * 0.4 / RATE_HZ)
        writer.kill()
    assert all(not w.is_alive() for w in writers)
    stores = [_store(plan.nxs_path) for plan in plans]
    wait_for_status(stores, timeout=90)

    expected = {}
    for plan in plans:
        rows, whole = _whole_rows(plan)
        expected[plan.layout] = _keyed(plan) if plan.layout == "gda9" else whole
        print(f"{plan.layout}: killed with {rows} row(s) in the file, {whole} whole, {expected[plan.layout]} proven complete")
        assert expected[plan.layout] <= whole <= rows
        assert 3 <= expected[plan.layout] < N_FRAMES, (plan.layout, rows, whole)
    for plan in plans:
        frames = expected[plan.layout]
        _assert_ended_incomplete_with(_store(plan.nxs_path), frames)
        assert _scan_status(live, plan.nxs_path)["frames_read"] == frames  # nothing past them was even read
        assert open_live(_store(plan.nxs_path)).attrs["layout"] == plan.layout

    offline = tmp_path / "offline"
    _offline(live, [plan.nxs_path for plan in plans], offline)
    for plan in plans:
        assert_stores_equal(_store(plan.nxs_path), offline / _store(plan.nxs_path).name)


def _write_then_die(path: str, n_frames: int, whole: int, seed: int, rate_hz: float) -> None:
    """A NeXus-layout writer (as pipeline.simulator.writers's, SWMR, frames inside the .nxs) that writes `whole` frames,
    then grows the dataset by one frame, flushes the new shape, and is killed before it writes that frame."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    scan = RockingScan(n_frames, seed)
    with h5py.File(path, "w", libver="latest") as handle:
        entry = handle.create_group("entry1")
        entry.attrs["NX_class"] = "NXentry"
        entry.create_dataset("scan_command", data=f"scan eta 10 {10 + 0.02 * (n_frames - 1):.2f} 0.02 {DETECTOR_NAME} 1")
        entry.create_dataset("start_time", data=time.strftime("%Y-%m-%dT%H:%M:%S"))
        entry.create_dataset("end_time", data=np.bytes_(b""), dtype=END_TIME_DTYPE)  # never filled: it crashes
        entry.create_group("instrument").create_group(DETECTOR_NAME).attrs["NX_class"] = "NXdetector"
        nxdata = entry.create_group(DETECTOR_NAME)
        nxdata.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": ["eta", ".", "."], "eta_indices": 0})
        data = nxdata.create_dataset("data", shape=(0, *FRAME_SHAPE), maxshape=(None, *FRAME_SHAPE), dtype=np.int32,
                                     chunks=(1, *FRAME_SHAPE))
        eta = nxdata.create_dataset("eta", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(256,))
        handle.swmr_mode = True
        start = time.monotonic()
        for index in range(whole + 1):
            time.sleep(max(0.0, start + index / rate_hz - time.monotonic()))
            data.resize(index + 1, axis=0)
            eta.resize(index + 1, axis=0)
            eta[index] = scan.axis_values[index]  # the frame's axis value is there...
            if index < whole:
                data[index] = scan.frame(index)[0]
            data.flush()  # ...and so is its row: a SWMR reader sees the new shape
            eta.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # ...but its data never will be


def test_a_frame_grown_but_never_written_is_never_processed(live, tmp_path):
    directory = live.watched / "partial"
    directory.mkdir()
    nxs, n_frames, whole = directory / "partial.nxs", 12, 5
    writer = multiprocessing.get_context("spawn").Process(target=_write_then_die, args=(str(nxs), n_frames, whole, 40, RATE_HZ))
    writer.start()
    writer.join(timeout=60)
    assert writer.exitcode == -signal.SIGKILL
    wait_for_status([_store(nxs)], timeout=60)

    # what the crash left: `whole` frames, and one more row whose chunk was never written (it reads as zeros)
    scan = RockingScan(n_frames, 40)
    with _open(nxs) as handle:
        data = handle[f"entry1/{DETECTOR_NAME}/data"]
        assert data.shape[0] == whole + 1 and handle[f"entry1/{DETECTOR_NAME}/eta"].shape[0] == whole + 1
        for index in range(whole):
            np.testing.assert_array_equal(data[index], scan.frame(index)[0])
        assert not data[whole].any()
        assert data.id.get_chunk_info_by_coord((whole, 0, 0)).byte_offset is None
        assert handle["entry1/end_time"][()] == b""

    _assert_ended_incomplete_with(_store(nxs), whole)
    assert _scan_status(live, nxs)["frames_read"] == whole  # the partial frame never reached a worker
    assert open_live(_store(nxs)).attrs["bad_frames"] == {}
    assert not [line for line in live.log.read_text().splitlines() if "partial.nxs" in line and "all zero" in line]

    offline = tmp_path / "offline"
    _offline(live, [nxs], offline)
    assert_stores_equal(_store(nxs), offline / _store(nxs).name)
