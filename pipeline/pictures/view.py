"""Looking at a scan's store: `pipeline show` (one frame's overlay), `pipeline view` (napari, or a
static 3D picture where napari is not installed) and `pipeline quicklook` (the quick-look PNG).

Each command prints the path of what it wrote, so it can be opened or scripted; a path that is not
a scan store, or a frame that is out of range or not done, is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType

import numpy as np

from pipeline.errors import reporting
from pipeline.pictures.quicklook import busiest_frame, draw_volume, save_frame_overlay, write_quicklook
from pipeline.store import StoreReader, schema

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


def open_in_napari(napari: ModuleType, store: Path) -> None:
    """Raw frames (log scale) and the label arrays as napari layers; blocks until the window is closed.

    The label arrays go to napari as Zarr arrays, read as napari needs them; the raw frames are
    read into memory once (done frames only, float32), as napari wants one array for a stack.
    """
    reader = StoreReader(store)
    frames = reader.done_frames()
    viewer = napari.Viewer(title=f"{reader.name} ({reader.status})")
    with reader.raw_frames() as dataset:
        raw = np.zeros((reader.frames_total, *dataset.shape[1:]), dtype=np.float32)
        for frame in frames.tolist():  # frames not done stay 0, as the label arrays' fill value
            if frame < dataset.shape[0]:
                raw[frame] = np.log1p(np.clip(dataset[frame], 0, None))
    viewer.add_image(raw, name="raw counts (log1p)", colormap="gray")
    for name in (schema.TLM_LABELS, schema.SSL_MASK, schema.VOLUME_LABELS):
        array = reader.array(name)
        if array is not None:
            viewer.add_labels(array, name=name, opacity=0.5, visible=name != schema.SSL_MASK)
    napari.run()


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
