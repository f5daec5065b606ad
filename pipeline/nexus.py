"""Reading NeXus/HDF5 scan files without ever getting in a writer's way: the helpers every reader shares.

The follower, the store (to tell a replaced scan file from the one it was made from), the
pictures (raw frames) and the benchmark all open files that a detector may still be writing.
They open them here: SWMR where the file allows it and never with a file lock, so a reader
never blocks the writer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)  # what h5py raises on a file it cannot read
ENTRIES = ("entry", "entry1")  # GDA 9 and GDA 8 names of the NXentry

Identity = tuple[int, int]  # (device, inode)


@dataclass(frozen=True)
class ScanInfo:
    """Where a scan's frames come from and what the scan file says about them; recorded in its store."""

    nexus_path: Path
    scan_id: str
    layout: str  # "gda9", "gda8" or "nexus"
    entry: str
    source_file: Path
    dataset: str
    scan_command: str | None
    expected_frames: int | None
    axis_name: str | None
    start_time: str | None = None  # the NeXus `start_time`: tells a replaced file of the same name from the old one


def open_hdf5(path: Path) -> h5py.File:
    """Open for reading without ever blocking a writer: SWMR where the file allows it, no file lock."""
    try:
        return h5py.File(path, "r", swmr=True, locking=False)
    except OSError:
        return h5py.File(path, "r", locking=False)


def read_text(node: h5py.Dataset) -> str:
    """A NeXus string dataset (scalar or one-element, bytes or str) as text."""
    value = node[()]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def file_identity(path: Path) -> Identity | None:
    """(device, inode) of the file at `path` now, or None if there is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def handle_identity(handle: h5py.File) -> Identity | None:
    """(device, inode) of the file an open handle reads, whatever its path now names."""
    try:
        status = os.fstat(handle.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, RuntimeError):
        return None
    return status.st_dev, status.st_ino


def scan_command_of(nexus: h5py.File, entry: str) -> str | None:
    """The scan command GDA 9 (`diamond_scan/scan_command`) or GDA 8 (`scan_command`) recorded, if any."""
    for path in (f"{entry}/diamond_scan/scan_command", f"{entry}/scan_command"):
        node = nexus.get(path)
        if isinstance(node, h5py.Dataset):
            return read_text(node)
    return None


def start_time_of(nexus: h5py.File, entry: str) -> str | None:
    node = nexus.get(f"{entry}/start_time")
    return read_text(node) if isinstance(node, h5py.Dataset) else None


def read_scan_identity(nexus_path: Path) -> dict[str, str | None] | None:
    """The NeXus `start_time` and `scan_command` of a scan file, or None when it cannot be read now."""
    try:
        with open_hdf5(Path(nexus_path)) as handle:
            for entry in ENTRIES:
                if entry in handle:
                    return {"start_time": start_time_of(handle, entry), "scan_command": scan_command_of(handle, entry)}
    except H5_ERRORS:
        return None
    return None
