"""Frames with nothing found are not written chunk by chunk: their masks are the arrays' fill value already.

Most frames of a scan hold no peak; writing their zeros cost the sink's encoder most of its time. A reader
cannot tell the difference (a chunk never written reads as the fill value), but a frame that may hold
data from an earlier run (a resumed store) must still be overwritten with its zeros: a stale mask read
back as this run's would be a wrong answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from pipeline.common.nexus import ScanInfo
from pipeline.common.zeros import MAX_KEPT, is_shared_zeros, shared_zeros
from pipeline.models.prediction import Detection, FramePrediction
from pipeline.store.empty_frames import WrittenFrames, has_data
from pipeline.store.schema import FRAME_SHARD
from pipeline.store.writer import ScanStore

SHAPE = (12, 17)
MASKS = ("tlm/labels", "ssl/clusters", "ssl/mask", "volume/labels")


def _info(path: Path) -> ScanInfo:
    return ScanInfo(nexus_path=path, scan_id="1", layout="gda9", entry="entry1", source_file=path, dataset="/entry1/data",
                    scan_command="scan", expected_frames=None, axis_name="eta")


def _empty() -> FramePrediction:
    return FramePrediction(tlm_labels=np.zeros(SHAPE, np.uint16), detections=[], ssl_clusters=np.zeros(SHAPE, np.uint8),
                           ssl_mask=np.zeros(SHAPE, np.uint8))


def _peak(index: int) -> FramePrediction:
    labels = np.zeros(SHAPE, np.uint16)
    labels[2:5, 3 + index % 5:6 + index % 5] = 1
    clusters = (labels * 7).astype(np.uint8)
    return FramePrediction(tlm_labels=labels, detections=[Detection(box=(3.0, 2.0, 6.0, 5.0), score=0.9, instance_id=1)],
                           ssl_clusters=clusters, ssl_mask=(labels > 0).astype(np.uint8))


def _write(store: ScanStore, predictions: dict[int, FramePrediction]) -> None:
    store.write_predictions(predictions)
    first = min(predictions)
    labels = [predictions[i].tlm_labels.astype(np.uint32) for i in range(first, first + len(predictions))]
    store.write_volumes(first, labels, [0.1 * i for i in range(first, first + len(predictions))], [True] * len(predictions))


def _chunk_bytes(store: Path, name: str) -> int:
    return sum(path.stat().st_size for path in (store / name / "c").rglob("*") if path.is_file()) if (store / name / "c").exists() else 0


def test_empty_frames_of_a_new_store_leave_no_chunks_and_read_as_zeros(tmp_path: Path) -> None:
    store = ScanStore._create(tmp_path / "s.zarr", _info(tmp_path / "s.nxs"), SHAPE, {})
    predictions = {i: (_peak(i) if i in (5, 6, 40) else _empty()) for i in range(48)}
    _write(store, predictions)
    group = zarr.open_group(store.path, mode="r", use_consolidated=False)
    for name, pick in (("tlm/labels", "tlm_labels"), ("ssl/clusters", "ssl_clusters"), ("ssl/mask", "ssl_mask")):
        np.testing.assert_array_equal(group[name][:48], np.stack([getattr(predictions[i], pick) for i in range(48)]), err_msg=name)
    np.testing.assert_array_equal(group["volume/labels"][:48], np.stack([predictions[i].tlm_labels for i in range(48)]))
    boxes = group["tlm/boxes"][:48]
    assert np.isnan(boxes[[i for i in range(48) if i not in (5, 6, 40)]]).all() and boxes[40, 0, 4] == np.float32(0.9)
    assert group["frames/done"][:48].all()

    only_empty = ScanStore._create(tmp_path / "e.zarr", _info(tmp_path / "e.nxs"), SHAPE, {})
    _write(only_empty, {i: _empty() for i in range(48)})
    for name in (*MASKS, "tlm/boxes"):
        assert _chunk_bytes(only_empty.path, name) == 0, name  # nothing encoded, nothing written
        assert _chunk_bytes(store.path, name) > 0, name
    assert not zarr.open_group(only_empty.path, mode="r", use_consolidated=False)["tlm/labels"][:48].any()


def test_a_resumed_store_overwrites_what_an_earlier_run_left_with_zeros(tmp_path: Path) -> None:
    """Frames 0-19 were written with peaks by a run that ended at 10 frames (trimmed: the shard it cut keeps frames
    10-19's chunks); this run finds the file longer and every frame empty: what a reader sees must be this run's."""
    first = ScanStore._create(tmp_path / "r.zarr", _info(tmp_path / "r.nxs"), SHAPE, {})
    first.write_predictions({i: _peak(i) for i in range(20)})
    first.write_volumes(0, [_peak(i).tlm_labels.astype(np.uint32) for i in range(20)], [None] * 20, [False] * 20)
    first.finish("incomplete", "stopped", 10)
    resumed = ScanStore(first.path, zarr.open_group(first.path, mode="r+", use_consolidated=False), SHAPE)
    assert resumed.frames_allocated == 10 < 20 < FRAME_SHARD
    _write(resumed, {i: _empty() for i in range(24)})
    group = zarr.open_group(first.path, mode="r", use_consolidated=False)
    for name in MASKS:
        assert not group[name][:24].any(), name
    assert np.isnan(group["tlm/boxes"][:24]).all()


def test_a_frame_written_again_empty_by_the_same_writer_reads_as_zeros(tmp_path: Path) -> None:
    """A scan resumed after a stall sends frames again: one that had a peak and now has none must not keep it."""
    store = ScanStore._create(tmp_path / "a.zarr", _info(tmp_path / "a.nxs"), SHAPE, {})
    store.write_predictions({3: _peak(3), 4: _peak(4)})
    store.write_predictions({3: _empty(), 4: _peak(9)})
    group = zarr.open_group(store.path, mode="r", use_consolidated=False)
    assert not group["tlm/labels"][3].any() and not group["ssl/mask"][3].any()
    np.testing.assert_array_equal(group["tlm/labels"][4], _peak(9).tlm_labels)


def test_only_runs_of_frames_with_data_or_maybe_data_are_written() -> None:
    empty, full = np.zeros(SHAPE, np.uint16), np.ones(SHAPE, np.uint16)
    written = WrittenFrames(["m"])
    writes = written.writes("m", 10, [empty, full, full, empty, full, empty])
    assert [(block.start, block.stop, values.shape[0]) for _, block, values in writes] == [(11, 13, 2), (14, 15, 1)]
    assert [written.may_hold("m", i) for i in range(10, 16)] == [False, True, True, False, True, False]
    # frames 11 and 14 hold data now: written again empty, they are written (tensorstore then drops their chunks)
    again = written.writes("m", 10, [empty] * 6)
    assert [(block.start, block.stop) for _, block, _ in again] == [(11, 13), (14, 15)]
    unknown = WrittenFrames(["m"], unknown_below=4)  # a resumed store's first frames: not known, so always written
    assert [(block.start, block.stop) for _, block, _ in unknown.writes("m", 2, [empty] * 4)] == [(2, 4)]
    assert has_data(full) and not has_data(empty) and has_data(np.array([0.0, -1.0])) and not has_data(np.zeros(0, np.uint8))


def test_the_shared_zeros_are_told_by_identity_never_by_shape_or_flags() -> None:
    """has_data skips the pixels of the one shared zero array only: a look-alike holding data must never pass as it."""
    zeros = shared_zeros(SHAPE, "uint16")
    assert shared_zeros(SHAPE, "uint16") is zeros and is_shared_zeros(zeros) and not has_data(zeros)
    lookalike = np.zeros(SHAPE, np.uint16)
    lookalike[3, 4] = 7
    lookalike.flags.writeable = False  # read-only, same shape and type
    assert not is_shared_zeros(lookalike) and has_data(lookalike)
    from_bytes = np.frombuffer(lookalike.tobytes(), np.uint16).reshape(SHAPE)  # read-only over bytes, as the wire decodes
    assert not is_shared_zeros(from_bytes) and has_data(from_bytes)
    for width in range(1, MAX_KEPT + 2):  # more shapes than are kept: SHAPE's array is let go
        shared_zeros((1, width), "uint8")
    assert not is_shared_zeros(zeros) and not has_data(zeros)  # no longer known: its pixels are looked at
    assert shared_zeros(SHAPE, "uint16") is not zeros


def test_a_store_whose_arrays_a_full_disk_left_at_different_lengths_resumes_and_writes(tmp_path: Path) -> None:
    """A full disk can stop a resize half way: some per-frame arrays grown, others not (each has its own metadata
    document). The soak met it: the resumed store failed its next write ('index 0 is out of bounds for axis 0 with
    size 0': the axis column, read back at length 0, was indexed at frame 0). A resumed store grows every array to
    the longest, and goes on."""
    first = ScanStore._create(tmp_path / "p.zarr", _info(tmp_path / "p.nxs"), SHAPE, {})
    first.frame_arrays.resize({"frames/done": 8, "ssl/mask": 8})  # the resize the full disk cut short
    resumed = ScanStore(first.path, zarr.open_group(first.path, mode="r+", use_consolidated=False), SHAPE)
    _write(resumed, {i: (_peak(i) if i == 2 else _empty()) for i in range(4)})
    group = zarr.open_group(first.path, mode="r", use_consolidated=False)
    for name in (*MASKS, "tlm/boxes", "frames/done", "frames/axis", "frames/worker"):
        assert group[name].shape[0] == resumed.frames_allocated >= 8, name
    assert group["frames/done"][:4].all() and not group["frames/done"][4:].any()
    np.testing.assert_allclose(group["frames/axis"][:4], [0.0, 0.1, 0.2, 0.30000000000000004])
    np.testing.assert_array_equal(group["ssl/mask"][2], _peak(2).ssl_mask)
