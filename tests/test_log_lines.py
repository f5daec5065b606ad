"""The log stays one line per event whatever a scan file holds (audit F8).

Names in log lines come from files anyone in a watched directory can write. A newline in one wrote forged lines into
the daemon's log (and into alerting built on it); a terminal escape cleared the screen of whoever tailed it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from pipeline.testing.configs import MODELS_OFF, write_config


def test_a_detector_group_named_with_a_newline_and_an_escape_forges_no_log_line(tmp_path: Path) -> None:
    scan = tmp_path / "forging.nxs"
    with h5py.File(scan, "w") as handle:
        entry = handle.create_group("entry1")
        entry["scan_command"] = "scan eta 10 10.25 0.25 pil3_100k 1"
        entry["end_time"] = "2024-01-01T00:00:00"
        detector = entry.create_group("instrument").create_group("det\nERROR   MainProcess pipeline.live.session: FORGED\x1b[2J")
        detector.attrs["NX_class"] = "NXdetector"
        detector.create_dataset("data", data=np.ones((2, 195, 487), np.int32), chunks=(1, 195, 487))
    config = write_config(tmp_path / "config.yaml", models=MODELS_OFF)
    done = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress", str(scan)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert not [line for line in lines if line.startswith("ERROR") or "FORGED\x1b" in line], lines
    said = [line for line in lines if "frames of 195 x 487" in line]
    assert len(said) == 1 and "det\\nERROR   MainProcess pipeline.live.session: FORGED\\x1b[2J/data" in said[0], said
