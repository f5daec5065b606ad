"""Looking at a scan's store: `pipeline show` (one frame's overlay), `pipeline view` (napari, or a
static 3D picture where napari is not installed) and `pipeline quicklook` (the quick-look PNG).

Each command prints the path of what it wrote, so it can be opened or scripted; a path that is not
a scan store, or a frame that is out of range or not done, is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import zarr

from pipeline.common.detector import SATURATION
from pipeline.errors import reporting
from pipeline.pictures.quicklook import busiest_frame, draw_volume, save_frame_overlay, write_quicklook
from pipeline.store import StoreReader, schema
from pipeline.store.reader import StoreError

# -- show ------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    store: Path = args.store
    if args.frame is None:
        frame, why = busiest_frame(store)
        print(f"frame {frame}: {why}")
    else:
        frame = args.frame
    out = args.out if args.out is not None else StoreReader(store).output_path(f".frame{frame}.png")
    print(save_frame_overlay(store, frame, out, scale=args.scale))
    return 0


# -- view ------------------------------------------------------------------------------------


def napari_module() -> ModuleType | None:
    """napari if it can be imported, else None (it is an optional, heavy dependency)."""
    try:
        import napari
    except ImportError:
        return None
    return napari


def live_title(name: str, done: int, expected: int | None, status: str) -> str:
    """The viewer's window title, e.g. `scan1: 17 of 40 frames done (running)`."""
    return f"{name}: {done} of {expected} frames done ({status})" if expected else f"{name}: {done} frames done ({status})"


