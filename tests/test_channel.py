"""The daemon <-> reader channel: several frames in one message, and a short wait never cuts a message in two."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from pipeline.live import channel


def test_frames_sent_together_arrive_as_one_stacked_array() -> None:
    ours, theirs = socket.socketpair()
    frames = [np.full((195, 487), value, dtype=np.int32) for value in range(5)]
    with ours, theirs:
        sender = threading.Thread(target=channel.send, args=(theirs, {"type": "frames", "frames": [0, 1, 2, 3, 4]}, frames))
        sender.start()  # 1.9 MB: more than a socket buffer, so sendmsg sends it in parts
        header, data = channel.receive(ours)
        sender.join()
    assert header["type"] == "frames" and header["shape"] == [5, 195, 487]
    assert data is not None and data.shape == (5, 195, 487) and data.dtype == np.int32
    assert [int(frame[100, 200]) for frame in data] == [0, 1, 2, 3, 4]
    assert all(np.array_equal(a, b) for a, b in zip(frames, data))


def test_frames_of_different_shapes_are_refused_before_anything_is_sent() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(ValueError, match="one shape and type"):
            channel.send(theirs, {"type": "frames"}, [np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32)])
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(1)  # nothing half-sent


def test_a_short_wait_that_ends_mid_message_does_not_cut_it() -> None:
    """The daemon waits in slices of 0.2 s (to look at a stop flag); a message whose pixels come later than that
    must still arrive whole, and the next one after it (it used to leave the stream mid-message)."""
    ours, theirs = socket.socketpair()
    frame = np.arange(195 * 487, dtype=np.int32).reshape(195, 487)
    header = b'{"type":"frame","index":7,"dtype":"<i4","shape":[195,487],"nbytes":%d}' % frame.nbytes

    def slow_writer() -> None:
        theirs.sendall(channel._LENGTH.pack(len(header)) + header)
        time.sleep(0.6)  # three of the reader's waits
        theirs.sendall(frame.tobytes())
        channel.send(theirs, {"type": "end"})

    with ours, theirs:
        writer = threading.Thread(target=slow_writer)
        writer.start()
        ours.settimeout(0.2)
        got, data = channel.receive(ours)
        assert got["index"] == 7 and data is not None and np.array_equal(data, frame)
        assert ours.gettimeout() == 0.2  # the caller's wait is given back
        assert channel.receive(ours)[0] == {"type": "end"}
        writer.join()


def test_a_wait_with_nothing_arrived_times_out_having_consumed_nothing() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(0.1)
        with pytest.raises(TimeoutError):
            channel.receive(ours)
        channel.send(theirs, {"type": "alive"})
        assert channel.receive(ours) == ({"type": "alive"}, None)
