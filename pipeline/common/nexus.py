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

log = logging.getLogger(__name__)
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


MAX_TEXT_CHARACTERS = 4096  # of a NeXus text field kept: a 20 MB scan_command failed a good scan (its message too big)


def read_text(node: h5py.Dataset) -> str:
    """A NeXus string dataset (scalar or one-element, bytes or str) as text, at most MAX_TEXT_CHARACTERS of it. Longer
    text (only a crafted or broken file has it) is cut, said once per field: it names the scan, it is never parsed whole."""
    if node.ndim and node.size:
        value = node[(0,) * node.ndim]  # the first element: a list of texts is not read whole
    else:
        value = node[()] if not node.ndim else b""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if len(text) > MAX_TEXT_CHARACTERS:
        field = (node.file.filename, node.name)
        if field not in _SAID_LONG and len(_SAID_LONG) < 10_000:
            _SAID_LONG.add(field)
            log.warning("%s:%s holds %s characters of text; only the first %s are kept", *field, f"{len(text):,}",
                        f"{MAX_TEXT_CHARACTERS:,}")
        text = text[:MAX_TEXT_CHARACTERS]
    return text


_SAID_LONG: set[tuple[str, str]] = set()  # text fields already said to be too long (each is said once)


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


@dataclass(frozen=True)
class ScanMove:
    """A scannable a GDA scan command names with a step, and that step per field (0 for a field it holds still):
    `scan hkl [0, 0, 0.9] [0, 0, 1.1] [0, 0, 0.001] ...` -> hkl, steps (0, 0, 0.001)."""

    name: str
    steps: tuple[float, ...]

    def fields(self) -> list[tuple[tuple[str, ...], float]]:
        """The dataset names each field may have in the scan file, with its step: hkl's l is `hkl_l` (GDA 9) or
        `l` (GDA 8); a scalar scannable's one field is its own name. Fields of a vector whose parts cannot be
        named (its length is not its name's) are left out."""
        if len(self.steps) == 1:
            return [((self.name,), self.steps[0])]
        if len(self.steps) != len(self.name):
            return []
        return [((f"{self.name}_{letter}", letter), step) for letter, step in zip(self.name, self.steps)]


_TOKEN = re.compile(r"\[[^\]]*\]|[^\s\[\]]+")


def scan_command_moves(command: str | None) -> list[ScanMove]:
    """What a GDA scan command steps, and by how much per field: the scan's own word for which fields move.
    `scan NAME START STOP STEP` (numbers or `[...]` vectors) for the first scannable, then `NAME START STOP STEP`
    or `NAME START STEP` for each further one moved with it; `scancn NAME STEP N`. A name followed by fewer
    than two values (a detector and its exposure, a fixed position) moves nothing. Empty for anything else."""
    if not command:
        return []
    tokens = _TOKEN.findall(command)
    if len(tokens) < 2 or tokens[0] not in ("scan", "scancn"):
        return []
    groups: list[tuple[str, list[tuple[float, ...]]]] = []
    for token in tokens[1:]:
        values = _numbers(token) if token.startswith("[") else ([float(token)] if _NUMBER.match(token) else None)
        if values is None:
            groups.append((token, []))
        elif groups and values:
            groups[-1][1].append(tuple(values))
    moves: list[ScanMove] = []
    for index, (name, args) in enumerate(groups):
        if tokens[0] == "scancn":
            if index == 0 and len(args) >= 2:
                moves.append(ScanMove(name, args[0]))
            continue
        if index == 0 and len(args) < 3:
            return []  # not a scan this parser knows
        if len(args) >= 3:  # START STOP STEP: a field whose start is its stop does not move, whatever its step
            start, stop, step = args[:3]
            if len(start) == len(stop) == len(step):
                moves.append(ScanMove(name, tuple(s if a != b else 0.0 for a, b, s in zip(start, stop, step))))
        elif len(args) == 2 and len(args[0]) == len(args[1]):  # START STEP: moved along with the first
            moves.append(ScanMove(name, args[1]))
    return moves


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


MAX_AXIS_POINTS = 1_000_000  # a scan axis has a value a point: a longer 1-D dataset is not one (and is never read whole)


def _is_axis(node: object) -> bool:
    """A 1-D numeric dataset of at most MAX_AXIS_POINTS values. An axis is read whole to see whether it moves: one that
    declared 400 M values (1.1 MB on disk, never written) took a reader to 2 GB until its deadline killed it."""
    return isinstance(node, h5py.Dataset) and node.ndim == 1 and node.dtype.kind in "fiu" and node.size <= MAX_AXIS_POINTS


# A field "varies" only against the scan: over the whole scan it must move by more than this fraction of the scan's
# step. A diffractometer's computed h and k wander by ~4e-14 while l steps by 0.001; they are constants.
STEP_FRACTION = 1e-3
# Below this spread (times the values' size, at least 1) a field is constant whatever the scan: float64 rounding.
NOISE = 1e-9


