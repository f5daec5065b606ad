"""Child processes that end with the daemon, even when they are stuck where no Python runs.

A reader blocked inside HDF5 (h5py holds the interpreter lock through HDF5's retry sleeps) cannot
notice that its daemon was killed: no thread of it runs. Linux's parent-death signal needs no
Python in the child: the kernel sends SIGKILL when the parent goes. It is tied to the *thread*
that started the child, so children are started from one thread that lives as long as the
process (`spawn`), never from a scan's thread that may end first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-spawner")  # its one thread lives as long as the process


def spawn(arguments: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen(arguments, **popen), started from the long-lived spawner thread (see the module's docstring)."""
    return _SPAWNER.submit(lambda: subprocess.Popen(arguments, **popen)).result()


def die_with_parent(parent_pid: int) -> None:
    """Called first thing in a child: SIGKILL from the kernel when the parent ends; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the signal was asked for
        os._exit(1)
