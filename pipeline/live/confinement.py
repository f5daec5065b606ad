"""Pixels come only from files under the roots the config allows: the watched directories and
`follow.allowed_roots` (for `pipeline process` without watched directories, the scan's own directory).

An HDF5 file can make its reader open other files: an external link (absolute, or relative with
`../`), a virtual dataset over another file's data, or raw storage in an external flat file (even
`/etc/passwd`). The daemon runs under an account that can read every visit's data, so each of them
is checked before a frame is read, and anything that leads outside the roots fails the scan with
one line naming the link and where it leads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py


def is_inside(path: Path | str, roots: Sequence[Path]) -> bool:
    """Whether `path`, with `..` and symbolic links resolved, lies under one of `roots` (resolved too)."""
    real = Path(os.path.realpath(path))
    return any(real == Path(os.path.realpath(root)) or Path(os.path.realpath(root)) in real.parents for root in roots)


def external_link_target(filename: str, holder: Path) -> Path:
    """Where an external link's file is: relative names relative to the file that holds the link;
    an absolute beamline path that does not exist here falls back to the same name beside that file."""
    target = Path(filename)
    if not target.is_absolute():
        return holder.parent / target
    if target.exists():
        return target
    return holder.parent / target.parent.name / target.name


def links_outside(handle: h5py.File, holder: Path, roots: Sequence[Path]) -> str | None:
    """The first external link in `handle` whose file lies outside `roots`, as one line, or None."""
    found: list[str] = []

    def visit(name: str, link: object) -> None:
        if not found and isinstance(link, h5py.ExternalLink):
            target = external_link_target(link.filename, holder)
            if not is_inside(target, roots):
                found.append(f"{holder}:/{name}: external link to {link.filename}:{link.path} leads outside the allowed roots")

    handle.visititems_links(visit)
    return found[0] if found else None


def dataset_outside(data: h5py.Dataset, holder: Path, roots: Sequence[Path]) -> str | None:
    """Whether a dataset's pixels come from elsewhere (virtual sources, external raw storage) outside `roots`."""
    if data.is_virtual:
        for source in data.virtual_sources():
            name = source.file_name
            if name == ".":
                continue
            target = Path(name) if Path(name).is_absolute() else holder.parent / name
            if not is_inside(target, roots):
                return f"{holder}:{data.name}: virtual dataset over {name}:{source.dset_name}, outside the allowed roots"
    plist = data.id.get_create_plist()
    for index in range(plist.get_external_count()):
        raw = plist.get_external(index)[0]
        name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        candidates = [Path(name)] if Path(name).is_absolute() else [holder.parent / name, Path.cwd() / name]
        if not all(is_inside(candidate, roots) for candidate in candidates):
            return f"{holder}:{data.name}: raw data stored in the external file {name}, outside the allowed roots"
    return None
