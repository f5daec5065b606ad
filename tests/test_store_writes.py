"""The store's batched writes: results that reach the sink together are written with one call per array,
and what a reader finds afterwards is exactly what one-by-one writing would have left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from pipeline.common.nexus import ScanInfo
from pipeline.models.prediction import Detection, FramePrediction
from pipeline.store.empty_frames import index_runs
from pipeline.store.schema import MAX_DETECTIONS_PER_FRAME
from pipeline.store.writer import ScanStore

SHAPE = (12, 17)


def _info(path: Path, frames: int | None) -> ScanInfo:
    return ScanInfo(nexus_path=path, scan_id="1", layout="gda9", entry="entry1", source_file=path, dataset="/entry1/data",
                    scan_command="scan", expected_frames=frames, axis_name="eta")


def _prediction(index: int) -> FramePrediction:
    rng = np.random.default_rng(index)
    labels = np.zeros(SHAPE, dtype=np.uint16)
    labels[index % 10: index % 10 + 2, 3:6] = 1
    detections = [Detection(box=(3.0, float(index % 10), 6.0, float(index % 10 + 2)), score=0.5 + index / 100, instance_id=1)]
    clusters = rng.integers(0, 100, SHAPE).astype(np.uint8)
    return FramePrediction(tlm_labels=labels, detections=detections, ssl_clusters=clusters, ssl_mask=(clusters > 90).astype(np.uint8))


def test_runs_split_sorted_indices_at_gaps() -> None:
    assert index_runs([1, 2, 3, 7, 8, 10]) == [[1, 2, 3], [7, 8], [10]]
    assert index_runs([]) == []


def test_batched_writes_equal_frame_by_frame_writes(tmp_path: Path) -> None:
    batched = ScanStore._create(tmp_path / "batched.zarr", _info(tmp_path / "a.nxs", None), SHAPE, {})
    single = ScanStore._create(tmp_path / "single.zarr", _info(tmp_path / "a.nxs", None), SHAPE, {})
    order = [3, 0, 1, 2, 7, 5, 6, 4]  # results arrive out of order and with gaps; the store grows as they do
    predictions = {i: _prediction(i) for i in order}
    batched.write_predictions({i: predictions[i] for i in order[:5]})  # frames 0-3 and 7: two runs
    batched.write_predictions({i: predictions[i] for i in order[5:]})
    for i in order:
        single.write_predictions({i: predictions[i]})

    volumes = [np.full(SHAPE, i + 1, dtype=np.uint32) for i in range(8)]
    axis = [0.1 * i if i != 2 else None for i in range(8)]
    done = [i != 5 for i in range(8)]  # frame 5: every worker failed on it, its place kept, not done
    batched.write_volumes(0, volumes[:6], axis[:6], done[:6])
    batched.write_volumes(6, volumes[6:], axis[6:], done[6:])
    for i in range(8):
        single.write_volumes(i, [volumes[i]], [axis[i]], [done[i]])

    a, b = zarr.open_group(batched.path, mode="r"), zarr.open_group(single.path, mode="r")
    for name in ("tlm/labels", "ssl/clusters", "ssl/mask", "volume/labels", "tlm/boxes", "frames/done", "frames/axis"):
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert a["frames/done"][:8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]  # arrays are grown ahead; `finish` trims them
    assert not a["frames/done"][8:].any()
    assert np.isnan(a["frames/axis"][2]) and a["frames/axis"][7] == 0.1 * 7
    assert a["tlm/labels"][4].sum() == predictions[4].tlm_labels.sum() > 0
    boxes = a["tlm/boxes"][3]
    assert boxes.shape == (MAX_DETECTIONS_PER_FRAME, 6) and boxes[0, 4] == np.float32(0.53) and np.isnan(boxes[1, 0])
    assert batched.done_prefix() == 5


def test_each_frame_records_the_worker_that_made_it(tmp_path: Path) -> None:
    store = ScanStore._create(tmp_path / "workers.zarr", _info(tmp_path / "a.nxs", None), SHAPE, {})
    store.write_predictions({0: _prediction(0), 1: _prediction(1)}, {0: "local-0", 1: "gpu-node:4242"})
    store.write_predictions({3: _prediction(3), 2: _prediction(2)}, {3: "local-0", 2: None})
    reopened = ScanStore(store.path, zarr.open_group(store.path, mode="r+"), SHAPE)  # as a resumed daemon finds it
    reopened.write_predictions({4: _prediction(4)}, {4: "gpu-node:4242"})
    group = zarr.open_group(store.path, mode="r")
    names = group["frames/worker"].attrs["names"]
    assert names == ["local-0", "gpu-node:4242"]
    made_by = [names[i - 1] if i else None for i in group["frames/worker"][:5].tolist()]
    assert made_by == ["local-0", "gpu-node:4242", None, "local-0", "gpu-node:4242"]


def test_frames_are_one_chunk_each_kept_64_to_a_shard_file(tmp_path: Path) -> None:
    """The store contract: one frame per chunk (what a reader decodes), 64 chunks per shard file (what the disk holds);
    a reader reopening the store sees each frame as written, and a frame written later into a shard keeps the others."""
    store = ScanStore._create(tmp_path / "sharded.zarr", _info(tmp_path / "a.nxs", None), SHAPE, {})
    predictions = {i: _prediction(i) for i in range(70)}
    store.write_predictions({i: predictions[i] for i in range(0, 70, 2)})
    store.write_predictions({i: predictions[i] for i in range(1, 70, 2)})  # into the same shards, between the others
    group = zarr.open_group(store.path, mode="r", use_consolidated=False)
    labels = group["tlm/labels"]
    assert labels.chunks == (1, *SHAPE) and labels.shards == (64, *SHAPE)
    assert group["tlm/boxes"].shards == (64, MAX_DETECTIONS_PER_FRAME, 6)
    files = sorted(p.relative_to(store.path / "tlm/labels").as_posix() for p in (store.path / "tlm/labels/c").rglob("*") if p.is_file())
    assert files == ["c/0/0/0", "c/1/0/0"]  # 70 frames: two shard files, not 70 chunk files
    for index in range(70):
        np.testing.assert_array_equal(labels[index], predictions[index].tlm_labels, err_msg=str(index))
        np.testing.assert_array_equal(group["ssl/clusters"][index], predictions[index].ssl_clusters, err_msg=str(index))


def test_a_shard_write_cut_short_by_kill_9_does_not_block_the_resumed_writer(tmp_path: Path) -> None:
    """tensorstore writes a shard to `<shard>.__lock` and renames it into place; a daemon killed in between leaves that
    file, half written. The resumed writer must neither wait on it nor read it: the shard keeps its frames, gains the new."""
    import time

    store = ScanStore._create(tmp_path / "killed.zarr", _info(tmp_path / "a.nxs", None), SHAPE, {})
    predictions = {i: _prediction(i) for i in range(4)}
    store.write_predictions({0: predictions[0], 1: predictions[1]})
    leftover = store.path / "tlm/labels/c/0/0/0.__lock"
    leftover.write_bytes(b"half a shard")  # what the killed writer left
    resumed = ScanStore(store.path, zarr.open_group(store.path, mode="r+", use_consolidated=False), SHAPE)
    started = time.monotonic()
    resumed.write_predictions({2: predictions[2], 3: predictions[3]})
    assert time.monotonic() - started < 10
    labels = zarr.open_group(store.path, mode="r", use_consolidated=False)["tlm/labels"]
    for index in range(4):
        np.testing.assert_array_equal(labels[index], predictions[index].tlm_labels, err_msg=str(index))
    assert not leftover.exists()


def test_growing_and_trimming_keep_every_arrays_attributes_and_frames(tmp_path: Path) -> None:
    """Shapes change through tensorstore, which rewrites each array's zarr.json: what zarr-python wrote there
    (attributes, dimension names, codecs) must survive, and so must the frames already written."""
    store = ScanStore._create(tmp_path / "grow.zarr", _info(tmp_path / "a.nxs", None), SHAPE, {})
    store.write_predictions({0: _prediction(0), 1: _prediction(1)}, {0: "local-0", 1: "gpu-node:4242"})  # names attribute
    store.write_volumes(0, [np.full(SHAPE, 7, np.uint32)] * 2, [0.5, 0.6], [True, True])
    paths = ("tlm/labels", "ssl/clusters", "ssl/mask", "tlm/boxes", "volume/labels", "frames/done", "frames/axis", "frames/worker")
    written = zarr.open_group(store.path, mode="r")
    before = {path: (dict(written[path].attrs), written[path].metadata.dimension_names, written[path].fill_value) for path in paths}
    store.ensure_frames(1000)  # grown (twice past MIN_GROW_FRAMES at once)
    store.write_predictions({999: _prediction(999)}, {999: "local-0"})
    grown = zarr.open_group(store.path, mode="r", use_consolidated=False)
    for path in paths:
        array = grown[path]
        assert array.shape[0] == 1000, path
        fill = array.fill_value
        assert (dict(array.attrs), array.metadata.dimension_names) == before[path][:2], path
        assert fill == before[path][2] or (np.isnan(fill) and np.isnan(before[path][2])), path
    assert grown["frames/worker"].attrs["names"] == ["local-0", "gpu-node:4242"]
    assert grown["frames/axis"].attrs["name"] == "eta" and grown["tlm/boxes"].attrs["fields"][4] == "score"
    assert grown["tlm/labels"][999].sum() == _prediction(999).tlm_labels.sum()

    store.finish("incomplete", "test", 3)  # trimmed to the frames the scan has
    trimmed = zarr.open_group(store.path, mode="r")
    assert {trimmed[path].shape[0] for path in paths} == {3}
    np.testing.assert_array_equal(trimmed["tlm/labels"][1], _prediction(1).tlm_labels)
    assert trimmed["frames/done"][:].tolist() == [1, 1, 0] and trimmed["volume/labels"][0].max() == 7
    assert trimmed["frames/worker"].attrs["names"] == ["local-0", "gpu-node:4242"]
