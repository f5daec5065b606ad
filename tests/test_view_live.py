"""`pipeline view` on a running scan: what napari is given grows as frames become done, and the title says how far.

napari itself is not installed here (nor in CI): the piece its Qt timer calls, `LiveView.refresh`,
runs against a store that the project's writer grows between looks, and every layer's data is
compared with the store and the raw file.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.pictures.view import DoneFrames, LiveView, live_title
from pipeline.store import StoreReader, schema
from pipeline.testing.truth_stores import TruthStoreWriter

N_FRAMES = 10


@pytest.fixture()
def writer(tmp_path):  # type: ignore[no-untyped-def]
    return TruthStoreWriter(tmp_path, "grow", N_FRAMES, seed=5, n_peaks=3)


def assert_layers_match_the_store(view: LiveView, writer: TruthStoreWriter, frames: int) -> None:
    reader = StoreReader(writer.store_path)
    assert view.raw.shape == (frames, 195, 487) and view.raw.dtype == np.float32
    expected_raw = np.log1p(np.clip(np.stack([writer.raw(i) for i in range(frames)]), 0, None)).astype(np.float32)
    np.testing.assert_array_equal(view.raw, expected_raw)
    assert sorted(view.labels) == sorted([schema.TLM_LABELS, schema.SSL_MASK, schema.VOLUME_LABELS])
    for name, layer in view.labels.items():
        assert layer.shape == (frames, 195, 487), name
        stored = reader.array(name)
        np.testing.assert_array_equal(np.asarray(layer), stored[:frames], err_msg=name)
    np.testing.assert_array_equal(np.asarray(view.labels[schema.TLM_LABELS]), np.stack([writer.truth(i) for i in range(frames)]))


def test_the_layers_grow_with_the_done_frames_and_the_title_says_how_far(writer):
    view = LiveView(writer.store_path)
    assert view.refresh() is True  # a store with no done frame yet: empty layers
    assert view.raw.shape[0] == 0 and view.title == f"grow: 0 of {N_FRAMES} frames done (running)" and not view.finished
    writer.write(3)
    writer.store.ensure_frames(8)  # the writer has room for more than is done: the slider must not show it
    assert view.refresh() is True
    assert view.title == f"grow: 3 of {N_FRAMES} frames done (running)"
    assert_layers_match_the_store(view, writer, 3)
    first_frames = view.raw.copy()
    assert view.refresh() is False  # nothing new: napari's layers are left alone
    writer.write(4)
    assert view.refresh() is True
    assert view.title == f"grow: 7 of {N_FRAMES} frames done (running)"
    assert_layers_match_the_store(view, writer, 7)
    np.testing.assert_array_equal(view.raw[:3], first_frames)
    writer.write(3)
    writer.finish()
    assert view.refresh() is True
    assert view.title == f"grow: {N_FRAMES} of {N_FRAMES} frames done (complete)" and view.finished
    assert_layers_match_the_store(view, writer, N_FRAMES)


def test_frames_not_done_read_as_zero(writer):
    writer.write(4)
    reader = StoreReader(writer.store_path)
    done = np.array([True, False, True, True])  # frame 1 as if its worker failed: not done, not to be trusted
    layer = DoneFrames(reader.array(schema.VOLUME_LABELS), done)
    stored = reader.array(schema.VOLUME_LABELS)[:4]
    assert layer.shape == (4, 195, 487) and len(layer) == 4 and layer.dtype == np.uint32
    assert stored[1].any()  # the frame has labels in the store ...
    assert not layer[1].any() and not layer[-3].any()  # ... which the layer does not show
    np.testing.assert_array_equal(layer[2], stored[2])
    np.testing.assert_array_equal(layer[0:4:2], stored[0:4:2])
    np.testing.assert_array_equal(layer[::-1, 10:20], np.where(done[::-1, None, None], stored[::-1], 0)[:, 10:20])
    assert not layer[1:2].any() and layer[5:].shape == (0, 195, 487)
    np.testing.assert_array_equal(np.asarray(layer), np.where(done[:, None, None], stored, 0))
    with pytest.raises(IndexError):
        layer[4]


def test_the_title_without_an_expected_count():
    assert live_title("scan1", 17, 40, "running") == "scan1: 17 of 40 frames done (running)"
    assert live_title("scan1", 17, None, "incomplete") == "scan1: 17 frames done (incomplete)"


def test_a_store_that_is_replaced_is_shown_afresh(tmp_path, writer):
    writer.write(5)
    view = LiveView(writer.store_path)
    view.refresh()
    assert view.raw.shape[0] == 5
    group = zarr.open_group(writer.store_path, mode="r+", use_consolidated=False)
    group[schema.FRAMES_DONE][2:] = 0  # fewer frames done now: a fresh store of a replaced file at the same path
    group.attrs[schema.Attr.START_TIME] = "2030-01-01T00:00:00+00:00"
    view.raw[:] = -1  # what was loaded from the old store must not stay
    assert view.refresh() is True and view.raw.shape[0] == 2 and view.title.startswith("grow: 2 of")
    assert_layers_match_the_store(view, writer, 2)
