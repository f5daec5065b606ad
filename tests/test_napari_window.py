"""`pipeline view` with the real napari: a real window on a real X server (Xvfb), and the fallback to the static
picture where Qt cannot start (issue 26, point 5).

Qt aborts its whole process (exit code 134) when it cannot start, and a window can hang, so everything that starts
Qt runs in a child process with a timeout: `pipeline view` itself, or this file run as a script (`window`, below),
which opens the viewer, takes screenshots and writes what it saw as JSON. napari and Xvfb are part of the CI
install (the `test` extra, .ci/run's apt-get line); where either is missing these tests fail under CI=true and are
skipped, saying why, elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.pictures.quicklook import VOLUME_FIGSIZE, busiest_frame
from pipeline.pictures.view import CONTRAST_PERCENTILES, RAW_LAYER, qt_failure_reason
from pipeline.store import schema
from pipeline.testing.pictures import N_FRAMES, SCAN, assert_picture, copy_store, png_size, read_raw, read_truth
from pipeline.testing.truth_stores import TruthStoreWriter

pytestmark = pytest.mark.daemon

CHILD_TIMEOUT_S = 120  # a window that hangs fails its test, it never holds CI
FRAME_SHAPE = (195, 487)


def need(ok: bool, why: str) -> None:
    """Skip where napari or Xvfb is not installed, but never under CI, which installs both."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI installs it (.ci/run), so this test must run there")
        pytest.skip(why)


