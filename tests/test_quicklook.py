"""The quick-look PNG and the frame overlay, on stores made by the real pipeline from a simulated scan.

The pipeline runs on untrained weights here, so its own masks are not peaks; a copy of its store
gets the simulator's ground-truth labels instead, so that the peaks, their footprints and their
rocking curves are known and can be checked against a direct numpy computation. The stores are
built once per test session (cached under pytest's session temp dir) and shared with
test_view.py and test_readme_outputs.py.
"""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.pictures.quicklook import (
    OVERLAY_FIGSIZE,
    QUICKLOOK_FIGSIZE,
    StoreError,
    done_blocks,
    quicklook_data,
    quicklook_title,
    sample_volume,
    save_frame_overlay,
    write_quicklook,
)
from pipeline.store.reader import StoreReader
from pipeline.testing.pictures import N_FRAMES, SCAN, assert_picture, copy_store, png_size, read_raw, read_truth

pytestmark = pytest.mark.daemon

# -- the quick look ---------------------------------------------------------------------------


def test_quicklook_values_equal_a_direct_computation(truth_store, processed_scan):
    data = quicklook_data(truth_store)
    truth = read_truth(processed_scan.truth)
    raw = np.clip(read_raw(truth_store).astype(np.float64), 0, None)  # dead pixels (-2) count as 0

    assert data.scan == SCAN and data.status == "complete"
    assert data.frames.tolist() == list(range(N_FRAMES))
    assert data.axis_name == "eta"
    np.testing.assert_allclose(data.axis_values, 10.0 + 0.02 * np.arange(N_FRAMES))
    np.testing.assert_array_equal(data.projection, raw.max(axis=0))

    truth_ids = sorted(int(i) for i in np.unique(truth) if i)
    assert truth_ids and data.peak_ids == truth_ids
    for peak_id in truth_ids:
        in_peak = truth == peak_id
        frames = np.flatnonzero(in_peak.any(axis=(1, 2)))
        curve = data.curves[peak_id]
        assert curve.frames.tolist() == frames.tolist()
        np.testing.assert_allclose(curve.sums, [raw[f][in_peak[f]].sum() for f in frames])
        np.testing.assert_allclose(curve.axis_values, 10.0 + 0.02 * frames)
        footprint = data.footprints[peak_id]
        projected = in_peak.any(axis=0)
        ys, xs = np.nonzero(projected)
        assert (footprint.y0, footprint.x0) == (ys.min(), xs.min())
        np.testing.assert_array_equal(footprint.mask, projected[ys.min():ys.max() + 1, xs.min():xs.max() + 1])

    peaks = zarr.open_group(truth_store, mode="r", use_consolidated=False)["peaks"]  # the 3D linker's own sums
    for peak_id, intensity in zip(peaks["id"][:].tolist(), peaks["intensity_sum"][:].tolist()):
        assert data.curves[peak_id].total == pytest.approx(intensity)


def test_quicklook_png_beside_the_store(truth_store):
    path = write_quicklook(truth_store)
    assert path == truth_store.parent / f"{SCAN}.quicklook.png"
    assert_picture(path, png_size(QUICKLOOK_FIGSIZE))
    assert quicklook_title(quicklook_data(truth_store)) == f"{SCAN}: complete, 2 peaks"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_quicklook_png_has_the_mode_the_umask_gives(truth_store, tmp_path, umask, mode):
    """As the store's files: a web view running under another account of the group can read it."""
    store = copy_store(truth_store, tmp_path)
    before = os.umask(umask)
    try:
        path = write_quicklook(store)
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_quicklook_of_the_pipeline_store_matches_its_peaks_table(processed_scan):
    data = quicklook_data(processed_scan.store)
    peaks = zarr.open_group(processed_scan.store, mode="r", use_consolidated=False)["peaks"]
    assert data.peak_ids == sorted(peaks["id"][:].tolist())
    for peak_id, intensity in zip(peaks["id"][:].tolist(), peaks["intensity_sum"][:].tolist()):
        assert data.curves[peak_id].total == pytest.approx(intensity)
    assert_picture(write_quicklook(processed_scan.store, processed_scan.store.parent / "pipeline-store.png"), png_size(QUICKLOOK_FIGSIZE))


