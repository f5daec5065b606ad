"""Quick looks are drawn on their own thread, in order; a store that cannot be drawn costs a log line, nothing more."""

from __future__ import annotations

import logging
import time

import pytest

from pipeline.live.painter import QuickLookPainter
from pipeline.pictures.quicklook import QUICKLOOK_FIGSIZE
from pipeline.testing.pictures import SCAN, assert_picture, copy_store, png_size

pytestmark = pytest.mark.daemon


def test_the_painter_draws_on_its_own_thread_and_survives_a_bad_store(truth_store, tmp_path, caplog):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    stores = [copy_store(truth_store, first), copy_store(truth_store, second)]
    painter = QuickLookPainter().start()
    with caplog.at_level(logging.INFO, logger="pipeline.live.painter"):
        painter.paint(tmp_path / "missing.zarr")
        for store in stores:
            painter.paint(store)
        deadline = time.monotonic() + 60
        while not painter.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert painter.idle() and painter.painted == 2
        painter.stop()
    for store in stores:
        assert_picture(store.parent / f"{SCAN}.quicklook.png", png_size(QUICKLOOK_FIGSIZE))
    records = [r for r in caplog.records if r.name == "pipeline.live.painter"]
    assert [r.levelname for r in records] == ["WARNING", "INFO", "INFO"]
    assert "missing: no quick look" in records[0].getMessage()
    assert {r.threadName for r in records} == {"quicklook"}


def test_stopping_draws_what_is_queued(truth_store, tmp_path):
    stores = []
    for name in ("x", "y", "z"):
        (tmp_path / name).mkdir()
        stores.append(copy_store(truth_store, tmp_path / name))
    painter = QuickLookPainter().start()
    for store in stores:
        painter.paint(store)
    painter.stop(finish=True)  # a drained daemon leaves every picture
    assert painter.painted == 3
    for store in stores:
        assert (store.parent / f"{SCAN}.quicklook.png").is_file()
