"""A finished store's consolidated metadata is what zarr.consolidate_metadata makes of it, whatever the writer knew.

The writer consolidates a store it made from what it knows of its nodes instead of reading every node's
document back (docs/performance.md, "Daemon CPU per scan"). Readers of finished stores trust the
consolidated metadata, so here it is compared, document for document, with what zarr makes from the files.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.common.nexus import ScanInfo
from pipeline.common.volume import VolumeLinker
from pipeline.models.prediction import Detection, FramePrediction
from pipeline.store import open_live, schema
from pipeline.store.writer import ScanStore

SHAPE = (20, 30)


def _info(path: Path, expected: int | None) -> ScanInfo:
    return ScanInfo(nexus_path=path, scan_id="1", layout="nexus", entry="entry", source_file=path, dataset="/entry/data/data",
                    scan_command="scan eta 0 1 0.1", expected_frames=expected, axis_name="eta", start_time="2026-12-04T10:00:00")


def _prediction(frame: int, peak: bool) -> FramePrediction:
    labels, mask = np.zeros(SHAPE, np.uint16), np.zeros(SHAPE, np.uint8)
    detections = []
    if peak:
        labels[5:9, 10:14], mask[5:9, 10:14] = 1, 1
        detections = [Detection(box=(10.0, 5.0, 14.0, 9.0), score=0.9, instance_id=1)]
    return FramePrediction(labels, detections, mask.copy(), mask)


def _write_scan(store: ScanStore, frames: range, peaks: bool, workers: list[str]) -> None:
    linker = VolumeLinker(1)
    for frame in range(frames.stop):
        prediction = _prediction(frame, peaks and frame % 3 != 2)
        raw = np.where(prediction.ssl_mask > 0, 50.0, 1.0)
        labels = linker.link(frame, prediction.ssl_mask > 0, raw, 0.1 * frame)
        if frame < frames.start:  # done by an earlier writer: linked again only (as a resume replays them)
            continue
        store.write_predictions({frame: prediction}, {frame: workers[frame % len(workers)]})
        store.write_volumes(frame, [labels], [0.1 * frame], [True])
        if frame % 4 == 3:
            store.write_tables(linker.table(), range(frame + 1))
    store.write_tables(linker.table(), range(frames.stop))


def _consolidated(path: Path) -> dict[str, object]:
    document: dict[str, object] = json.loads((path / schema.ROOT_METADATA).read_text())
    return document


@pytest.mark.parametrize(("frames", "expected", "peaks", "workers"), [
    (3, 3, False, ["local-0"]),  # the small finished scan: no peaks, as many frames as the file said
    (70, None, True, ["local-0", "local-1"]),  # peaks and detections, grown past a shard, trimmed at the end
    (5, 8, True, []),  # fewer frames than expected (a stopped scan): trimmed; no worker named
])
def test_the_writers_consolidated_metadata_is_zarrs(tmp_path: Path, caplog: pytest.LogCaptureFixture, frames: int,
                                                    expected: int | None, peaks: bool, workers: list[str]) -> None:
    path = tmp_path / "scan.zarr"
    for attempt in range(5):  # the nodes come back from their creation in any order: several stores, several orders
        store = ScanStore.create_or_resume(path, _info(tmp_path / "scan.nxs", expected), SHAPE, {"config": {"a": 1}})
        try:
            with caplog.at_level(logging.DEBUG, logger="pipeline.store.writer"):
                _write_scan(store, range(frames), peaks, workers or [""])
                store.finish("complete", "finished", frames, {"failed_frames": []})
        finally:
            store.close()
        assert not [r for r in caplog.records if "read back" in r.getMessage()]  # made from what the writer knew
        if attempt < 4:
            shutil.rmtree(path)
    ours = _consolidated(path)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(copy)
    assert ours == _consolidated(copy)  # the root's attributes and every node's document, as zarr reads them
    group = zarr.open_group(path, mode="r")  # a reader of a finished store: the consolidated metadata
    assert group["volume/labels"].shape == (frames, *SHAPE)
    assert group.attrs["status"] == "complete" and group.attrs["frames_done"] == frames
    assert group["frames/worker"].attrs["names"] == workers
    live = open_live(path)  # and the same from the files themselves
    assert live["peaks/id"].shape == group["peaks/id"].shape and live["tlm/detections/frame"].shape == group["tlm/detections/frame"].shape
    assert (live["tlm/detections/frame"].shape[0] > 0) == peaks


def test_a_resumed_store_is_consolidated_from_its_files(tmp_path: Path) -> None:
    """A store resumed by another writer (nodes not made by it): read back as zarr does, the same result."""
    path = tmp_path / "scan.zarr"
    info = _info(tmp_path / "scan.nxs", 6)
    first = ScanStore.create_or_resume(path, info, SHAPE, {})
    _write_scan(first, range(3), True, ["local-0"])
    first.close()
    second = ScanStore.create_or_resume(path, info, SHAPE, {})
    try:
        assert second.done_prefix() == 3
        _write_scan(second, range(3, 6), True, ["local-1"])
        second.finish("complete", "finished", 6)
    finally:
        second.close()
    ours = _consolidated(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(path)
    assert ours == _consolidated(path)
    assert zarr.open_group(path, mode="r")["frames/worker"].attrs["names"] == ["local-0", "local-1"]


def test_stores_made_one_after_another_keep_their_own_attributes(tmp_path: Path) -> None:
    """The daemon writes several stores at once, each made from the same template: one store's attributes (its source,
    its layout, its tables' generations) must never be written into another's, whatever the order of their writes."""
    stores = {}
    for name in ("first", "second", "third"):
        (tmp_path / name).mkdir()
        info = _info(tmp_path / name / f"{name}.nxs", 4)
        stores[name] = ScanStore.create_or_resume(tmp_path / name / f"{name}.zarr", info, SHAPE,
                                                  {"layout_note": name, "models": {"of": name}})
    try:
        for index, name in enumerate(stores):  # tables of different lengths, interleaved with the others' writes
            _write_scan(stores[name], range(2 + index), True, [f"worker-{name}"])
        for name in reversed(stores):
            frames = 2 + list(stores).index(name)
            stores[name].finish("complete", "finished", frames)
    finally:
        for store in stores.values():
            store.close()
    for index, name in enumerate(stores):
        path = tmp_path / name / f"{name}.zarr"
        for group in (zarr.open_group(path, mode="r"), open_live(path)):  # consolidated, and from the files
            assert group.attrs["source_nexus"] == str(tmp_path / name / f"{name}.nxs")
            assert group.attrs["layout_note"] == name and group.attrs["models"] == {"of": name}
            assert group.attrs["frames_total"] == 2 + index
            assert group["frames/worker"].attrs["names"] == [f"worker-{name}"]
            assert group["tlm/detections"].attrs["rows"] == group["tlm/detections/frame"].shape[0] > 0
            assert group["peaks"].attrs["rows"] == group["peaks/id"].shape[0]
