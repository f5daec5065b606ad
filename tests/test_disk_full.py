"""A full disk stops a scan without failing it or losing a frame; the scan resumes when space returns.

The stores go to a real 8 MiB tmpfs. Mid-scan, while the detector still writes, the test fills it
to the last byte. The store's writes fail with ENOSPC: before, the store then said `running` for
ever and the scan was not tried again until a restart. Now the scan stops ("waiting for space" in
`pipeline status`), the store keeps every frame done so far, and once the filler is deleted the
daemon resumes the scan by itself: the finished store is `complete`, equal frame by frame to an
undisturbed offline run, and records when writing stopped and resumed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.live.daemon import Daemon
from pipeline.live.shortage import SPACE, waiting_status
from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.store import open_live, schema
from pipeline.store.location import store_path_for
from pipeline.store.schema import Attr
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.daemons import wait_until
from pipeline.testing.stores import assert_stores_equal, done_count, process_offline

pytestmark = pytest.mark.daemon

WAITING_FOR_SPACE = waiting_status(SPACE)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 8 MiB (tmpfs; mounting needs root, as CI's machine gives)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Write zeros until the file system says ENOSPC."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        block = bytes(64 * 1024)
        try:
            while True:
                handle.write(block)
        except OSError:
            pass
        for size in (4096, 512, 1):  # the last scraps too
            try:
                while True:
                    handle.write(bytes(size))
            except OSError:
                pass
    return filler


def test_a_full_disk_stops_the_scan_and_space_resumes_it(tmp_path: Path, small_disk: Path, untrained_weights) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    config = load_config(write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF,
                                      watch={"dirs": [str(scans)]}, output={"root": str(small_disk), "resume_free_mib": 1.0},
                                      follow={"idle_timeout_s": 60.0}))
    # 10 s of frames: the disk fills after the fifth is done, long before the last (writes are quick now: with 30 frames a
    # loaded machine once let the scan finish before the filler had filled the disk)
    plan = ScanPlan(directory=scans, name="full", layout="gda9", n_frames=60, rate_hz=6.0, seed=4)
    store = store_path_for(plan.nxs_path, config.output.root, config.watch.dirs)
    daemon = Daemon(config).start()
    try:
        writer = ScanWriter(plan).start()
        wait_until(lambda: done_count(store) >= 5, 120, "five frames done")
        filler = _fill(small_disk)
        wait_until(lambda: any(s["status"] == WAITING_FOR_SPACE for s in daemon.status()["scans"]), 60, "the scan to wait for space")
        (scan_status,) = [s for s in daemon.status()["scans"] if s["status"] == WAITING_FOR_SPACE]
        assert "No space left on device" in scan_status["reason"] and str(store) in scan_status["reason"]
        done_when_full = done_count(store)
        assert 5 <= done_when_full < plan.n_frames
        assert open_live(store).attrs[Attr.STATUS] == schema.STATUS_RUNNING  # not failed: nothing wrong with the scan
        time.sleep(3)  # still no space: it stays stopped, nothing lost
        assert done_count(store) == done_when_full
        writer.join(timeout=60)
        os.remove(filler)
        wait_until(lambda: open_live(store).attrs.get(Attr.STATUS) in schema.FINAL_STATUSES, 120, "the resumed scan to finish")
        assert daemon.wait_idle(60)
    finally:
        daemon.shutdown()
    group = open_live(store)
    assert group.attrs[Attr.STATUS] == schema.STATUS_COMPLETE, dict(group.attrs)
    assert group[schema.FRAMES_DONE][:].tolist() == [1] * plan.n_frames
    (event,) = group.attrs[Attr.DISK_FULL]
    assert "No space left on device" in event["error"] and event["resumed_at"]
    process_offline(write_config(tmp_path / "offline.yaml", untrained_weights, models=MODELS_OFF), plan.nxs_path, tmp_path / "offline")
    assert_stores_equal(store, tmp_path / "offline" / store.name)


def test_a_store_resumed_on_a_full_disk_is_kept_not_moved_aside(tmp_path: Path, small_disk: Path) -> None:
    """Resuming writes the store's status: on a full disk that fails, and the store must stay as it is (it used to be
    taken for unreadable, moved aside and made again, so its frames were done twice; the soak's audit log showed it)."""
    import errno

    import numpy as np

    from pipeline.common.nexus import ScanInfo
    from pipeline.store.writer import ScanStore

    info = ScanInfo(nexus_path=tmp_path / "s.nxs", scan_id="s", layout="gda9", entry="entry", source_file=tmp_path / "s.nxs",
                    dataset="/entry/data", scan_command="scan", expected_frames=None, axis_name="eta")
    path = small_disk / "s.zarr"
    store = ScanStore.create_or_resume(path, info, (12, 17), {})
    store.ensure_frames(2)
    store.write_volumes(0, [np.zeros((12, 17), np.uint32)] * 2, [1.0, 2.0], [True, True])
    store.close()
    filler = _fill(small_disk)
    with pytest.raises(OSError) as raised:
        ScanStore.create_or_resume(path, info, (12, 17), {})
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError):  # a new store on the full disk: fails, and must not leave its lock held (the soak's retry
        ScanStore.create_or_resume(small_disk / "new.zarr", info, (12, 17), {})  # found "being written by another process")
    assert not [p.name for p in small_disk.iterdir() if "unreadable" in p.name]  # nothing moved aside
    os.remove(filler)
    resumed = ScanStore.create_or_resume(path, info, (12, 17), {})
    assert resumed.done_prefix() == 2  # the frames already done are still done
    resumed.close()
    ScanStore.create_or_resume(small_disk / "new.zarr", info, (12, 17), {}).close()  # its lock was let go
