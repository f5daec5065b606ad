"""Messages between the daemon and its reader processes, over one private stream socket each.

A message is a JSON header and, for a frame, the frame's bytes: `<u32 header length><header>`
then, when the header has `nbytes`, that many raw bytes. Nothing is pickled; the socket is one
end of a `socketpair` the daemon made and handed to the reader it started, so no other process
can reach it. The receiver reads the pixels straight into the array it hands on (one copy in
the kernel, none in Python).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np

_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20  # a header names a scan and its metadata: far less; more is a broken peer
MAX_FRAME_BYTES = 1 << 30  # what one frame may take: `follow.max_frame_pixels` keeps real ones far below


class ChannelClosed(Exception):
    """The other end closed the socket (its process ended)."""


class ChannelBroken(Exception):
    """The other end sent something that is not a message of this protocol."""


def send(sock: socket.socket, header: dict[str, Any], data: np.ndarray | None = None) -> None:
    """Send one message; a frame's pixels go from its own buffer, uncopied."""
    if data is not None:
        data = np.ascontiguousarray(data)
        header = {**header, "dtype": data.dtype.str, "shape": list(data.shape), "nbytes": int(data.nbytes)}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(encoded)) + encoded)
    if data is not None and data.nbytes:
        sock.sendall(data.data.cast("B"))


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        received = sock.recv_into(view)
        if received == 0:
            raise ChannelClosed("the other end closed the channel")
        view = view[received:]


def receive(sock: socket.socket) -> tuple[dict[str, Any], np.ndarray | None]:
    """One message: its header and, for a frame, the frame. Blocks as the socket's timeout allows
    (`TimeoutError` once it passes with nothing arrived)."""
    length = bytearray(_LENGTH.size)
    _recv_exactly(sock, memoryview(length))
    (size,) = _LENGTH.unpack(length)
    if size > MAX_HEADER_BYTES:
        raise ChannelBroken(f"header of {size} bytes announced (at most {MAX_HEADER_BYTES})")
    raw = bytearray(size)
    _recv_exactly(sock, memoryview(raw))
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise ChannelBroken(f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ChannelBroken("header is not a JSON object")
    if "nbytes" not in header:
        return header, None
    try:
        dtype, shape, nbytes = np.dtype(header["dtype"]), tuple(int(n) for n in header["shape"]), int(header["nbytes"])
    except (KeyError, TypeError, ValueError) as error:
        raise ChannelBroken(f"frame header without a valid dtype and shape ({error})") from None
    if nbytes > MAX_FRAME_BYTES or nbytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or min(shape, default=1) < 0:
        raise ChannelBroken(f"frame of {nbytes} bytes does not match {header['dtype']} {list(shape)}")
    data = np.empty(shape, dtype=dtype)
    if nbytes:
        _recv_exactly(sock, data.data.cast("B"))
    return header, data