class DoneFrames:
    """A store's (frame, y, x) array as napari sees it: as many frames as up to the newest done one, and only
    done frames' values (the others read as 0). Read lazily, frame by frame, as napari asks; the extent, and so
    napari's frame slider, follows the done frames, not the frames the writer has allocated ahead."""

    def __init__(self, array: zarr.Array, done: np.ndarray) -> None:
        self.array = array
        self.done = np.asarray(done, dtype=bool)
        self.frames = int(np.flatnonzero(self.done)[-1]) + 1 if self.done.any() else 0
        self.dtype = np.dtype(array.dtype)
        self.shape: tuple[int, ...] = (self.frames, *array.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.frames

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        parts = key if isinstance(key, tuple) else (key,)
        first, rest = (parts[0], parts[1:]) if parts else (slice(None), ())
        if isinstance(first, (int, np.integer)):
            index = int(first) + (self.frames if int(first) < 0 else 0)
            if not 0 <= index < self.frames:
                raise IndexError(f"frame {first} outside 0..{self.frames - 1}")
            values = np.asarray(self.array[(index,) + tuple(rest)])
            return values if self.done[index] else np.zeros_like(values)
        if isinstance(first, slice) and not any(part is Ellipsis for part in rest):
            frames = np.arange(*first.indices(self.frames))
            if not frames.size:
                return np.zeros((0, *self.shape[1:]), dtype=self.dtype)[(slice(None),) + tuple(rest)]
            low, high = int(frames.min()), int(frames.max())
            values = np.array(self.array[(slice(low, high + 1),) + tuple(rest)])[frames - low]
            values[~self.done[frames]] = 0
            return values
        return np.asarray(self[:])[key]  # anything else napari might ask: from the whole (done) stack


CONTRAST_PERCENTILES = (5.0, 99.9)
"""The raw layer's contrast limits, as percentiles of the done frames' counts (dead and saturated pixels left out):
the low one keeps the background's noise (and so the detector's modules and gaps) visible, the high one lets the
brightest pixels, the peaks, go white. From the counts' maximum, as napari does by itself, one saturated pixel
(log1p of 1,000,000) would leave everything else nearly black."""


class CountHistogram:
    """How many pixels of the frames seen so far had each count 0..SATURATION-1: percentiles of a whole scan,
    kept up to date frame by frame. Dead pixels (negative) and saturated ones are not counts of the sample."""

    def __init__(self) -> None:
        self.counts = np.zeros(SATURATION, dtype=np.int64)

    def add(self, frame: np.ndarray) -> None:
        values = np.asarray(frame, dtype=np.float64)
        values = np.rint(values[np.isfinite(values) & (values >= 0) & (values < SATURATION)]).astype(np.int64)
        found = np.bincount(values)  # as long as the frame's highest count: short for a frame of low counts
        self.counts[: found.size] += found

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def percentile(self, q: float) -> int:
        """The smallest count with at least q% of the pixels at or below it (numpy's `inverted_cdf`)."""
        cumulative = np.cumsum(self.counts)
        return int(np.searchsorted(cumulative, q / 100.0 * cumulative[-1], side="left"))

    def contrast_limits(self) -> tuple[float, float]:
        """CONTRAST_PERCENTILES of the counts, on the raw layer's log1p scale; (0, 1) before any pixel."""
        if not self.total:
            return 0.0, 1.0
        low, high = (float(np.log1p(self.percentile(q))) for q in CONTRAST_PERCENTILES)
        return low, max(high, low + 1e-3)  # napari needs high > low (a flat frame)


@dataclass
class LiveView:
    """What napari shows of a store that may still be written, refreshed as frames become done.

    `refresh` reads the frames that became done since the last look (the raw ones from the scan's own
    file, log1p, into memory: napari wants one array for a stack) and reopens the label arrays, whose
    shape grows with the scan; `title` says how far the scan is. No napari here, so it is testable."""

    store: Path
    raw: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.float32))
    labels: dict[str, DoneFrames] = field(default_factory=dict)
    title: str = ""
    status: str = "unknown"
    frames_done: int = 0
    histogram: CountHistogram = field(default_factory=CountHistogram)
    _loaded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    _identity: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status in schema.FINAL_STATUSES

    def refresh(self) -> bool:
        """Look at the store again; True when the layers' data changed (new done frames, or a new extent)."""
        reader = StoreReader(self.store)
        done_flags = np.zeros(reader.frames_total, dtype=bool)
        done = reader.done_frames()
        done_flags[done] = True
        self.status, self.frames_done = reader.status, int(done.size)
        expected = reader.attrs.get(schema.Attr.FRAMES_EXPECTED)  # one read of the attributes per look
        self.title = live_title(reader.name, self.frames_done, int(expected) if isinstance(expected, int) else reader.frames_total, self.status)
        attributes = reader.attrs
        identity = tuple(str(attributes.get(name)) for name in (schema.Attr.START_TIME, schema.Attr.SOURCE_FILE, schema.Attr.SOURCE_START_TIME))
        if identity != self._identity:  # another store at this path (a replaced scan file): nothing loaded is its
            self._identity, self._loaded, self.raw = identity, np.zeros(0, dtype=bool), np.zeros((0, 0, 0), dtype=np.float32)
            self.histogram = CountHistogram()
        extent = int(done[-1]) + 1 if done.size else 0
        loaded = np.zeros(extent, dtype=bool)
        loaded[: min(extent, self._loaded.size)] = self._loaded[:extent]
        new = [int(frame) for frame in done.tolist() if frame < extent and not loaded[frame]]
        if not new and extent == self.raw.shape[0] and self.labels:
            return False
        with reader.raw_frames() as dataset:
            raw = np.zeros((extent, *dataset.shape[1:]), dtype=np.float32)
            kept = min(extent, self.raw.shape[0])
            if kept and self.raw.shape[1:] == raw.shape[1:]:
                raw[:kept] = self.raw[:kept]
            for frame in new:  # frames not done stay 0, as their labels read
                if frame < dataset.shape[0]:
                    counts = np.asarray(dataset[frame])
                    raw[frame] = np.log1p(np.clip(counts, 0, None))
                    self.histogram.add(counts)
                    loaded[frame] = True
        self.raw, self._loaded = raw, loaded
        self.labels = {name: DoneFrames(array, done_flags) for name in LABEL_LAYERS if (array := reader.array(name)) is not None}
        return True

    @property
    def contrast_limits(self) -> tuple[float, float]:
        return self.histogram.contrast_limits()


LABEL_LAYERS = (schema.TLM_LABELS, schema.SSL_MASK, schema.VOLUME_LABELS)
REFRESH_MS = 1000  # how often a viewer of a running scan looks at its store


QT_PROBE_TIMEOUT_S = 30.0
WINDOWLESS_PLATFORMS = ("offscreen", "minimal", "minimalegl")
_QT_PROBE = "from qtpy.QtWidgets import QApplication; app = QApplication([]); print(app.platformName())"


