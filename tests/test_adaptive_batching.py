"""Adaptive batching (issue 24): how many waiting frames a worker takes next, and what padding by bucket does to masks.

`BatchSizer` is checked on its own with real numbers; a real daemon (in this process, for its per-frame timings hook)
with one real worker process, slowed by the test kit's slow worker (the models are off: the delay is the work), shows
a burst run in batches > 1 and frames arriving slowly run one at a time; real (untrained) models on the CPU show
that `batch_padding: bucket` keeps a frame's masks within its bucket and `fixed` across every batch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from pipeline.config import ModelSettings, SSLMSettings, TLMSettings, load_config
from pipeline.live.batching import BatchSizer
from pipeline.models.batch_buckets import bucket_for, buckets
from pipeline.models.joint import JointPredictor
from pipeline.simulator import synth
from pipeline.simulator.writers import ScanPlan, ScanWriter
from pipeline.testing.configs import MODELS_OFF, write_config, write_untrained_weights
from pipeline.testing.daemons import wait_for_status
from pipeline.testing.slow_worker import DELAY_ENV


def learnt(sizer: BatchSizer, size: int, seconds: float, calls: int = 2) -> BatchSizer:
    """`calls` model calls of `size` frames taking `seconds` each (the first of a size is not learnt from)."""
    for _ in range(calls):
        sizer.record(size, seconds)
    return sizer


def test_buckets_are_powers_of_two_up_to_the_largest() -> None:
    assert buckets(1) == (1,)
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(6) == (1, 2, 4, 6)
    assert [bucket_for(n, 8) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="at least one frame"):
        bucket_for(0, 8)


def test_a_backlog_with_a_fast_model_goes_in_one_big_batch() -> None:
    sizer = learnt(learnt(BatchSizer(8, latency_target_s=0.1), 1, 0.004), 8, 0.012)
    assert sizer.choose(waiting=10, oldest_wait_s=0.0) == 8
    assert sizer.choose(waiting=5, oldest_wait_s=0.02) == 5  # five waiting: all of them (a call of 8 where padded by bucket)


def test_the_oldest_frame_near_its_target_goes_alone() -> None:
    sizer = BatchSizer(8, latency_target_s=0.1)
    for size, seconds in ((1, 0.02), (2, 0.035), (4, 0.06), (8, 0.1)):
        learnt(sizer, size, seconds)
    assert sizer.choose(waiting=10, oldest_wait_s=0.0) == 8  # 0.1 s of 0.1 s: just fits
    assert sizer.choose(waiting=10, oldest_wait_s=0.03) == 4  # 0.07 s left
    assert sizer.choose(waiting=10, oldest_wait_s=0.07) == 1  # 0.03 s left: one frame (0.02 s) fits, two (0.035 s) not
    # past saving (not even one frame ends in time): the biggest batch waiting, the backlog's fastest way down
    assert sizer.choose(waiting=10, oldest_wait_s=0.5) == 8
    assert sizer.choose(waiting=3, oldest_wait_s=0.5) == 3


def test_never_more_than_the_largest_and_at_least_one() -> None:
    fast = learnt(BatchSizer(4, latency_target_s=10.0), 1, 1e-4)
    assert [fast.choose(waiting, 0.0) for waiting in (0, 1, 2, 3, 4, 5, 100)] == [1, 1, 2, 3, 4, 4, 4]
    untuned = BatchSizer(4)  # no target: every waiting frame up to the largest, as before
    assert [untuned.choose(waiting, 99.0) for waiting in (1, 3, 9)] == [1, 3, 4]
    new = BatchSizer(8, latency_target_s=0.1)  # nothing learnt yet: one frame, to learn the models' speed cheaply
    assert new.choose(10, 0.0) == 1
    new.record(1, 5.0)  # the first call (lazy loads, allocation): not learnt from
    assert new.estimate(1) is None and new.choose(10, 0.0) == 1
    new.record(1, 0.01)
    assert new.estimate(1) == pytest.approx(0.01) and new.estimate(4) == pytest.approx(0.04)  # per-frame time times 4
    assert new.choose(10, 0.0) == 8  # 0.08 s fits in 0.1 s


def test_a_size_that_turns_slow_is_learnt_and_avoided() -> None:
    sizer = learnt(learnt(BatchSizer(4, latency_target_s=0.1, smoothing=0.5), 2, 0.03), 4, 0.05)
    assert sizer.choose(waiting=6, oldest_wait_s=0.0) == 4
    for _ in range(6):  # calls of 4 now take 0.2 s (another process shares the GPU, say)
        sizer.record(4, 0.2)
    assert sizer.estimate(4) == pytest.approx(0.2 - 0.15 * 0.5**6)
    assert sizer.choose(waiting=6, oldest_wait_s=0.0) == 2
    assert sizer.estimate(3) == sizer.estimate(4)  # three frames are a call of the 4 bucket


def test_bad_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="latency_target_s must be > 0"):
        BatchSizer(4, latency_target_s=0.0)
    with pytest.raises(ValueError, match="largest batch must be >= 1"):
        BatchSizer(0)
    with pytest.raises(ValueError, match="batch_padding must be fixed or bucket"):
        JointPredictor(batch_padding="loose")  # type: ignore[arg-type]


@pytest.mark.daemon
def test_a_real_worker_runs_a_burst_in_batches_and_slow_frames_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of 24 frames written while the worker starts: the worker, 0.05 s a frame, takes several at a time within a 1 s target;
    then 5 frames written 0.4 s apart: each alone. Each frame's batch comes back in its timings (the daemon's hook)."""
    from pipeline.live.daemon import Daemon
    from pipeline.live.timings import FrameTimings

    scans = tmp_path / "scans"
    scans.mkdir()
    config = load_config(write_config(tmp_path / "config.yaml", models=MODELS_OFF, watch={"dirs": [str(scans)]},
                                      workers={"local": 1, "batch_size": 8, "credit": 8, "latency_target_s": 1.0,
                                               "command": [sys.executable, "-m", "pipeline.testing.slow_worker"]}))
    batches: dict[str, dict[int, int]] = {}

    def frame_done(scan: str, index: int, timings: FrameTimings) -> None:
        batches.setdefault(Path(scan).stem, {})[index] = int(timings.worker["batch"])

    monkeypatch.setenv(DELAY_ENV, "0.05")  # the local worker inherits it
    # written at ~1 kHz (4 distinct frames over and over), 20 times faster than the worker, while the worker starts:
    # a backlog whenever the worker takes its first frame
    burst = ScanPlan(directory=scans, name="burst", layout="nexus", n_frames=24, rate_hz=1000.0, seed=3, distinct_frames=4)
    writer = ScanWriter(burst).start()
    daemon = Daemon(config, on_frame_done=frame_done).start()
    try:
        writer.join(timeout=60)
        wait_for_status([burst.nxs_path.with_suffix(".zarr")], timeout=90)
        slow = ScanPlan(directory=scans, name="slow", layout="nexus", n_frames=5, rate_hz=2.5, seed=4)
        ScanWriter(slow).start().join(timeout=60)
        wait_for_status([slow.nxs_path.with_suffix(".zarr")], timeout=60)
    finally:
        daemon.shutdown()
    burst_sizes, slow_sizes = batches["burst"], batches["slow"]
    print(f"\nburst batches: {[burst_sizes[i] for i in sorted(burst_sizes)]}; slow: {[slow_sizes[i] for i in sorted(slow_sizes)]}")
    assert sorted(burst_sizes) == list(range(24)) and sorted(slow_sizes) == list(range(5))
    assert all(1 <= size <= 8 for size in burst_sizes.values())
    in_batches = sum(size > 1 for size in burst_sizes.values())
    assert max(burst_sizes.values()) >= 4 and in_batches >= 12, burst_sizes
    assert set(slow_sizes.values()) == {1}, slow_sizes


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained light TLM and SSLM weights, the TLM's threshold low so that it detects plenty."""
    return write_untrained_weights(tmp_path_factory.mktemp("weights"), score_threshold=0.0, peak_channels=(0, 1))


