"""With the shipped weights, `volume/labels` and `peaks` agree with the simulator's truth on a scan
whose peaks span several frames: one id per 3D peak, the right frame ranges."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.live.daemon import Daemon
from pipeline.simulator.writers import ScanPlan, write_scan
from pipeline.store import open_live
from pipeline.tools.truth import compare_store_to_truth

pytestmark = pytest.mark.daemon


def test_3d_peaks_and_peaks_table_agree_with_the_truth(tmp_path):
    plan = ScanPlan(directory=tmp_path, name="truth", layout="nexus", n_frames=30, rate_hz=200.0, seed=21, n_peaks=4)
    write_scan(plan)
    config = Config().with_overrides({"workers.local": 1, "workers.device": "cpu", "daemon.control": "tcp://127.0.0.1:0",
                                      "follow.idle_timeout_s": 3.0})
    daemon = Daemon(config, watch=False).start()
    try:
        daemon.add_scan(plan.nxs_path)
        assert daemon.wait_idle(timeout=600)
    finally:
        daemon.shutdown()
    store = plan.nxs_path.with_suffix(".zarr")
    comparison = compare_store_to_truth(store, plan.truth_path)
    spans = [m.truth_frames[1] - m.truth_frames[0] + 1 for m in comparison.matches]
    assert comparison.truth_peaks == 4 and max(spans) >= 3, comparison  # peaks really span several frames
    assert comparison.matched == comparison.truth_peaks, comparison
    assert comparison.one_id_per_peak == comparison.truth_peaks, comparison
    for match in comparison.matches:  # the faintest edge frame of a rocking curve may be missed, no more
        assert abs(match.store_frames[0] - match.truth_frames[0]) <= 1, match
        assert abs(match.store_frames[1] - match.truth_frames[1]) <= 1, match
    assert comparison.found_peaks <= comparison.truth_peaks + 1, comparison  # at most one spurious 3D peak

    group = open_live(store)
    volume = group["volume/labels"][:]
    peaks = {name: group["peaks"][name][:] for name in group["peaks"].array_keys()}
    assert sorted(peaks["id"].tolist()) == sorted(np.unique(volume[volume > 0]).tolist())
    for row, peak_id in enumerate(peaks["id"]):
        frames = np.flatnonzero((volume == peak_id).any(axis=(1, 2)))
        assert (peaks["first_frame"][row], peaks["last_frame"][row]) == (frames[0], frames[-1])
        assert peaks["voxels"][row] == np.count_nonzero(volume == peak_id)
        assert peaks["first_frame"][row] <= peaks["centroid_frame"][row] <= peaks["last_frame"][row]
