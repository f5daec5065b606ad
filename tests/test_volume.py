"""3D linking: one id per peak across consecutive frames, the same ids offline, live and resumed."""

import numpy as np

from pipeline.common.volume import VolumeLinker


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_a_peak_spanning_frames_keeps_one_id_and_stats_are_exact():
    shape = (40, 60)
    linker = VolumeLinker()
    raw = np.full(shape, 10, dtype=np.int32)
    frames = []
    for index in range(8):
        mask = np.zeros(shape, bool)
        if 2 <= index <= 5:
            mask |= _disc(shape, 10, 10 + index, 4)  # drifting peak A
        if 4 <= index <= 6:
            mask |= _disc(shape, 30, 45, 3)  # peak B appears later
        frames.append(linker.link(index, mask, raw, axis_value=10.0 + 0.1 * index))
    volume = np.stack(frames)
    assert sorted(np.unique(volume).tolist()) == [0, 1, 2]
    table = linker.table()
    assert table["id"].tolist() == [1, 2]
    assert table["first_frame"].tolist() == [2, 4]
    assert table["last_frame"].tolist() == [5, 6]
    assert table["voxels"].tolist() == [int((volume == 1).sum()), int((volume == 2).sum())]
    assert table["intensity_sum"].tolist() == [10.0 * (volume == 1).sum(), 10.0 * (volume == 2).sum()]
    np.testing.assert_allclose(table["centroid_frame"], [3.5, 5.0])
    np.testing.assert_allclose(table["axis_value"], [10.0 + 0.1 * 4, 10.5])  # frame 3.5 rounds to 4


def test_replaying_recorded_labels_resumes_with_the_same_ids():
    shape = (30, 30)
    rng = np.random.default_rng(3)
    masks = [_disc(shape, 15, 15, 3 + (i % 3)) if i % 4 else np.zeros(shape, bool) for i in range(10)]
    raws = [rng.integers(0, 100, shape) for _ in masks]
    full = VolumeLinker()
    expected = [full.link(i, m, r) for i, (m, r) in enumerate(zip(masks, raws))]
    resumed = VolumeLinker()
    for i in range(5):
        resumed.record(i, expected[i], raws[i], None)
    rest = [resumed.link(i, masks[i], raws[i]) for i in range(5, 10)]
    for got, want in zip(rest, expected[5:]):
        np.testing.assert_array_equal(got, want)
    for key, column in full.table().items():
        np.testing.assert_allclose(resumed.table()[key], column)


def test_frames_must_come_in_order():
    linker = VolumeLinker()
    linker.link(0, np.zeros((4, 4), bool), np.zeros((4, 4)))
    try:
        linker.link(2, np.zeros((4, 4), bool), np.zeros((4, 4)))
    except ValueError as error:
        assert "out of order" in str(error)
    else:
        raise AssertionError("linking frame 2 after 0 must fail")


def test_specks_below_min_pixels_are_not_linked_into_peaks():
    shape = (30, 40)
    raw = np.ones(shape)
    linker = VolumeLinker(min_pixels=5)
    labels = []
    for index in range(3):
        mask = _disc(shape, 10, 10, 3)  # 29 pixels: a peak in every frame
        mask[25, 5 + 10 * index] = True  # a hot pixel, somewhere else each frame
        mask[2, 30:34] = index == 1  # a 4-pixel streak fragment in frame 1 only
        labels.append(linker.link(index, mask, raw))
    volume = np.stack(labels)
    assert np.unique(volume).tolist() == [0, 1]  # one peak; no hot pixel or fragment became one
    assert (volume == 1).sum() == 3 * _disc(shape, 10, 10, 3).sum()
    assert linker.table()["id"].tolist() == [1]
    speckled = _disc(shape, 10, 10, 3)
    speckled[25, 5] = True
    assert np.unique(VolumeLinker().link(0, speckled, raw)).tolist() == [0, 1, 2]  # min_pixels 1 keeps the speck


def _reference_link(masks, raws, min_pixels):
    """The linking rule written plainly over whole frames (the linker works at the masked pixels only, for speed)."""
    from scipy import ndimage

    previous, next_id, all_labels, sums = None, 1, [], {}
    for mask, raw in zip(masks, raws):
        components, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for component in range(1, count + 1):
            if sizes[component] < min_pixels:
                components[components == component] = 0
        labels = np.zeros(mask.shape, np.uint32)
        for component in np.unique(components[components > 0]):
            here = components == component
            overlapped = previous[here] if previous is not None else np.zeros(0, np.uint32)
            overlapped = overlapped[overlapped > 0]
            if overlapped.size:
                ids, counts = np.unique(overlapped, return_counts=True)
                labels[here] = ids[np.lexsort((ids, -counts))[0]]  # most overlap, then the lower id (a split peak
                continue  # keeps its id in both parts)
            labels[here] = next_id
            next_id += 1
        for peak in np.unique(labels[labels > 0]):
            weights = np.clip(raw[labels == peak].astype(np.float64), 0, None)
            total = sums.setdefault(int(peak), [0, 0.0, 0.0])
            total[0] += int((labels == peak).sum())
            total[1] += float(weights.sum())
            total[2] = max(total[2], float(weights.max()))
        all_labels.append(labels)
        previous = labels
    return all_labels, sums


def test_the_linker_agrees_with_the_plain_rule_on_real_pilatus_frames():
    """Crops of real Pilatus 6M frames (module gaps -1, dead pixels -2), shifted a pixel every three frames as a rocking
    scan moves its spots, thresholded at two levels: the same 3D labels and per-peak sums as the rule written plainly."""
    from pathlib import Path

    modules = np.load(Path(__file__).parents[1] / "pipeline/models/data/pilatus_modules.npz")["frames"]
    raws = [np.roll(modules[index % 3], index // 3, axis=1) for index in range(9)]
    for threshold, min_pixels in ((30, 5), (10, 1)):
        masks = [raw > threshold for raw in raws]
        linker = VolumeLinker(min_pixels)
        labels = [linker.link(index, mask, raw) for index, (mask, raw) in enumerate(zip(masks, raws))]
        expected, sums = _reference_link(masks, raws, min_pixels)
        for index in range(len(raws)):
            np.testing.assert_array_equal(labels[index], expected[index], err_msg=f"frame {index}, threshold {threshold}")
        table = linker.table()
        assert table["id"].tolist() == sorted(sums) and len(sums) > 20
        assert table["voxels"].tolist() == [sums[peak][0] for peak in sorted(sums)]
        np.testing.assert_allclose(table["intensity_sum"], [sums[peak][1] for peak in sorted(sums)], rtol=1e-12)
        np.testing.assert_allclose(table["intensity_max"], [sums[peak][2] for peak in sorted(sums)], rtol=0)