def same(a: object, b: object) -> bool:
    from pipeline.models.prediction import FramePrediction

    assert isinstance(a, FramePrediction) and isinstance(b, FramePrediction)
    return (np.array_equal(a.tlm_labels, b.tlm_labels) and np.array_equal(a.ssl_clusters, b.ssl_clusters)
            and np.array_equal(a.ssl_mask, b.ssl_mask) and a.detections == b.detections)


def test_bucket_padding_keeps_a_frames_masks_within_its_bucket_and_fixed_across_all(weights: dict[str, Path]) -> None:
    rng = np.random.default_rng(7)
    frames = np.stack([synth.training_sample(rng)[0][:96, :192] for _ in range(4)])  # crops (any shape runs): less work

    def predictor(padding: Literal["fixed", "bucket"], model_batch: int) -> JointPredictor:
        return JointPredictor.from_settings(ModelSettings(
            tlm=TLMSettings(weights=weights["tlm"], score_threshold=0.5), sslm=SSLMSettings(weights=weights["sslm"]),
            model_batch=model_batch, batch_padding=padding))

    bucket = predictor("bucket", 4)
    assert [bucket._call_size(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]  # a lone frame: a one-frame call
    four = bucket.predict_batch(frames)  # frames 0-3 in a call of 4
    three = bucket.predict_batch(frames[:0:-1])[::-1]  # frames 3, 2, 1 and a blank frame: the same bucket, other neighbours
    assert all(same(a, b) for a, b in zip(four[1:], three))
    assert sum(len(p.detections) for p in four) >= 4  # real detections were compared

    fixed = predictor("fixed", 2)  # the cheapest batch that shows it: a frame alone is padded to the call of two
    assert [fixed._call_size(n) for n in (1, 2)] == [2, 2]
    pair = fixed.predict_batch(frames[:2])
    assert all(same(alone, in_pair) for alone, in_pair in zip([fixed.predict_image(f) for f in frames[:2]], pair))
