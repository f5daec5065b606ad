"""Sizes a file claims are not trusted: a 6 KB file declaring ten million frames costs nothing.

A NeXus file (frames inside, as DiPID-era files keep them) declares a detector dataset of
10,000,000 frames, writes none of them, claims as many in its scan command and sets its end
marker. Before, every row but the last was "complete" (a later row existed) and was processed as a
frame of zeros. Now a row whose chunk was never written is not a frame, end marker or not: the
scan ends incomplete with 0 frames, the store's arrays hold no frame, and it takes seconds.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from pipeline.common.detector import FRAME_SHAPE
from pipeline.store import StoreReader, schema
from pipeline.store.schema import Attr
from pipeline.testing.configs import MODELS_OFF, write_config

pytestmark = pytest.mark.daemon

CLAIMED = 10_000_000


def test_a_file_claiming_ten_million_unwritten_frames_processes_none(tmp_path: Path, untrained_weights) -> None:
    scan = tmp_path / "claims.nxs"
    with h5py.File(scan, "w", libver="latest") as handle:
        entry = handle.create_group("entry1")
        entry.attrs["NX_class"] = "NXentry"
        entry["scan_command"] = f"scan eta 0 {CLAIMED - 1} 1 pil3_100k 1"
        entry["start_time"] = "2024-01-01T00:00:00"
        entry["end_time"] = "2024-01-01T00:00:01"
        detector = entry.create_group("pil3_100k")
        detector.create_dataset("data", shape=(CLAIMED, *FRAME_SHAPE), dtype="int32", chunks=(1, *FRAME_SHAPE))
    assert scan.stat().st_size < 64 * 1024
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF, follow={"end_grace_s": 3.0, "settle_s": 0.3})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(scan)],
                            capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout
    store = StoreReader(scan.with_suffix(".zarr"))
    assert store.status == schema.STATUS_INCOMPLETE, store.attrs
    assert store.attrs[Attr.FRAMES_EXPECTED] == CLAIMED and store.frames_total == 0  # never sized from the claim
    assert store.done_frames().size == 0
    assert f"0 of {CLAIMED} frames" in store.attrs[Attr.END_REASON], store.attrs[Attr.END_REASON]
    assert elapsed < 120, f"{elapsed:.0f} s"