def need_napari() -> None:
    need(importlib.util.find_spec("napari") is not None, "napari is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A private X server for this module's windows: its display name, e.g. `:7`."""
    need_napari()
    xvfb = shutil.which("Xvfb")
    need(xvfb is not None, "Xvfb is not installed (apt-get install xvfb)")
    assert xvfb is not None
    read_end, write_end = os.pipe()
    server = subprocess.Popen([xvfb, "-displayfd", str(write_end), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                              pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as pipe:
            number = pipe.readline().strip()  # Xvfb writes its display number once it accepts clients
        assert number.isdigit(), f"Xvfb did not start: {server.stderr.read().decode() if server.stderr else ''}"
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def child_env(settings: Path, **changes: str | None) -> dict[str, str]:
    """This process's environment with `changes` (None removes a variable); never Wayland, never offscreen, and
    napari's settings (it saves the window's geometry) in `settings`, not in the home directory."""
    env = {name: value for name, value in os.environ.items() if name not in ("WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env["NAPARI_CONFIG"] = str(settings / "napari-settings.yaml")
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def pipeline_view(store: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "view", str(store)], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, env=env)


# -- a real window ---------------------------------------------------------------------------


def test_a_real_napari_window_shows_the_scan(truth_store, processed_scan, display, tmp_path):
    frame, _ = busiest_frame(truth_store)
    child = subprocess.run([sys.executable, __file__, "window", str(truth_store), str(frame), str(tmp_path)], capture_output=True,
                           text=True, timeout=CHILD_TIMEOUT_S, env=child_env(tmp_path, DISPLAY=display, QT_QPA_PLATFORM="xcb"))
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    seen = json.loads((tmp_path / "seen.json").read_text())

    assert seen["platform"] == "xcb" and seen["window_visible"]
    assert seen["title"] == f"{SCAN}: {N_FRAMES} of {N_FRAMES} frames done (complete)"
    assert seen["layers"] == [RAW_LAYER, schema.TLM_LABELS, schema.SSL_MASK, schema.VOLUME_LABELS]
    # the slider is `frame` (not napari's default `-3`), in the model and on the widget itself
    assert seen["axis_labels"] == ["frame", "y", "x"]
    assert seen["slider_labels"][0] == "frame" and seen["slider_visible"] == [True, False, False]
    # every layer on one grid: same shape, same place in the world
    assert seen["shapes"] == [[N_FRAMES, *FRAME_SHAPE]] * 4
    assert all(extent == seen["extents"][0] for extent in seen["extents"])
    assert seen["extents"][0] == [[0, 0, 0], [N_FRAMES - 1, FRAME_SHAPE[0] - 1, FRAME_SHAPE[1] - 1]]
    # contrast limits: percentiles of the counts with dead (-2) and saturated pixels left out, on the log1p scale
    raw = read_raw(truth_store)
    assert (raw == -2).any(), "the simulated scan should have dead pixels"
    counts = raw[(raw >= 0) & (raw < 1_000_000)]
    expected = np.log1p(np.percentile(counts, CONTRAST_PERCENTILES, method="inverted_cdf"))
    assert seen["contrast_limits"] == pytest.approx(expected.tolist(), abs=1e-9)
    assert seen["contrast_limits"][1] < np.log1p(raw.max()) - 1  # not from the maximum (what left frames nearly black)

    # the screenshots: where the simulator put peaks, the raw layer is bright; the labels fall on those peaks
    peaks = read_truth(processed_scan.truth)[frame] > 0
    rows, columns = screen_grid(seen)
    inside = peaks[rows.clip(0, FRAME_SHAPE[0] - 1), columns.clip(0, FRAME_SHAPE[1] - 1)]
    on_frame = (rows >= 0) & (rows < FRAME_SHAPE[0]) & (columns >= 0) & (columns < FRAME_SHAPE[1])
    core = on_frame & ndimage.binary_erosion(inside & on_frame, iterations=2)
    background = on_frame & ~ndimage.binary_dilation(inside & on_frame, iterations=6)
    raw_shot = grey(tmp_path / "raw.png")
    assert core.sum() > 200 and background.sum() > 100_000
    assert 40 < np.median(raw_shot[background]) < 200, "the background should be grey, neither black nor white"
    assert raw_shot[core].mean() > np.median(raw_shot[background]) + 50, "peaks should be brighter than the background"
    assert raw_shot[~on_frame].max() < 10, "outside the frame the canvas is black: the frame is where it was computed to be"
    labels_shot = grey(tmp_path / "labels.png")
    coloured = labels_shot > 20
    assert coloured[core].mean() > 0.95 and coloured[background].mean() < 0.01
    assert_picture(tmp_path / "all.png", tuple(seen["screenshot_size"]))


def test_a_real_window_follows_a_running_scan(display, tmp_path):
    """The viewer's Qt timer (pipeline.pictures.view._follow) grows the layers and moves the contrast limits as
    frames become done, and says so in the title, until the scan is over."""
    writer = TruthStoreWriter(tmp_path, "grow", 10, seed=5, n_peaks=3)
    writer.write(3)
    out = tmp_path / "seen"
    out.mkdir()
    child = subprocess.Popen([sys.executable, __file__, "follow", str(writer.store_path), str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=child_env(tmp_path, DISPLAY=display, QT_QPA_PLATFORM="xcb"))
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not (out / "opened").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not (out / "opened").exists():
            child.kill()
            pytest.fail(f"the viewer did not open: {child.communicate()[0][-4000:]}")
        writer.write(7)
        writer.finish()
        output, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, output[-4000:]
    seen = json.loads((out / "seen.json").read_text())
    assert seen["titles"][0] == "grow: 3 of 10 frames done (running)"
    assert seen["titles"][-1] == "grow: 10 of 10 frames done (complete)"
    assert seen["shapes"] == [[10, *FRAME_SHAPE]] * 4
    assert seen["timer_active"] is False  # the timer stopped with the scan
    for key, frames in (("first_contrast_limits", 3), ("contrast_limits", 10)):
        raw = np.stack([writer.raw(index) for index in range(frames)])
        counts = raw[(raw >= 0) & (raw < 1_000_000)]
        expected = np.log1p(np.percentile(counts, CONTRAST_PERCENTILES, method="inverted_cdf"))
        assert seen[key] == pytest.approx(expected.tolist(), abs=1e-9), key


def screen_grid(seen: dict) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel of the canvas screenshots, the frame pixel (row, column) under it, from napari's camera:
    pixel i covers i - 0.5 .. i + 0.5 in the world, the camera's centre is at the canvas's middle."""
    width, height = seen["screenshot_size"]
    centre_y, centre_x = seen["camera_center"][-2:]
    zoom = seen["camera_zoom"]
    y = (np.arange(height) + 0.5 - height / 2) / zoom + centre_y
    x = (np.arange(width) + 0.5 - width / 2) / zoom + centre_x
    rows, columns = np.meshgrid(np.floor(y + 0.5).astype(int), np.floor(x + 0.5).astype(int), indexing="ij")
    return rows, columns


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


# -- where Qt cannot start: the static picture, never an abort ----------------------------------


def test_a_missing_qt_library_falls_back_to_the_static_picture(truth_store, display, tmp_path):
    """A stand-in libxcb-cursor.so.0 that does not load, ahead of the real one, makes Qt's xcb plugin fail as
    where Debian's libxcb-cursor0 is missing: Qt would abort `pipeline view` (exit code 134)."""
    store = copy_store(truth_store, tmp_path)
    broken = tmp_path / "lib"
    broken.mkdir()
    (broken / "libxcb-cursor.so.0").write_bytes(b"")
    result = pipeline_view(store, child_env(tmp_path, DISPLAY=display, LD_LIBRARY_PATH=str(broken)))
    assert result.returncode == 0, result.stderr[-3000:]
    picture = tmp_path / f"{SCAN}.volume3d.png"
    assert result.stdout == (f"napari cannot open a window: Qt's platform plugin cannot load a library: {broken}/libxcb-cursor.so.0: "
                             f"file too short; static 3D picture of the peak volume: {picture}\n")
    assert_picture(picture, png_size(VOLUME_FIGSIZE))


def test_no_display_falls_back_to_the_static_picture(truth_store, tmp_path):
    need_napari()
    store = copy_store(truth_store, tmp_path)
    result = pipeline_view(store, child_env(tmp_path, DISPLAY=None))
    assert result.returncode == 0, result.stderr[-3000:]
    picture = tmp_path / f"{SCAN}.volume3d.png"
    assert result.stdout == f"napari cannot open a window: Qt could not connect to a display (DISPLAY=''); static 3D picture of the peak volume: {picture}\n"
    assert_picture(picture, png_size(VOLUME_FIGSIZE))


def test_a_platform_without_windows_falls_back_to_the_static_picture(truth_store, tmp_path):
    """Qt starts with QT_QPA_PLATFORM=offscreen, but napari's window would be seen by nobody and block forever."""
    need_napari()
    store = copy_store(truth_store, tmp_path)
    result = pipeline_view(store, child_env(tmp_path, QT_QPA_PLATFORM="offscreen"))
    assert result.returncode == 0, result.stderr[-3000:]
    picture = tmp_path / f"{SCAN}.volume3d.png"
    assert result.stdout == (f"napari cannot open a window: Qt's platform is 'offscreen' (QT_QPA_PLATFORM), which shows no window; "
                             f"static 3D picture of the peak volume: {picture}\n")
    assert_picture(picture, png_size(VOLUME_FIGSIZE))


QT_MISSING_LIBRARY = """\
qt.core.plugin.factoryloader: Got keys from plugin meta data QList("xcb")
qt.core.library: "/venv/lib/python3.11/site-packages/PyQt6/Qt6/plugins/platforms/libqxcb.so" cannot load: Cannot load library \
/venv/lib/python3.11/site-packages/PyQt6/Qt6/plugins/platforms/libqxcb.so: libxcb-icccm.so.4: cannot open shared object file: No such file or directory
qt.qpa.plugin: From 6.5.0, xcb-cursor0 or libxcb-cursor0 is needed to load the Qt xcb platform plugin.
qt.qpa.plugin: Could not load the Qt platform plugin "xcb" in "" even though it was found.
This application failed to start because no Qt platform plugin could be initialized. Reinstalling the application may fix this problem.
"""  # what PyQt6 6.11 said here (QT_DEBUG_PLUGINS=1, trimmed) with Debian's libxcb-icccm4 not installed


@pytest.mark.parametrize(("said", "reason"), [
    (QT_MISSING_LIBRARY, "Qt's platform plugin cannot load libxcb-icccm.so.4 (on Debian/Ubuntu: apt-get install libxcb-icccm4)"),
    (QT_MISSING_LIBRARY.replace("libxcb-icccm.so.4", "libxcb-cursor.so.0"),
     "Qt's platform plugin cannot load libxcb-cursor.so.0 (on Debian/Ubuntu: apt-get install libxcb-cursor0)"),
    (QT_MISSING_LIBRARY.replace("libxcb-icccm.so.4", "libxkbcommon-x11.so.0"),
     "Qt's platform plugin cannot load libxkbcommon-x11.so.0 (on Debian/Ubuntu: apt-get install libxkbcommon-x11-0)"),
    ("qt.qpa.xcb: could not connect to display :99\n", "Qt could not connect to a display (DISPLAY=':99')"),
    ("qt.core.library: loaded\nSomething else went wrong.\n", "Qt could not start (exit code 134: Something else went wrong.)"),
])
def test_what_qt_said_becomes_one_line(said, reason, monkeypatch):
    monkeypatch.setenv("DISPLAY", ":99")
    assert qt_failure_reason(said, 134) == reason


# -- the child process: a real viewer, screenshots, what it saw -----------------------------------


def window(store: Path, frame: int, out: Path) -> None:
    """Open the viewer `pipeline view` opens (without its event loop), go to `frame`, take three canvas screenshots
    (the raw layer alone, volume/labels alone, everything) and write what the viewer holds to seen.json."""
    import napari
    from qtpy.QtWidgets import QApplication

    from pipeline.pictures.view import LiveView, build_viewer

    view = LiveView(store)
    view.refresh()
    shown = build_viewer(napari, view)
    viewer = shown.viewer
    viewer.window.resize(1200, 900)  # the canvas's size (and so the zoom) from this test, not from napari's saved settings
    viewer.dims.set_current_step(0, frame)
    viewer.reset_view()
    QApplication.processEvents()

    def screenshot(name: str, visible: set[str]) -> tuple[int, int]:
        for layer in viewer.layers:
            layer.visible = layer.name in visible
        if schema.VOLUME_LABELS in visible and len(visible) == 1:
            viewer.layers[schema.VOLUME_LABELS].opacity = 1.0
        picture = viewer.screenshot(canvas_only=True)
        Image.fromarray(picture).save(out / name)
        return picture.shape[1], picture.shape[0]

    size = screenshot("raw.png", {RAW_LAYER})
    screenshot("labels.png", {schema.VOLUME_LABELS})
    viewer.layers[schema.VOLUME_LABELS].opacity = 0.5
    screenshot("all.png", {RAW_LAYER, schema.TLM_LABELS, schema.VOLUME_LABELS})
    sliders = viewer.window._qt_viewer.dims.slider_widgets  # napari's own Qt widgets: what a user sees
    seen = {
        "platform": QApplication.instance().platformName(),
        "window_visible": viewer.window._qt_window.isVisible(),
        "title": viewer.title,
        "layers": [layer.name for layer in viewer.layers],
        "axis_labels": list(viewer.dims.axis_labels),
        "slider_labels": [slider.axis_label.text() for slider in sliders],
        "slider_visible": [slider.isVisible() for slider in sliders],
        "shapes": [list(np.shape(layer.data)) for layer in viewer.layers],
        "extents": [np.asarray(layer.extent.world).tolist() for layer in viewer.layers],
        "contrast_limits": [float(value) for value in shown.image.contrast_limits],
        "camera_center": list(viewer.camera.center),
        "camera_zoom": float(viewer.camera.zoom),
        "screenshot_size": list(size),
    }
    (out / "seen.json").write_text(json.dumps(seen))
    viewer.close()


def follow(store: Path, out: Path) -> None:
    """Open the viewer on a running scan as `pipeline view` does, event loop and all; once the title says the scan is
    complete (or after CHILD_TIMEOUT_S), write what the viewer holds and close it."""
    import napari
    from qtpy.QtCore import QTimer

    from pipeline.pictures.view import LiveView, _follow, build_viewer

    view = LiveView(store)
    view.refresh()
    shown = build_viewer(napari, view)
    _follow(shown, view)
    titles = [shown.viewer.title]
    first_limits = [float(value) for value in shown.image.contrast_limits]
    (out / "opened").touch()
    started = time.monotonic()

    def look() -> None:
        if shown.viewer.title != titles[-1]:
            titles.append(shown.viewer.title)
        if not titles[-1].endswith("(complete)") and time.monotonic() - started < CHILD_TIMEOUT_S:
            return
        poll.stop()
        seen = {"titles": titles, "shapes": [list(np.shape(layer.data)) for layer in shown.viewer.layers],
                "first_contrast_limits": first_limits, "contrast_limits": [float(value) for value in shown.image.contrast_limits],
                "timer_active": shown.viewer.window._pipeline_refresh.isActive()}
        (out / "seen.json").write_text(json.dumps(seen))
        shown.viewer.close()

    poll = QTimer()
    poll.setInterval(100)
    poll.timeout.connect(look)
    poll.start()
    napari.run()


if __name__ == "__main__" and sys.argv[1:2] == ["window"]:
    window(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
elif __name__ == "__main__" and sys.argv[1:2] == ["follow"]:
    follow(Path(sys.argv[2]), Path(sys.argv[3]))