def test_quicklook_with_no_peaks(truth_store, tmp_path):
    store = copy_store(truth_store, tmp_path)
    zarr.open_group(store, mode="r+", use_consolidated=False)["volume/labels"][:] = 0
    data = quicklook_data(store)
    assert data.curves == {} and data.footprints == {}
    assert quicklook_title(data) == f"{SCAN}: complete, no peaks found"
    assert data.projection.max() > 0  # the raw counts are still there to look at
    assert_picture(write_quicklook(store), png_size(QUICKLOOK_FIGSIZE))


def test_quicklook_of_a_running_scan_uses_done_frames_only(truth_store, processed_scan, tmp_path):
    store = copy_store(truth_store, tmp_path)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group["frames/done"][4:] = 0
    group.attrs["status"] = "running"
    data = quicklook_data(store)
    assert data.frames.tolist() == [0, 1, 2, 3]
    assert quicklook_title(data).startswith(f"{SCAN}: running, 4/{N_FRAMES} frames done, ")
    truth = read_truth(processed_scan.truth)[:4]
    raw = np.clip(read_raw(store)[:4].astype(np.float64), 0, None)
    np.testing.assert_array_equal(data.projection, raw.max(axis=0))
    for peak_id, curve in data.curves.items():
        assert curve.frames.max() < 4
        np.testing.assert_allclose(curve.sums, [raw[f][truth[f] == peak_id].sum() for f in curve.frames])
    assert_picture(write_quicklook(store), png_size(QUICKLOOK_FIGSIZE))


def test_quicklook_leaves_out_frames_not_done_between_done_ones(truth_store, processed_scan, tmp_path):
    """Frames are read a block at a time: a frame not done (a failed one) inside a block stays out of the picture,
    and blocks never straddle a shard."""
    store = copy_store(truth_store, tmp_path)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group["frames/done"][[2, 5]] = 0
    done = [0, 1, 3, 4, 6, 7]
    data = quicklook_data(store)
    assert data.frames.tolist() == done
    truth = read_truth(processed_scan.truth)
    raw = np.clip(read_raw(store).astype(np.float64), 0, None)
    np.testing.assert_array_equal(data.projection, raw[done].max(axis=0))
    assert data.curves
    for peak_id, curve in data.curves.items():
        assert not set(curve.frames.tolist()) & {2, 5}
        np.testing.assert_allclose(curve.sums, [raw[f][truth[f] == peak_id].sum() for f in curve.frames])

    reader = StoreReader(store)
    volume = reader.group["volume/labels"][:]
    with reader.raw_frames() as dataset:
        blocks = list(done_blocks(reader.group["volume/labels"], dataset, np.array(done), block_frames=3))
    assert [block.tolist() for block, _, _ in blocks] == [[0, 1], [3, 4], [6, 7]]
    for block, labels, block_raw in blocks:
        np.testing.assert_array_equal(labels, volume[block])
        np.testing.assert_array_equal(block_raw, raw[block])


def test_quicklook_without_a_scan_axis_uses_the_frame_index(truth_store, tmp_path):
    store = copy_store(truth_store, tmp_path)
    zarr.open_group(store, mode="r+", use_consolidated=False)["frames/axis"][2] = np.nan
    data = quicklook_data(store)
    assert data.axis_name == "frame"
    assert data.axis_values.tolist() == list(range(N_FRAMES))


def test_raw_file_found_after_scan_and_store_moved_together(truth_store, processed_scan, tmp_path):
    store = copy_store(truth_store, tmp_path)
    shutil.copytree(processed_scan.nxs.parent / f"{SCAN}-pilatus3_100k-files", tmp_path / f"{SCAN}-pilatus3_100k-files")
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group.attrs.update({"source_nexus": "/beamline/old/place/ql-scan.nxs",
                        "source_file": f"/beamline/old/place/{SCAN}-pilatus3_100k-files/{SCAN}.hdf"})
    assert quicklook_data(store).peak_ids == [1, 2]
    shutil.rmtree(tmp_path / f"{SCAN}-pilatus3_100k-files")
    with pytest.raises(StoreError, match="raw file .* not found"):
        quicklook_data(store)


def test_not_a_store_is_one_clear_error(tmp_path):
    with pytest.raises(StoreError, match="not a Zarr store"):
        quicklook_data(tmp_path / "missing.zarr")
    bare = tmp_path / "failed.zarr"
    zarr.open_group(bare, mode="w").attrs.update({"status": "failed", "end_reason": "no detector dataset"})
    with pytest.raises(StoreError, match="nothing to show .status failed: no detector dataset"):
        quicklook_data(bare)


