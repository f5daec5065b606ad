"""Looking at a scan's store: `pipeline show` (one frame's overlay), `pipeline view` (napari, or a
static 3D picture where napari is not installed) and `pipeline quicklook` (the quick-look PNG).

Each command prints the path of what it wrote, so it can be opened or scripted; a path that is not
a scan store, or a frame that is out of range or not done, is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import zarr

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
                    raw[frame] = np.log1p(np.clip(dataset[frame], 0, None))
                    loaded[frame] = True
        self.raw, self._loaded = raw, loaded
        self.labels = {name: DoneFrames(array, done_flags) for name in LABEL_LAYERS if (array := reader.array(name)) is not None}
        return True


LABEL_LAYERS = (schema.TLM_LABELS, schema.SSL_MASK, schema.VOLUME_LABELS)
REFRESH_MS = 1000  # how often a viewer of a running scan looks at its store


def open_in_napari(napari: ModuleType, store: Path) -> None:
    """Raw frames (log scale) and the label arrays as napari layers; blocks until the window is closed.

    On a running scan the layers grow as frames become done (a Qt timer, every REFRESH_MS) and the
    window title says how far the scan is; the timer stops once the scan is over.
    """
    view = LiveView(store)
    view.refresh()
    viewer = napari.Viewer(title=view.title)
    image = viewer.add_image(view.raw, name="raw counts (log1p)", colormap="gray")
    layers = {name: viewer.add_labels(data, name=name, opacity=0.5, visible=name != schema.SSL_MASK) for name, data in view.labels.items()}
    if not view.finished:
        _follow(viewer, view, image, layers)
    napari.run()


def _follow(viewer: Any, view: LiveView, image: Any, layers: dict[str, Any]) -> None:
    """Refresh the layers and the title on napari's own event loop until the scan is over."""
    from qtpy.QtCore import QTimer  # napari's Qt binding: there whenever napari is

    timer = QTimer()
    timer.setInterval(REFRESH_MS)

    def refresh() -> None:
        try:
            changed = view.refresh()
        except StoreError as error:  # the store was moved or replaced: say so, keep the window
            viewer.title = f"{view.store.name}: {error}"
            return
        if changed:
            image.data = view.raw
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
    if napari is not None:
        open_in_napari(napari, store)
        return 0
    picture = draw_volume(store, args.out)
    reason = "--static given" if args.static else "napari was not found (pip install 'napari[all]' for the interactive viewer)"
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
                                             "Without it: a static 3D picture of the peak volume, <scan>.volume3d.png.")
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
