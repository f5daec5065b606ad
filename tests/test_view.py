"""`pipeline show`, `pipeline view` and `pipeline quicklook` on real stores (see test_quicklook.py).

The commands are called through a parser that `pipeline.pictures.view.add_parsers` builds, the way the
`pipeline` command line registers them; once `pipeline.cli` registers them too, the last test
also runs them through `pipeline.cli.main`. The real napari window, and the fallback where Qt cannot start,
are in test_napari_window.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.pictures import view
from pipeline.pictures.quicklook import DPI, OVERLAY_FIGSIZE, QUICKLOOK_FIGSIZE, VOLUME_FIGSIZE
from pipeline.testing.pictures import N_FRAMES, SCAN, assert_picture, copy_store, png_size, read_truth

pytestmark = pytest.mark.daemon


def run(argv: list[str]) -> int:
    """One `pipeline` command through the parsers this module adds."""
    parser = argparse.ArgumentParser(prog="pipeline")
    view.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_show_a_given_frame(truth_store, tmp_path, capsys):
    out = tmp_path / "frame.png"
    assert run(["show", str(truth_store), "--frame", "3", "--linear", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_picture(out, png_size(OVERLAY_FIGSIZE))


def test_show_chooses_the_frame_with_most_peak_pixels(truth_store, processed_scan, tmp_path, capsys):
    store = copy_store(truth_store, tmp_path)
    assert run(["show", str(store)]) == 0
    pixels = np.count_nonzero(read_truth(processed_scan.truth), axis=(1, 2))
    busiest = int(np.argmax(pixels))  # the first of equals
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == f"frame {busiest}: the most peak pixels ({pixels[busiest]})"
    assert second == str(tmp_path / f"{SCAN}.frame{busiest}.png")
    assert_picture(Path(second), png_size(OVERLAY_FIGSIZE))


def test_show_a_bad_frame_is_one_line_and_exit_2(truth_store, capsys):
    assert run(["show", str(truth_store), "--frame", str(N_FRAMES)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"pipeline show: {SCAN}.zarr: frame {N_FRAMES} is out of range (the store has frames 0..{N_FRAMES - 1})\n"


@pytest.mark.parametrize("command", ["show", "view", "quicklook"])
def test_not_a_store_is_one_line_and_exit_2(command, tmp_path, capsys):
    assert run([command, str(tmp_path / "nothing.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"pipeline {command}: ") and "not a Zarr store" in err


def test_view_without_napari_draws_the_3d_picture(truth_store, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "napari", None)  # `import napari` fails, as where it is not installed
    store = copy_store(truth_store, tmp_path)
    assert run(["view", str(store)]) == 0
    picture = tmp_path / f"{SCAN}.volume3d.png"
    assert capsys.readouterr().out.strip() == (
        f"napari was not found (pip install 'napari[pyqt6]' for the interactive viewer); static 3D picture of the peak volume: {picture}")
    assert_picture(picture, png_size(VOLUME_FIGSIZE))


def test_quicklook_command_prints_the_path(truth_store, tmp_path, capsys):
    store = copy_store(truth_store, tmp_path)
    assert run(["quicklook", str(store)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / f"{SCAN}.quicklook.png"
    assert_picture(path, png_size(QUICKLOOK_FIGSIZE))


def test_every_command_has_help(capsys):
    for command in ("show", "view", "quicklook"):
        with pytest.raises(SystemExit) as exit_info:
            run([command, "--help"])
        assert exit_info.value.code == 0
        assert "SCAN.zarr" in capsys.readouterr().out


def test_commands_through_the_pipeline_command_line(truth_store, tmp_path, capsys):
    from pipeline import cli

    assert cli.main(["show", str(truth_store), "--frame", "99"]) == 2
    assert capsys.readouterr().err.startswith("pipeline show: ")
    out = tmp_path / "cli.png"
    assert cli.main(["show", str(truth_store), "--frame", "1", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (round(OVERLAY_FIGSIZE[0] * DPI), round(OVERLAY_FIGSIZE[1] * DPI))
