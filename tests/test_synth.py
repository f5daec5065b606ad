"""Tests of the synthetic frame generator: contracts other modules rely on, and realism checks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.simulator.synth import (
    DEAD_PIXEL_VALUE,
    FRAME_SHAPE,
    SATURATION,
    RockingScan,
    SynthSettings,
    load_outline_bank,
    training_sample,
)


def test_outline_bank_loads_real_outlines_without_pickle() -> None:
    bank = load_outline_bank()
    assert 1200 <= len(bank) <= 1300
    assert bank.points.dtype == np.float32 and bank.offsets[-1] == len(bank.points)
    assert bank.peaks_per_frame.sum() > 700 and len(bank.peaks_per_frame) == 9
    widths = bank.sizes[:, 0]
    assert 25 <= np.median(widths) <= 45 and widths.max() <= 190
    polygon = bank.polygon(0)
    assert polygon.min() >= 0 and polygon.max() <= 1 + 1e-6
    assert all(mask.any() for mask in bank.masks)


def test_training_sample_dtype_shape_and_determinism() -> None:
    counts, labels = training_sample(np.random.default_rng(7))
    again_counts, again_labels = training_sample(np.random.default_rng(7))
    assert counts.dtype == np.int32 and counts.shape == FRAME_SHAPE
    assert labels.dtype == np.uint16 and labels.shape == FRAME_SHAPE
    np.testing.assert_array_equal(counts, again_counts)
    np.testing.assert_array_equal(labels, again_labels)
    other_counts, _ = training_sample(np.random.default_rng(8))
    assert not np.array_equal(counts, other_counts)


def test_labels_are_consecutive_ids_and_peaks_are_brighter_than_background() -> None:
    rng = np.random.default_rng(3)
    seen_peaks = 0
    for _ in range(40):
        counts, labels = training_sample(rng)
        ids = np.unique(labels)
        ids = ids[ids > 0]
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
        assert len(ids) <= 8
        background = np.median(counts[labels == 0])
        for peak_id in ids:
            seen_peaks += 1
            assert counts[labels == peak_id].max() > background + 10
    assert seen_peaks > 30


def test_dead_pixels_read_minus_two() -> None:
    settings = SynthSettings(dead_pixel_fraction=0.01)
    counts, _ = training_sample(np.random.default_rng(0), settings)
    dead = counts == DEAD_PIXEL_VALUE
    assert 0.005 * counts.size < dead.sum() < 0.02 * counts.size
    assert counts[~dead].min() >= 0
    clean, _ = training_sample(np.random.default_rng(0), SynthSettings(dead_pixel_fraction=0.0))
    assert (clean >= 0).all()


def test_bright_peaks_saturate() -> None:
    settings = SynthSettings(saturated_peak_probability=1.0, peaks_per_frame=(0, 1))
    counts, labels = training_sample(np.random.default_rng(1), settings)
    assert counts.max() == SATURATION
    assert (labels[counts == SATURATION] > 0).all()
    faint = SynthSettings(saturated_peak_probability=0.0, peak_max_counts=(30.0, 100.0), peaks_per_frame=(0, 1))
    counts, _ = training_sample(np.random.default_rng(1), faint)
    assert counts.max() < SATURATION


def test_peak_sizes_and_counts_follow_the_real_distribution() -> None:
    rng = np.random.default_rng(11)
    widths, heights, per_frame = [], [], []
    for _ in range(150):
        _, labels = training_sample(rng)
        per_frame.append(int(labels.max()))
        for peak_id in range(1, int(labels.max()) + 1):
            rows, cols = np.nonzero(labels == peak_id)
            widths.append(np.ptp(cols) + 1)
            heights.append(np.ptp(rows) + 1)
    assert 20 <= np.median(widths) <= 60
    assert 20 <= np.median(heights) <= 60
    assert np.percentile(widths, 10) < 15 and np.percentile(widths, 90) > 50
    assert 1.0 <= np.mean(per_frame) <= 2.5
    assert per_frame.count(0) > 0


def test_training_sample_is_fast() -> None:
    rng = np.random.default_rng(0)
    training_sample(rng)
    start = time.perf_counter()
    for _ in range(20):
        training_sample(rng)
    assert (time.perf_counter() - start) / 20 < 0.05  # target < 20 ms; slack for a busy CI machine


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        SynthSettings(peak_max_counts=(10.0, 1.0))
    with pytest.raises(ValueError):
        SynthSettings(streak_probability=2.0)


@pytest.fixture(scope="module")
def scan() -> RockingScan:
    return RockingScan(n_frames=40, seed=5)


def test_rocking_scan_axis_and_dead_pixels(scan: RockingScan) -> None:
    assert scan.axis_name == "eta" and scan.n_frames == 40
    assert scan.axis_values.dtype == np.float64 and scan.axis_values.shape == (40,)
    np.testing.assert_allclose(np.diff(scan.axis_values), 0.02)
    counts, _ = scan.frame(3)
    rows, cols = scan.dead_pixels[:, 0], scan.dead_pixels[:, 1]
    assert len(scan.dead_pixels) > 0
    assert (counts[rows, cols] == DEAD_PIXEL_VALUE).all()
    later, _ = scan.frame(30)
    assert (later[rows, cols] == DEAD_PIXEL_VALUE).all()


def test_rocking_scan_frames_are_deterministic_in_any_order(scan: RockingScan) -> None:
    backward = [scan.frame(i) for i in (9, 4)]
    fresh = RockingScan(n_frames=40, seed=5)
    forward = [fresh.frame(i) for i in (4, 9)][::-1]
    for (counts_a, truth_a), (counts_b, truth_b) in zip(backward, forward):
        assert counts_a.dtype == np.int32 and truth_a.dtype == np.uint16
        np.testing.assert_array_equal(counts_a, counts_b)
        np.testing.assert_array_equal(truth_a, truth_b)
    assert not np.array_equal(scan.frame(4)[0], scan.frame(5)[0])


def test_rocking_truth_spans_consecutive_frames(scan: RockingScan) -> None:
    assert len(scan.peaks) >= 3
    assert [p.id for p in scan.peaks] == list(range(1, len(scan.peaks) + 1))
    truths = np.stack([scan.frame(i)[1] for i in range(scan.n_frames)])
    for peak in scan.peaks:
        assert 0 <= peak.first_frame <= peak.centre_frame <= peak.last_frame < scan.n_frames
        present = np.flatnonzero((truths == peak.id).any(axis=(1, 2)))
        np.testing.assert_array_equal(present, np.arange(peak.first_frame, peak.last_frame + 1))
    assert set(np.unique(truths)) <= {0, *(p.id for p in scan.peaks)}


def test_rocking_peak_rises_and_falls() -> None:
    scan = RockingScan(n_frames=30, seed=2, settings=SynthSettings(saturated_peak_probability=0.0), n_peaks=3)
    peak = max(scan.peaks, key=lambda p: p.last_frame - p.first_frame)
    truth = scan.truth(peak.centre_frame) == peak.id
    signal = [float(scan.expected(i)[truth].sum()) for i in range(scan.n_frames)]
    assert int(np.argmax(signal)) in (peak.centre_frame - 1, peak.centre_frame, peak.centre_frame + 1)
    assert signal[peak.centre_frame] > signal[max(peak.first_frame - 1, 0)]
    assert signal[peak.centre_frame] > signal[min(peak.last_frame + 1, scan.n_frames - 1)]


def test_rocking_peaks_present_together_do_not_overlap() -> None:
    scan = RockingScan(n_frames=30, seed=9, n_peaks=12)
    assert len(scan.peaks) >= 6
    for index in range(scan.n_frames):
        truth = scan.truth(index)
        for peak in scan.peaks:
            if peak.first_frame <= index <= peak.last_frame:
                # no neighbour painted over any of its pixels
                assert (truth == peak.id).sum() == _area_alone(scan, peak, index) > 0


def _area_alone(scan: RockingScan, peak, index: int) -> int:
    """Pixels of the peak's outline inside the frame at its drifted position, painted without the others."""
    alone = RockingScan.__new__(RockingScan)
    alone.__dict__.update(scan.__dict__)
    alone.peaks = [peak]
    alone._masks = [scan._masks[scan.peaks.index(peak)]]
    return int((alone.truth(index) == peak.id).sum())