# -- the frame overlay and the 3D sample ---------------------------------------------------------


def test_frame_overlay_log_and_linear(truth_store, tmp_path):
    log_png = save_frame_overlay(truth_store, 3, tmp_path / "log.png")
    linear_png = save_frame_overlay(truth_store, 3, tmp_path / "linear.png", scale="linear")
    for path in (log_png, linear_png):
        assert_picture(path, png_size(OVERLAY_FIGSIZE))
    with Image.open(log_png) as a, Image.open(linear_png) as b:
        assert np.asarray(a).tobytes() != np.asarray(b).tobytes()


def test_frame_overlay_rejects_bad_frames(truth_store, tmp_path):
    with pytest.raises(ValueError, match=f"frame {N_FRAMES} is out of range .the store has frames 0..{N_FRAMES - 1}.") as error:
        save_frame_overlay(truth_store, N_FRAMES, tmp_path / "x.png")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="out of range"):
        save_frame_overlay(truth_store, -1, tmp_path / "x.png")
    store = copy_store(truth_store, tmp_path)
    zarr.open_group(store, mode="r+", use_consolidated=False)["frames/done"][5] = 0
    with pytest.raises(ValueError, match="frame 5 is not done yet"):
        save_frame_overlay(store, 5, tmp_path / "x.png")
    with pytest.raises(ValueError, match="scale must be"):
        save_frame_overlay(truth_store, 1, tmp_path / "x.png", scale="sqrt")  # type: ignore[arg-type]
    assert not (tmp_path / "x.png").exists()


def test_volume_sample_keeps_every_stride_th_voxel(truth_store, processed_scan):
    truth = read_truth(processed_scan.truth)
    voxels = int(np.count_nonzero(truth))
    everything = sample_volume(truth_store, max_points=10 * voxels)
    assert everything.stride == 1 and everything.frame.size == voxels and everything.voxels_total == voxels
    sample = sample_volume(truth_store, max_points=voxels // 10)
    assert sample.stride > 1 and 0 < sample.frame.size <= voxels // 10
    assert sample.voxels_total == voxels and sample.peak_ids == [1, 2]
    frames, ys, xs = np.nonzero(truth)  # C order = the order the sampler walks frames and pixels
    np.testing.assert_array_equal(sample.frame, frames[::sample.stride])
    np.testing.assert_array_equal(sample.peak_id, truth[frames, ys, xs][::sample.stride])


def test_a_zarr_array_or_damaged_store_is_one_clear_error(tmp_path):
    zarr.create_array(tmp_path / "array.zarr", shape=(2,), dtype="int32")
    with pytest.raises(StoreError, match="not a scan store"):
        quicklook_data(tmp_path / "array.zarr")
    (tmp_path / "damaged.zarr").mkdir()
    (tmp_path / "damaged.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a scan store"):
        quicklook_data(tmp_path / "damaged.zarr")


def test_quicklook_with_many_peaks(truth_store, tmp_path):
    """More peaks than are outlined or get a curve: still one readable picture, and every peak in the data."""
    store = copy_store(truth_store, tmp_path)
    volume = zarr.open_group(store, mode="r+", use_consolidated=False)["volume/labels"]
    n_peaks = 45
    for frame in range(N_FRAMES):
        labels = np.zeros(volume.shape[1:], dtype=np.uint32)
        for peak in range(n_peaks):
            y, x = 10 + 40 * (peak % 4), 10 + 10 * peak
            labels[y:y + 6 + frame, x:x + 5] = peak + 1
        volume[frame] = labels
    data = quicklook_data(store)
    assert data.peak_ids == list(range(1, n_peaks + 1))
    assert all(curve.frames.tolist() == list(range(N_FRAMES)) for curve in data.curves.values())
    assert data.footprints[1].mask.shape == (6 + N_FRAMES - 1, 5)  # grown frame by frame
    assert_picture(write_quicklook(store), png_size(QUICKLOOK_FIGSIZE))


def test_the_daemon_leaves_the_quick_look_beside_a_finished_store(processed_scan):
    """`pipeline process` returns only once its painter thread has drawn the picture of the scan it finished."""
    assert_picture(processed_scan.store.parent / f"{SCAN}.quicklook.png", png_size(QUICKLOOK_FIGSIZE))