def qt_problem(timeout_s: float = QT_PROBE_TIMEOUT_S) -> str | None:
    """Why Qt cannot open a window here, or None when it can.

    Qt aborts the whole process (SIGABRT, exit code 134) when its platform plugin does not load, e.g. for a
    missing Debian library such as libxcb-cursor0 or for no display; so a short child process tries first,
    with Qt's plugin messages on, and its output names what is missing."""
    env = dict(os.environ, QT_DEBUG_PLUGINS="1")
    try:
        probe = subprocess.run([sys.executable, "-c", _QT_PROBE], capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return f"Qt did not start within {timeout_s:g} s"
    platform = probe.stdout.strip().splitlines()[-1:] if probe.returncode == 0 else []
    if platform and platform[0] in WINDOWLESS_PLATFORMS:  # Qt starts, but nobody would see the window
        return f"Qt's platform is {platform[0]!r} (QT_QPA_PLATFORM), which shows no window"
    if probe.returncode == 0:
        return None
    return qt_failure_reason(probe.stderr, probe.returncode)


_CANNOT_LOAD = re.compile(r'Cannot load library [^:"]+: ([^"\n]+)')
_NO_SUCH_LIBRARY = re.compile(r"(lib[\w.+-]+?)\.so\.(\d+)[\w.]*: cannot open shared object file")


def debian_package(soname_stem: str, version: str) -> str:
    """Debian's name for the package of a shared library, by its policy: libxcb-cursor.so.0 is in libxcb-cursor0,
    libxkbcommon-x11.so.0 in libxkbcommon-x11-0 (a hyphen when the name ends in a digit)."""
    return f"{soname_stem}{'-' if soname_stem[-1].isdigit() else ''}{version}".lower()


def qt_failure_reason(stderr: str, returncode: int) -> str:
    """One line from what Qt said when it could not start: the library that did not load (and its Debian
    package), or no display, or Qt's own last word."""
    if (missing := _NO_SUCH_LIBRARY.search(stderr)) is not None:
        stem, version = missing.groups()
        return (f"Qt's platform plugin cannot load {stem}.so.{version} "
                f"(on Debian/Ubuntu: apt-get install {debian_package(stem, version)})")
    if (failed := _CANNOT_LOAD.search(stderr)) is not None:
        return f"Qt's platform plugin cannot load a library: {failed.group(1).strip()}"
    if "could not connect to display" in stderr:
        return f"Qt could not connect to a display (DISPLAY={os.environ.get('DISPLAY', '')!r})"
    said = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith(("qt.core.", " ", "\t", "{", "}", "]"))]
    return f"Qt could not start (exit code {returncode}{': ' + said[-1] if said else ''})"


@dataclass
class ViewerLayers:
    """The napari viewer of a store and its layers, for `_follow` and for tests that look at a real window."""

    viewer: Any
    image: Any
    labels: dict[str, Any]


def build_viewer(napari: ModuleType, view: LiveView) -> ViewerLayers:
    """A napari viewer of `view` (already refreshed): the raw frames on a log scale with contrast limits from
    the counts' percentiles, the label arrays over them on the same grid, the slider labelled `frame`."""
    viewer = napari.Viewer(title=view.title)
    axes = {"axis_labels": schema.FRAME_DIMS}
    image = viewer.add_image(view.raw, name=RAW_LAYER, colormap="gray", contrast_limits=view.contrast_limits, **axes)
    labels = {name: viewer.add_labels(data, name=name, opacity=0.5, visible=name != schema.SSL_MASK, **axes)
              for name, data in view.labels.items()}
    viewer.dims.axis_labels = schema.FRAME_DIMS
    return ViewerLayers(viewer, image, labels)


RAW_LAYER = "raw counts (log1p)"


def open_in_napari(napari: ModuleType, store: Path) -> None:
    """Raw frames (log scale) and the label arrays as napari layers; blocks until the window is closed.

    On a running scan the layers grow as frames become done (a Qt timer, every REFRESH_MS) and the
    window title says how far the scan is; the timer stops once the scan is over.
    """
    view = LiveView(store)
    view.refresh()
    shown = build_viewer(napari, view)
    if not view.finished:
        _follow(shown, view)
    napari.run()


