"""Where a scan's store goes, and whether the store there was made from the scan file there now.

The daemon, `pipeline process` and a resumed daemon must all find the same store for a scan,
and must not take a store made from an earlier file of the same name for this one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.common.nexus import read_scan_identity
from pipeline.store.reader import read_attributes
from pipeline.store.schema import Attr

STORE_SUFFIX = ".zarr"


def store_path_for(nexus_path: Path, output_root: Path | None, roots: Iterable[Path] | None = None) -> Path:
    """Where a scan's store goes: the same answer every time, for the daemon, `pipeline process` and a resume.

    - Without `output.root`: `<scan>.zarr` beside `<scan>.nxs`.
    - With `output.root`: `<root>/<dir>/<scan>.zarr`, where `<dir>` is the scan's directory relative to
      the watched directories `roots` (`watch.dirs`; with several, relative to the deepest directory
      they all lie in), so that two scans of the same name in different directories never share a
      store. Watching `/data/cm1` with output root `/out`: `/data/cm1/1234.nxs` -> `/out/1234.zarr`,
      `/data/cm1/sample2/1234.nxs` -> `/out/sample2/1234.zarr`. Watching `/data/cm1` and `/data/cm2`:
      `/data/cm2/1234.nxs` -> `/out/cm2/1234.zarr`. A scan outside every watched directory (or with no
      `roots` given) goes to `<root>/<scan>.zarr`.
    """
    nexus_path = Path(nexus_path)
    if output_root is None:
        return nexus_path.with_suffix(STORE_SUFFIX)
    name = nexus_path.with_suffix(STORE_SUFFIX).name
    relative = _relative_dir(nexus_path.parent, [Path(r) for r in roots or []])
    return Path(output_root) / relative / name


def _relative_dir(directory: Path, roots: list[Path]) -> Path:
    """`directory` relative to the common base of `roots`, or `.` when it is not inside it."""
    if not roots:
        return Path(".")
    for resolve in (os.path.abspath, os.path.realpath):  # as configured first, then with links resolved
        base = Path(os.path.commonpath([resolve(r) for r in roots]))
        try:
            return Path(resolve(directory)).relative_to(base)
        except ValueError:
            continue
    return Path(".")


def store_made_from(store: Path, nexus_path: Path, identity: dict[str, str | None] | None = None) -> bool:
    """Whether the existing store was made from the file now at `nexus_path`, not from an earlier file of the same
    name that has since been replaced: by the NeXus `start_time` and `scan_command` it recorded, else by the file's
    inode, size and modification time recorded when it failed. A store that records neither counts as made from it.
    `identity` ({"start_time", "scan_command"}) is what the file says, when the caller has read it already (the daemon
    reads no HDF5 itself: its reader processes do); else the file is opened here."""
    attrs = read_attributes(store)
    if attrs is None:
        return False
    if attrs.get(Attr.SOURCE_START_TIME):
        now = identity if identity is not None else read_scan_identity(nexus_path)
        return now is not None and now["start_time"] == attrs[Attr.SOURCE_START_TIME] and (
            not attrs.get(Attr.SCAN_COMMAND) or now["scan_command"] == attrs[Attr.SCAN_COMMAND])
    if attrs.get(Attr.SOURCE_STAT):
        return bool(attrs[Attr.SOURCE_STAT] == stat_identity(nexus_path))
    return True


def recorded_stat_matches(store: Path, nexus_path: Path) -> bool:
    """Whether the store recorded the inode, size and modification time the file has now: the same file, unchanged
    since (known without opening it, so without HDF5)."""
    attrs = read_attributes(store)
    recorded = None if attrs is None else attrs.get(Attr.SOURCE_STAT)
    return recorded is not None and recorded == stat_identity(nexus_path)


def stat_identity(path: Path) -> list[int] | None:
    """Inode, size and modification time of a file: what a failed store records to recognise its scan file."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_ino, status.st_size, status.st_mtime_ns]
