"""Pixels come only from files under the roots the config allows: the watched directories and
`follow.allowed_roots` (for `pipeline process` without watched directories, the scan's own directory).

An HDF5 file can make its reader open other files: an external link (absolute, or relative with
`../`), a virtual dataset over another file's data, or raw storage in an external flat file (even
`/etc/passwd`). The daemon runs under an account that can read every visit's data, so each of them
is checked before a frame is read, and anything that leads outside the roots fails the scan with
one line naming the link and where it leads.

HDF5 looks for the file a link or a virtual source names in several places (`hdf5_search`): beside
the file that names it, under prefixes from the environment, and last in the process's working
directory, where an absolute name that does not exist is tried by its bare name too. Each check
follows that order, and the reader processes work in a removed folder (`leave_working_directory`),
so the last place holds nothing now and nothing later.

Only regular files are opened: a FIFO (or a device) behind a scan file, an external link, a virtual
dataset's source or external raw storage would block its reader for ever. And the walk over a
file's links is bounded in count and depth, so a crafted file cannot hold its reader for minutes.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py

from pipeline.common.file_names import shown


class NotRegular(OSError):
    """A path that names something other than a regular file (a FIFO, a device, a directory, a socket)."""


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def read_head(path: Path | str, size: int) -> tuple[bytes, int]:
    """The first `size` bytes of a regular file and its size. Opened with O_NONBLOCK and checked with fstat before
    any read, so a FIFO answers NotRegular at once instead of blocking (a plain open() of a FIFO waits for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegular(f"{path}: {_kind(status.st_mode)}, not a regular file; only regular files are read")
        return os.pread(fd, size, 0), status.st_size
    finally:
        os.close(fd)


def not_regular(path: Path | str) -> str | None:
    """Why an existing `path` must not be opened (it is not a regular file), or None (a regular file, or nothing
    there yet). `stat` never blocks, unlike an open."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"{path}: {_kind(mode)}, not a regular file; only regular files are read"


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


_PREFIX_VARIABLES = {"link": "HDF5_EXT_PREFIX", "virtual": "HDF5_VDS_PREFIX"}


def hdf5_search(name: str, holder: Path, kind: str) -> list[Path]:
    """Where HDF5 looks for the file an external link (`kind` "link") or a virtual dataset's source ("virtual") names,
    in its order (H5F_prefix_open_file): an absolute name as it is; then, for a relative name or by the bare name of an
    absolute one that is not there, under each prefix in HDF5_EXT_PREFIX / HDF5_VDS_PREFIX, beside `holder` (the file
    that names it), and in the working directory. HDF5 opens the first file it can."""
    path = Path(name)
    places = []
    if path.is_absolute():
        places.append(path)
        path = Path(path.name)
    for prefix in filter(None, os.environ.get(_PREFIX_VARIABLES[kind], "").split(":")):
        places.append(Path(prefix.replace("${ORIGIN}", str(holder.parent))) / path)
    places.append(holder.parent / path)
    try:
        places.append(Path(os.getcwd()) / path)
    except OSError:  # a removed working directory (leave_working_directory): nothing can be found there
        pass
    return places


def _found_outside(name: str, holder: Path, roots: Sequence[Path], kind: str) -> str | None:
    """Why the file HDF5 would open for `name` must not be read (outside `roots`, or not a regular file), or None (inside,
    or nothing anywhere HDF5 looks, yet). A directory is passed over, as HDF5 fails to open it and looks on."""
    for place in hdf5_search(name, holder, kind):
        try:
            mode = os.stat(place).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            return f"{_kind(mode)} at {place}, not a regular file; only regular files are read"
        if not is_inside(place, roots):
            return f"found as {place}, outside the allowed roots"
        return None
    return None


def leave_working_directory() -> None:
    """Work in a folder that is then removed. HDF5 looks for a link's file in the working directory last; a reader started
    where an operator stood (another visit's folder) or by systemd would read what lies there. A removed folder holds
    nothing, and nobody can put anything in it later."""
    folder = tempfile.mkdtemp(prefix="pipeline-nowhere-")
    os.chdir(folder)
    os.rmdir(folder)


def links_outside(handle: h5py.File, holder: Path, roots: Sequence[Path], max_links: int = 20_000,
                  max_depth: int = 32, alive: Callable[[], None] | None = None) -> str | None:
    """The first external link in `handle` whose file lies outside `roots` or is not a regular file, or the limit a
    file with more than `max_links` links or groups nested deeper than `max_depth` passes, as one line; else None."""
    found: list[str] = []
    seen = 0

    links = handle.id.links

    def visit(raw: bytes, info: h5py.h5l.LinkInfo) -> bool | None:  # the low-level walk: h5py's own fails on names not UTF-8
        nonlocal seen
        seen += 1
        if alive is not None and seen % 1000 == 0:
            alive()  # a long walk is progress, not a blocked reader
        parent, _, leaf = raw.rpartition(b"/")
        if seen > max_links:
            found.append(f"{holder}: more than {max_links:,} links (follow.max_links); refused unread")
        elif raw.count(b"/") + 1 > max_depth:
            found.append(f"{holder}:/{shown(raw.decode(errors='replace'))}: groups nested deeper than {max_depth} "
                         "(follow.max_group_depth); refused unread")
        elif not _is_utf8(raw):
            where = shown(parent.decode(errors="replace")) or "the root group"
            found.append(f"{holder}: {where} holds a name that is not UTF-8 ({leaf!r}); refused")
        elif info.type == h5py.h5l.TYPE_EXTERNAL:
            name = raw.decode()
            filename, path = (part.decode(errors="replace") for part in links.get_val(raw))
            target = external_link_target(filename, holder)  # where the follower itself looks for a detector file
            if not is_inside(target, roots):
                found.append(f"{holder}:/{name}: external link to {filename}:{path} leads outside the allowed roots")
            elif (why := not_regular(target)) is not None:
                found.append(f"{holder}:/{name}: external link to {filename}: {why.split(': ', 1)[1]}")
            elif (why := _found_outside(filename, holder, roots, "link")) is not None:  # where HDF5 looks
                found.append(f"{holder}:/{name}: external link to {filename}:{path}: {why}")
        return True if found else None  # anything but None ends HDF5's walk at once

    links.visit(visit, info=True)
    return found[0] if found else None


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
            if (why := not_regular(target)) is not None:
                return f"{holder}:{data.name}: virtual dataset over {name}: {why.split(': ', 1)[1]}"
            if (why := _found_outside(name, holder, roots, "virtual")) is not None:
                return f"{holder}:{data.name}: virtual dataset over {name}:{source.dset_name}: {why}"
    plist = data.id.get_create_plist()
    for index in range(plist.get_external_count()):
        raw = plist.get_external(index)[0]
        name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        candidates = [Path(name)] if Path(name).is_absolute() else [holder.parent / name, Path.cwd() / name]
        if not all(is_inside(candidate, roots) for candidate in candidates):
            return f"{holder}:{data.name}: raw data stored in the external file {name}, outside the allowed roots"
        for candidate in candidates:
            if (why := not_regular(candidate)) is not None:
                return f"{holder}:{data.name}: raw data stored in the external file {name}: {why.split(': ', 1)[1]}"
    return None
