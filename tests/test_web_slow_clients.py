"""Peers that open connections and never finish a request cannot hold the web view's sockets.

A slow-loris run held 1,000 sockets of the web view for 20 s and more: uvicorn waits for a request's
headers for as long as the peer likes. Here a real `pipeline web` process on 127.0.0.1 gets 220
connections: half send nothing, half send a request's headers a byte at a time and never end them.
The server must close every one of them within a few seconds (web.server.HEADER_TIMEOUT_S), while a
normal request made in the middle of the attack is answered at once. Only the loopback address is
used, and every loop here is bounded in time.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from pathlib import Path

from pipeline.testing.truth_stores import TruthStoreWriter
from pipeline.testing.web import get, web_process
from pipeline.web.server import HEADER_TIMEOUT_S

SILENT = 110
DRIBBLERS = 110
DRIBBLE_S = 0.5  # a dribbler sends one byte this often: never idle long enough for an idle timeout
REQUEST = b"GET /api/scans HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\nAccept: */*\r\nX-Pad: " + b"a" * 200 + b"\r\n"
CLOSE_WITHIN_S = HEADER_TIMEOUT_S + 4.0  # the timeout, plus the time to open and walk 220 sockets on a loaded machine
ATTACK_S = 30.0  # the whole test gives up after this


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF, a reset, or its 408 answer and then EOF)."""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_and_silent_peers_are_cut_off_while_a_normal_request_answers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    store = TruthStoreWriter(root, "scan", 3, seed=3, n_peaks=1)
    store.write(3)
    store.finish()
    with web_process([root], tmp_path / "web.log") as web:
        opened: dict[socket.socket, float] = {}
        dribblers: dict[socket.socket, int] = {}  # socket -> bytes sent so far
        closed_after: list[float] = []
        try:
            for index in range(SILENT + DRIBBLERS):
                sock = socket.create_connection(("127.0.0.1", web.port), timeout=5)
                sock.setblocking(False)
                opened[sock] = time.monotonic()
                if index % 2:
                    dribblers[sock] = 0
            started = time.monotonic()
            normal_answered_in: float | None = None
            next_dribble = started
            while opened and time.monotonic() - started < ATTACK_S:
                now = time.monotonic()
                if now >= next_dribble:
                    for sock in [s for s in dribblers if s in opened]:
                        try:
                            sock.send(REQUEST[dribblers[sock] % len(REQUEST):][:1])
                            dribblers[sock] += 1
                        except BlockingIOError:
                            pass
                        except OSError as error:  # the server closed it
                            assert error.errno in (errno.EPIPE, errno.ECONNRESET), error
                    next_dribble = now + DRIBBLE_S
                if normal_answered_in is None and now - started > 1.0:  # in the middle of the attack
                    asked = time.monotonic()
                    answer = get(web.url("/api/scans"), timeout=10)
                    normal_answered_in = time.monotonic() - asked
                    assert answer.status == 200 and answer.json()["scans"][0]["id"] == "scan"
                readable, _, _ = select.select(list(opened), [], [], 0.1)
                for sock in readable:
                    if _closed_by_peer(sock):
                        closed_after.append(time.monotonic() - opened.pop(sock))
                        sock.close()
            assert normal_answered_in is not None and normal_answered_in < 3.0, normal_answered_in
            assert not opened, f"{len(opened)} of {SILENT + DRIBBLERS} slow connections still open after {ATTACK_S:.0f} s"
            print(f"slow connections closed after {min(closed_after):.1f} to {max(closed_after):.1f} s; "
                  f"a normal request answered in {normal_answered_in * 1000:.0f} ms during the attack")
            assert max(closed_after) < CLOSE_WITHIN_S, max(closed_after)
            assert min(closed_after) > HEADER_TIMEOUT_S - 1.0, min(closed_after)  # cut off by the header timeout, not at once
        finally:
            for sock in opened:
                sock.close()
        assert get(web.url("/api/scans")).status == 200  # and the server is still there
