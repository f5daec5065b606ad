"""NeXus files built by hand, the way a copied, finished or crafted scan file arrives in a watched directory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

NEXUS_ENTRY = "entry1"


def appear(path: Path, write: Callable[[Path], object]) -> Path:
    """Write a file under a temporary name, then rename it into place: it appears whole, like a finished copy."""
    temporary = path.with_name(path.name + ".part")
    write(temporary)
    os.replace(temporary, path)
    return path


def nexus_file(path: Path, data: np.ndarray | None = None, *, shape: tuple[int, ...] | None = None, dtype: object = None,
               detector: str = "pil3_100k", link: str | None = None) -> Path:
    """A finished DiPID-era NeXus file (frames at entry1/<detector>/data), or one with an external link instead."""

    def write(target: Path) -> None:
        with h5py.File(target, "w") as handle:
            entry = handle.create_group(NEXUS_ENTRY)
            frames = (data.shape[0] if data is not None and data.ndim == 3 else shape[0] if shape else 5)
            entry["scan_command"] = f"scan eta 10 {10 + 0.25 * (frames - 1):g} 0.25 pil3_100k 1"  # as many points as frames
            entry["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S") + f".{time.time_ns() % 10**9:09d}"
            entry["end_time"] = "2024-01-01T00:00:00"
            group = entry.create_group(detector)
            if link is not None:
                group["data"] = h5py.ExternalLink(link, "/entry/instrument/detector/data")
            elif data is not None:
                group.create_dataset("data", data=data, chunks=(1, *data.shape[1:]) if data.ndim == 3 else None)
            else:
                group.create_dataset("data", shape=shape, dtype=dtype)

    return appear(path, write)
