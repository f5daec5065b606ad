"""`output.fsync`: every file of a store is on the disk (file, then its directory) before it counts as written.

A power cut cannot be staged here, so the test watches the system calls: every chunk and metadata
document the writer leaves was fsynced, as was the directory that names it; and a store written
with fsync on holds exactly what one written without it holds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store.durable import DurableLocalStore
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.stores import assert_stores_equal


def test_every_file_and_its_directory_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync_and_note(fd: int) -> None:
        # the data is synced under the temporary name it has before the rename: <name>.<hex>.partial
        synced.append(re.sub(r"\.[0-9a-f]{32}\.partial$", "", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_and_note)
    group = zarr.open_group(store=DurableLocalStore(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    array = group.create_array("frames", shape=(3, 4, 5), chunks=(1, 4, 5), dtype="uint16")
    array[:] = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    group.attrs["status"] = "complete"
    files = sorted(str(p) for p in (tmp_path / "s.zarr").rglob("*") if p.is_file())
    assert len(files) == 5  # group and array metadata, three chunks
    for path in files:
        assert str(path) in synced, f"{path} never fsynced"
        assert str(Path(path).parent) in synced, f"{Path(path).parent} not fsynced after {Path(path).name} was renamed into it"
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "s.zarr", mode="r")["frames"][2], array[2])


@pytest.mark.daemon
def test_a_store_written_with_fsync_equals_one_without(tmp_path: Path, untrained_weights) -> None:
    plan = ScanPlan(directory=tmp_path / "scan", name="durable", layout="gda9", n_frames=6, seed=2)
    write_scan(plan)
    for name, fsync in (("plain", False), ("durable", True)):
        config = write_config(tmp_path / f"{name}.yaml", untrained_weights, models=MODELS_OFF, output={"fsync": fsync})
        result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress",
                                 "--output-root", str(tmp_path / name), str(plan.nxs_path)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_stores_equal(tmp_path / "durable" / "durable.zarr", tmp_path / "plain" / "durable.zarr")
