"""ZeroMQ endpoints as a user writes them (`tcp://HOST:PORT`, `ipc://PATH`), checked before ZeroMQ sees them.

ZeroMQ takes `tcp://127.0.0.1:99999` and binds port 99999 modulo 65536 (34463) without a word, and
answers the rest of the mistakes (`foo`, a pasted `http://` address, a missing port) with bare
errors that surface as tracebacks. So every endpoint a user gives, in the config or on the command
line, is read here first and a bad one is one line saying what is wrong with it.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_SOCKET_PATH_BYTES = 107  # Linux's sun_path holds 108 bytes with the closing NUL


def check_endpoint(endpoint: str) -> str:
    """`endpoint` unchanged when ZeroMQ will take it as the user meant; ValueError (one line, without the endpoint:
    the caller names it) when not."""
    transport, separator, address = endpoint.partition("://")
    if not separator or transport not in ("tcp", "ipc"):
        raise ValueError("not a ZeroMQ endpoint: write tcp://HOST:PORT or ipc://PATH")
    if transport == "ipc":
        if not address:
            raise ValueError("no socket file path after ipc://")
        if not address.startswith("@") and len(os.fsencode(os.path.expanduser(address))) > MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"a socket file path longer than Linux allows ({MAX_SOCKET_PATH_BYTES} bytes); "
                             "choose a shorter one")
        return endpoint
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise ValueError("no HOST:PORT after tcp://; write e.g. tcp://127.0.0.1:5555")
    if port != "*" and not (port.isdigit() and int(port) <= 65535):
        raise ValueError(f"the port must be 0-65535 (or * for any free one), not {port!r}")
    return endpoint


def resolve_socket_path(endpoint: str, base: Path) -> str:
    """`ipc://PATH` with a relative PATH made absolute against `base` (the config file's folder, or the working
    directory for the command line), so that the daemon and `pipeline status` mean the same file wherever they
    were started; any other endpoint unchanged."""
    if not endpoint.startswith("ipc://"):
        return endpoint
    path = endpoint.removeprefix("ipc://")
    if path.startswith(("@", "~", "/")):
        return endpoint
    return f"ipc://{(base / path).resolve()}"