def _spread(node: h5py.Dataset) -> tuple[int, float, float]:
    """(finite values, their range, their largest magnitude) of a 1-D dataset."""
    values = np.asarray(node[()], dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0, 0.0, 0.0
    return int(values.size), float(np.ptp(values)), float(np.abs(values).max())


def _varies(node: h5py.Dataset, step: float) -> bool | None:
    """Whether the field moves against a scan of step `step` (0: unknown, then only rounding counts as constant);
    None while it has fewer than two values, which cannot tell."""
    size, spread, magnitude = _spread(node)
    if size < 2:
        return None
    return spread > max(NOISE * max(magnitude, 1.0), STEP_FRACTION * step)


def _default_plot_axis(nexus: h5py.File) -> tuple[str, bool] | None:
    """The first axis of the default plottable data by NeXus rules (NXentry@default -> NXdata @signal,
    @axes, AXISNAME_indices), as Diamond's hdfmap reads it, and whether the NXdata's `@axes` names it
    (False: the file names none and hdfmap guessed its first scannable, `count_time` as often as not)."""
    from hdfmap import NexusMap  # imported here: it is only needed when a scan is opened

    mapping = NexusMap()
    try:
        mapping.populate(nexus)
        axes, _signals = mapping.nexus_default_paths()
    except Exception:  # a file hdfmap cannot map: the scan command is the fallback
        return None
    for path in axes:
        node = nexus.get(path)
        if _is_axis(node):
            return str(path), _named_by_axes(node)
    return None


def _named_by_axes(node: h5py.Dataset) -> bool:
    """Whether the NXdata group holding `node` names it in its `@axes` (a list, or one `a:b` string)."""
    names = node.parent.attrs.get("axes")
    if names is None:
        return False
    names = [names] if isinstance(names, (str, bytes)) else list(np.asarray(names).reshape(-1))
    words = {word for name in names for word in re.split(r"[:,\s]+", name.decode(errors="replace") if isinstance(name, bytes) else str(name))}
    return node.name.rsplit("/", 1)[-1] in words


def _nxdata_groups(nexus: h5py.File, entry: str) -> list[h5py.Group]:
    """The entry's NXdata groups, its default (`@default`) first: a field there is the one its plot shows."""
    group = nexus.get(entry)
    if not isinstance(group, h5py.Group):
        return []
    default = group.attrs.get("default")
    default = default.decode(errors="replace") if isinstance(default, bytes) else default
    groups = [child for child in group.values() if isinstance(child, h5py.Group) and child.attrs.get("NX_class") in (b"NXdata", "NXdata")]
    return sorted(groups, key=lambda child: child.name.rsplit("/", 1)[-1] != default)


@dataclass(frozen=True)
class _Field:
    node: h5py.Dataset
    step: float  # the scan command's step for it: 0 where the command holds it still


def _command_fields(nexus: h5py.File, entry: str, moves: list[ScanMove]) -> list[_Field]:
    """The 1-D datasets of the scan command's fields, in the command's order, each with the command's step:
    `hkl` -> hkl_h, hkl_k, hkl_l (GDA 9) or h, k, l (GDA 8, under `measurement`); `eta` -> eta."""
    found: list[_Field] = []
    groups = _nxdata_groups(nexus, entry)
    for move in moves:
        for names, step in move.fields():
            for group in groups:
                node = next((group[name] for name in names if _is_axis(group.get(name))), None)
                if node is not None:
                    found.append(_Field(node, abs(step)))
                    break
    return found


def _scannable_fields(nexus: h5py.File, entry: str, scannable: str) -> list[h5py.Dataset]:
    """1-D datasets of a scannable the command names without steps the parser knows, in the entry's NXdata groups."""
    names = [scannable, *(f"{scannable}_{letter}" for letter in scannable)]
    if len(scannable) > 1:
        names += list(scannable)
    found: list[h5py.Dataset] = []
    for group in _nxdata_groups(nexus, entry):
        for name in names:
            node = group.get(name)
            if _is_axis(node) and all(node.name != other.name for other in found):
                found.append(node)
    return found


def _axis(node: h5py.Dataset, source: str) -> ScanAxis:
    return ScanAxis(node.name, node.name.rsplit("/", 1)[-1], source)


def find_scan_axis(nexus: h5py.File, entry: str, command: str | None) -> ScanAxis | None:
    """The scan axis. The default plottable data's axis (NeXus rules, read by hdfmap) unless the scan says
    otherwise: the scan command holds that field still (`scan hkl ... [0, 0, 0.001]` while @axes names h), or
    it is constant against the scan's step while a field of the command moves. Then (or when the file names
    no axis) the first field the command steps; without steps, the scannable's varying field.
    "Constant" is relative to the scan: h and k computed to ~4e-14 while l steps 0.001 do not vary."""
    moves = scan_command_moves(command)
    fields = _command_fields(nexus, entry, moves)
    steps = [field.step for field in fields if field.step > 0]
    step = min(steps) if steps else 0.0
    moving = [field.node for field in fields if field.step > 0]
    held = {field.node.name for field in fields if field.step == 0}
    if not moves:  # a command the parser does not know: its scannable's fields, judged by their values alone
        moving = [node for scannable in scan_command_scannables(command) for node in _scannable_fields(nexus, entry, scannable)]
    default = _default_plot_axis(nexus)
    if default is not None and default[1]:
        node = nexus[default[0]]
        changed = [other for other in moving if other.name != node.name and _varies(other, step) is not False]
        if node.name in held and changed:
            return _axis(changed[0], f"scan command scannable (its step holds the default plot's axis {node.name} still)")
        if _varies(node, step) is False and (changed := [other for other in changed if _varies(other, step)]):
            return _axis(changed[0], f"scan command scannable (the default plot's axis {node.name} is constant against the scan)")
        return _axis(node, f"NeXus default plot axis ({node.parent.name}@axes)")
    varying = [node for node in moving if _varies(node, step)]
    undecided = [node for node in moving if _varies(node, step) is None]
    chosen = (varying or undecided or moving or [field.node for field in fields] or [None])[0]
    if chosen is not None:
        return _axis(chosen, "scan command scannable (the file names no axis)")
    if default is not None and _varies(guess := nexus[default[0]], step) is not False:  # not a constant like count_time
        return _axis(guess, f"first scannable of the default data ({guess.parent.name} names no axis)")
    return None
