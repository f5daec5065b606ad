"""Reading NeXus/HDF5 scan files without ever getting in a writer's way: the helpers every reader shares.

The follower, the store (to tell a replaced scan file from the one it was made from), the
pictures (raw frames) and the benchmark all open files that a detector may still be writing.
They open them here: SWMR where the file allows it and never with a file lock, so a reader
never blocks the writer.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

# hdfmap warns about every file without NeXus defaults (the simulator's, GDA 8's); what we chose is logged by the follower
logging.getLogger("hdfmap").setLevel(logging.ERROR)

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
    detector_path: str | None = None  # where in the scan file the frames were found
    axis_path: str | None = None  # the dataset whose values are the scan axis
    axis_source: str | None = None  # how that dataset was chosen
    expected_frames_source: str | None = None  # where the expected frame count was read
    frame_shape: tuple[int, int] = (195, 487)  # (rows, columns) of the detector's frames, as the file stores them


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


# -- what a scan file says about its scan, by NeXus rules ---------------------------------------

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class ScanAxis:
    """The dataset whose values are the scan axis, and how it was chosen (recorded in the store)."""

    path: str
    name: str
    source: str  # e.g. "NeXus default plot (entry/pil3_100k@axes)", "scan command scannable l"


def _numbers(text: str) -> list[float]:
    return [float(token) for token in re.split(r"[\s,\[\]]+", text) if token and _NUMBER.match(token)]


def scan_command_points(command: str | None) -> int | None:
    """Points a GDA `scan` command makes: `scan eta 10 11 0.25 ...` -> 5; for a vector scannable
    (`scan hkl [0, 0, 0.9] [0, 0, 1.1] [0, 0, 0.001] ...`) the most points any varying field makes.
    `scancn NAME STEP N` -> N. None for anything else (the command is only a fallback)."""
    if not command:
        return None
    words = command.split(maxsplit=2)
    if len(words) < 3:
        return None
    verb, rest = words[0], words[2]
    if verb == "scancn":
        values = _numbers(rest)
        return int(values[1]) if len(values) >= 2 and values[1] >= 1 else None
    if verb != "scan":
        return None
    vector = re.match(r"\s*(\[[^\]]*\])\s*(\[[^\]]*\])\s*(\[[^\]]*\])", rest)
    if vector:
        starts, stops, steps = (_numbers(group) for group in vector.groups())
    else:
        values = _numbers(" ".join(rest.split()[:3]))
        if len(values) < 3:
            return None
        starts, stops, steps = [values[0]], [values[1]], [values[2]]
    counts = [int(round((stop - start) / step)) + 1 for start, stop, step in zip(starts, stops, steps) if step]
    counts = [count for count in counts if count >= 1]
    return max(counts) if counts else None


def scan_command_scannables(command: str | None) -> list[str]:
    """The scannable named right after the verb (`scan hkl ...` -> ["hkl"]); empty when there is none."""
    if not command:
        return []
    words = command.split()
    return [words[1]] if len(words) > 1 and words[0].startswith("scan") and not _NUMBER.match(words[1]) else []


def expected_frames(nexus: h5py.File, entry: str, command: str | None) -> tuple[int | None, str | None]:
    """How many frames the scan will have, and where that was read: GDA 9's `diamond_scan/scan_shape`,
    GDA 8's `scan_dimensions`, else the scan command."""
    for path in (f"{entry}/diamond_scan/scan_shape", f"{entry}/scan_dimensions"):
        node = nexus.get(path)
        if isinstance(node, h5py.Dataset) and node.dtype.kind in "iu" and 0 < node.size <= 8:
            shape = np.asarray(node[()]).reshape(-1)
            if (shape > 0).all():
                return int(np.prod(shape)), path
    points = scan_command_points(command)
    return (points, "scan command") if points is not None else (None, None)


def _is_axis(node: object) -> bool:
    return isinstance(node, h5py.Dataset) and node.ndim == 1 and node.dtype.kind in "fiu"


def _varies(node: h5py.Dataset) -> bool:
    values = np.asarray(node[()], dtype=np.float64)
    values = values[np.isfinite(values)]
    return values.size >= 2 and bool(np.ptp(values) > 0)


def _default_plot_axis(nexus: h5py.File) -> str | None:
    """The first axis of the default plottable data by NeXus rules (NXentry@default -> NXdata @signal,
    @axes, AXISNAME_indices), as Diamond's hdfmap reads it; None when the file names none."""
    from hdfmap import NexusMap  # imported here: it is only needed when a scan is opened

    mapping = NexusMap()
    try:
        mapping.populate(nexus)
        axes, _signals = mapping.nexus_default_paths()
    except Exception:  # a file hdfmap cannot map: the scan command is the fallback
        return None
    for path in axes:
        if _is_axis(nexus.get(path)):
            return str(path)
    return None


def _scannable_fields(nexus: h5py.File, entry: str, scannable: str) -> list[h5py.Dataset]:
    """1-D datasets of a scan command's scannable in the entry's NXdata groups: `hkl` -> hkl_h, hkl_k, hkl_l
    (GDA 9) or h, k, l (GDA 8, under `measurement`); `eta` -> eta."""
    found: list[h5py.Dataset] = []
    group = nexus.get(entry)
    if not isinstance(group, h5py.Group):
        return found
    for child in group.values():
        if not isinstance(child, h5py.Group) or child.attrs.get("NX_class") not in (b"NXdata", "NXdata"):
            continue
        names = [scannable, *(f"{scannable}_{letter}" for letter in scannable)]
        if len(scannable) > 1:
            names += list(scannable)
        for name in names:
            node = child.get(name)
            if _is_axis(node) and node not in found:
                found.append(node)
    return found


def find_scan_axis(nexus: h5py.File, entry: str, command: str | None) -> ScanAxis | None:
    """The scan axis: the default plottable data's axis (NeXus rules, read by hdfmap), unless it is
    constant while a field of the scan command's scannable varies; else the scannable's varying field."""
    fields = [node for scannable in scan_command_scannables(command) for node in _scannable_fields(nexus, entry, scannable)]
    varying = [node for node in fields if _varies(node)]
    default = _default_plot_axis(nexus)
    if default is not None:
        node = nexus[default]
        if varying and _varies(varying[0]) and not _varies(node) and node.size >= 2:
            chosen = varying[0]
            return ScanAxis(chosen.name, chosen.name.rsplit("/", 1)[-1],
                            f"scan command scannable (the default plot's axis {default} is constant)")
        return ScanAxis(default, default.rsplit("/", 1)[-1], f"NeXus default plot axis ({default.rsplit('/', 1)[0]}@axes)")
    if varying or fields:
        chosen = (varying or fields)[0]
        return ScanAxis(chosen.name, chosen.name.rsplit("/", 1)[-1], "scan command scannable")
    return None
