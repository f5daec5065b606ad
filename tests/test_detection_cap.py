"""A crowded frame at the TLM's detection cap is said, not hidden: wire, daemon log and store.

Issue 26: on real Pilatus frames the TLM returned exactly 16 detections per frame, silently. Here real
thaumatin modules (dials/data-files, see pipeline/models/data/README) are put into a simulated GDA 9
scan, `pipeline process` runs the shipped models with a cap of 8 detections, and the store must list
the crowded frames in `capped_frames` (the blank one not), with `detection_cap` 8, and the log warn once.
"""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np

from pipeline.live.wire import FrameResult, WireError, decode_result, encode_result
from pipeline.models.prediction import FramePrediction
from pipeline.models.real_frames import REAL_MODULES, load_frames
from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store import open_live
from pipeline.testing.configs import write_config

CROWDED = [0, 1, 2, 3]  # 59-81 reference spots each (tests/test_real_frames.py)
BLANK = 7


def _prediction(capped: bool, cap: int) -> FramePrediction:
    shape = (4, 6)
    return FramePrediction(tlm_labels=np.zeros(shape, np.uint16), detections=[], ssl_clusters=np.zeros(shape, np.uint8),
                           ssl_mask=np.zeros(shape, np.uint8), timings={}, detections_capped=capped, detection_cap=cap)


def test_the_cap_travels_on_the_wire_and_a_bad_one_is_refused() -> None:
    result = FrameResult(task=1, scan="s", frame=2, worker="w", prediction=_prediction(True, 100))
    decoded = decode_result([bytes(part) for part in encode_result(result)]).prediction
    assert (decoded.detections_capped, decoded.detection_cap) == (True, 100)
    parts = [bytes(part) for part in encode_result(result)]
    for bad in (b'"detection_cap":-1', b'"detection_cap":true', b'"detection_cap":5000'):
        hostile = parts[:1] + [parts[1].replace(b'"detection_cap":100', bad)] + parts[2:]
        try:
            decode_result(hostile)
        except WireError as error:
            assert "detection_cap" in str(error)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_crowded_real_frames_at_the_cap_are_listed_in_the_store(tmp_path) -> None:
    modules = load_frames(REAL_MODULES)[0][[*CROWDED, BLANK]]
    plan = ScanPlan(directory=tmp_path / "scans", name="thaumatin", layout="gda9", n_frames=len(modules), rate_hz=50.0, seed=1)
    plan.directory.mkdir()
    write_scan(plan)
    with h5py.File(plan.detector_path, "r+") as detector:  # the real frames in place of the simulated ones
        dataset = _frames_dataset(detector)
        dataset[...] = modules.astype(dataset.dtype)
    config = write_config(tmp_path / "config.yaml", models={"precision": "float32", "tlm": {"detections": 8}})
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--output-root",
                             str(tmp_path / "out"), str(plan.nxs_path)], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    store = open_live(tmp_path / "out" / "thaumatin.zarr")
    assert store.attrs["status"] == "complete", dict(store.attrs)
    assert store.attrs["capped_frames"] == [0, 1, 2, 3] and store.attrs["detection_cap"] == 8
    assert output.count("returned its cap of 8 detections") == 1, output[-3000:]


def _frames_dataset(group: h5py.Group) -> h5py.Dataset:
    found: list[h5py.Dataset] = []
    group.visititems(lambda _, item: found.append(item) if isinstance(item, h5py.Dataset) and item.ndim == 3 else None)
    return found[0]
