"""Shortages that stop a scan without failing it: a full disk, no file descriptors left.

Neither says anything about the scan: a scan stopped by one keeps what its store holds and is
started again, resuming, once the shortage has passed (the daemon looks every few seconds).
Before, a full disk left the store saying `running` for ever, and a scan that met EMFILE (400
idle connections under a 300-descriptor limit) failed for good, unrecorded.
"""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

from pipeline.errors import SPACE

SPARE_DESCRIPTORS = 64  # free below the limit before a scan stopped for descriptors is tried again


def waiting_status(wanting: str) -> str:
    """What `pipeline status` shows for a scan stopped by a shortage (not a store status)."""
    return f"waiting for {wanting}"


def free_space(path: Path) -> int:
    """Bytes free on the file system where `path` is (or would be made)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def spare_descriptors() -> int:
    """File descriptors this process may still open before its limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc, or no descriptor left even to list it
        return 0
    return (soft if soft != resource.RLIM_INFINITY else 1 << 20) - in_use


def has_passed(wanting: str, store_path: Path, resume_free_mib: float) -> bool:
    """True once a scan stopped for want of `wanting` may be tried again."""
    if wanting == SPACE:
        return free_space(store_path) >= resume_free_mib * 2**20
    return spare_descriptors() >= SPARE_DESCRIPTORS


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (the daemon holds a socket per peer and
    files per scan; a shell's default of 1,024 is soon reached); returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft
    return soft, hard