def _follow(shown: ViewerLayers, view: LiveView) -> None:
    """Refresh the layers and the title on napari's own event loop until the scan is over."""
    from qtpy.QtCore import QTimer  # napari's Qt binding: there whenever napari is

    viewer, image, layers = shown.viewer, shown.image, shown.labels
    timer = QTimer()
    timer.setInterval(REFRESH_MS)
    limits = [view.contrast_limits]  # the ones last set: a user's own limits are kept

    def refresh() -> None:
        try:
            changed = view.refresh()
        except StoreError as error:  # the store was moved or replaced: say so, keep the window
            viewer.title = f"{view.store.name}: {error}"
            return
        if changed:
            shown_limits = tuple(float(value) for value in image.contrast_limits)
            users = not np.allclose(shown_limits, limits[0])  # set by hand in napari's layer controls: kept
            image.data = view.raw  # (napari resets the contrast limits to the data's range here)
            limits[0] = view.contrast_limits if not users else limits[0]
            image.contrast_limits = shown_limits if users else limits[0]
            for name, layer in layers.items():
                if name in view.labels:
                    layer.data = view.labels[name]
        viewer.title = view.title
        if view.finished:
            timer.stop()

    timer.timeout.connect(refresh)
    timer.start()
    viewer.window._pipeline_refresh = timer  # kept alive as long as the window


def cmd_view(args: argparse.Namespace) -> int:
    store: Path = args.store
    StoreReader(store)  # a bad path is one line before anything heavy is imported
    napari = None if args.static else napari_module()
    problem = qt_problem() if napari is not None else None
    if napari is not None and problem is None:
        open_in_napari(napari, store)
        return 0
    picture = draw_volume(store, args.out)
    if args.static:
        reason = "--static given"
    elif problem is not None:
        reason = f"napari cannot open a window: {problem}"
    else:
        reason = "napari was not found (pip install 'napari[pyqt6]' for the interactive viewer)"
    print(f"{reason}; static 3D picture of the peak volume: {picture}")
    return 0


# -- quicklook -------------------------------------------------------------------------------


def cmd_quicklook(args: argparse.Namespace) -> int:
    print(write_quicklook(args.store, args.out))
    return 0


# -- the parsers -----------------------------------------------------------------------------


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `show`, `view` and `quicklook` on the `pipeline` command line."""
    show = subparsers.add_parser("show", help="one frame of a scan with its masks and boxes drawn over it, as a PNG",
                                 description="Save one raw frame with TLM instance outlines, the SSLM mask outline and TLM boxes "
                                             "with scores. Without --frame, the frame with the most peak pixels is chosen.")
    show.add_argument("store", type=Path, metavar="SCAN.zarr", help="a scan's store (live or finished)")
    show.add_argument("--frame", type=int, metavar="N", help="frame index (default: the one with the most peak pixels)")
    scale = show.add_mutually_exclusive_group()
    scale.add_argument("--log", dest="scale", action="store_const", const="log", help="log colour scale (default)")
    scale.add_argument("--linear", dest="scale", action="store_const", const="linear", help="linear colour scale")
    show.add_argument("--out", type=Path, metavar="PNG", help="where to write (default: <scan>.frame<N>.png beside the store)")
    show.set_defaults(func=reporting("show", cmd_show), scale="log")

    view = subparsers.add_parser("view", help="open a scan's frames and masks in napari (or draw the 3D peaks without it)",
                                 description="With napari installed: raw frames, tlm/labels, ssl/mask and volume/labels as layers. "
                                             "Without it, or where Qt cannot open a window (no display, a missing system library, "
                                             "named in the message): a static 3D picture of the peak volume, <scan>.volume3d.png.")
    view.add_argument("store", type=Path, metavar="SCAN.zarr", help="a scan's store (live or finished)")
    view.add_argument("--out", type=Path, metavar="PNG", help="where the static picture goes (default: <scan>.volume3d.png)")
    view.add_argument("--static", action="store_true", help="draw the static 3D picture even if napari is installed")
    view.set_defaults(func=reporting("view", cmd_view))

    quicklook = subparsers.add_parser("quicklook", help="(re)make a scan's quick-look PNG: peak projection and rocking curves",
                                      description="Maximum projection of the raw counts with the 3D peaks outlined and numbered, "
                                                  "and each peak's rocking curve, as <scan>.quicklook.png beside the store.")
    quicklook.add_argument("store", type=Path, metavar="SCAN.zarr", help="a scan's store (live or finished)")
    quicklook.add_argument("--out", type=Path, metavar="PNG", help="where to write (default: <scan>.quicklook.png beside the store)")
    quicklook.set_defaults(func=reporting("quicklook", cmd_quicklook))
