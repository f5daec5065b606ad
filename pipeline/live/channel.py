"""Messages between the daemon and its reader processes, over one private stream socket each.

A message is a JSON header and, for frames, their bytes: `<u32 header length><header>` then, when
the header has `nbytes`, that many raw bytes (one frame, or several of one shape stacked: a reader
that is ahead of the daemon sends the frames it has ready together, one header for them all). Nothing is pickled; the socket is one
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
_MAX_GATHER = 64  # buffers per sendmsg (Linux takes up to IOV_MAX, 1024)
MAX_HEADER_BYTES = 1 << 20  # a header names a scan and its metadata: far less; more is a broken peer
MAX_FRAME_BYTES = 1 << 30  # what one message's pixels may take: `follow.max_frame_pixels` keeps real ones far below
# once a message has begun, the rest of it must arrive within this: a caller's short wait (to look at a stop flag) then
# never cuts a message in two, which would leave the stream mid-message
BODY_TIMEOUT_S = 30.0


class ChannelClosed(Exception):
    """The other end closed the socket (its process ended)."""


class ChannelBroken(Exception):
    """The other end sent something that is not a message of this protocol."""


def send(sock: socket.socket, header: dict[str, Any], data: np.ndarray | list[np.ndarray] | None = None) -> None:
    """Send one message; the pixels go from their own buffers, uncopied. `data` may be several frames of one shape and
    type: they arrive as one stacked array."""
    buffers: list[memoryview] = []
    if isinstance(data, list):
        arrays = [np.ascontiguousarray(frame) for frame in data]
        first = arrays[0]
        if any(a.shape != first.shape or a.dtype != first.dtype for a in arrays):
            raise ValueError("frames sent together must share one shape and type")
        header = {**header, "dtype": first.dtype.str, "shape": [len(arrays), *first.shape],
                  "nbytes": int(first.nbytes) * len(arrays)}
        buffers = [a.data.cast("B") for a in arrays if a.nbytes]
    elif data is not None:
        data = np.ascontiguousarray(data)
        header = {**header, "dtype": data.dtype.str, "shape": list(data.shape), "nbytes": int(data.nbytes)}
        if data.nbytes:
            buffers = [data.data.cast("B")]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    _send_all(sock, [memoryview(_LENGTH.pack(len(encoded)) + encoded), *buffers])


def _send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """Every buffer, in order, with as few system calls as the kernel allows (sendmsg gathers them; it may send part)."""
    while buffers:
        sent = sock.sendmsg(buffers[:_MAX_GATHER])
        while sent and buffers:
            if sent >= len(buffers[0]):
                sent -= len(buffers.pop(0))
            else:
                buffers[0] = buffers[0][sent:]
                sent = 0


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        received = sock.recv_into(view)
        if received == 0:
            raise ChannelClosed("the other end closed the channel")
        view = view[received:]


def receive(sock: socket.socket) -> tuple[dict[str, Any], np.ndarray | None]:
    """One message: its header and, for frames, their pixels. Blocks as the socket's timeout allows (`TimeoutError`
    once it passes with nothing of a message arrived: then nothing was consumed); the rest of a begun message is
    waited for up to BODY_TIMEOUT_S."""
    length = bytearray(_LENGTH.size)
    received = sock.recv_into(length)
    if received == 0:
        raise ChannelClosed("the other end closed the channel")
    waited = sock.gettimeout()
    if waited is None or waited >= BODY_TIMEOUT_S:  # a blocking socket (the reader's end) is left as it is
        return _rest_of_message(sock, length, received)
    sock.settimeout(BODY_TIMEOUT_S)
    try:
        return _rest_of_message(sock, length, received)
    finally:
        sock.settimeout(waited)


def _rest_of_message(sock: socket.socket, length: bytearray, received: int) -> tuple[dict[str, Any], np.ndarray | None]:
    _recv_exactly(sock, memoryview(length)[received:])
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
