"""A slow sink never stalls the dispatcher: the daemon stops sending frames, not reading messages.

Before, results went to the sink through a bounded queue whose `put` blocked the dispatch thread
once the sink fell 256 results behind (resuming many scans after a restart, a slow disk): the
dispatcher then read nothing, neither heartbeats nor strangers' messages (a soak run counted 25 of
144 hostile messages to a daemon busy resuming scans). Here a real daemon with a real worker
process gets a sink slowed on purpose (a frame-done hook that sleeps: hooks run on the sink
thread) while a scan's frames arrive much faster than it writes them.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from pipeline.config import load_config
from pipeline.live.daemon import Daemon
from pipeline.live.sink import SINK_BACKLOG
from pipeline.store import open_live
from pipeline.testing.configs import write_config
from pipeline.testing.files import nexus_file
from pipeline.testing.fuzz import fuzzed_messages

pytestmark = pytest.mark.daemon

SINK_SECONDS_PER_FRAME = 0.15
N_FRAMES = 120


def test_a_slow_sink_holds_frames_back_while_the_dispatcher_keeps_reading(tmp_path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    path = write_config(tmp_path / "config.yaml", None, models={"tlm": {"enabled": False}, "sslm": {"enabled": False}},
                        workers={"credit": 8})
    config = load_config(path).with_overrides({"watch.dirs": [str(scans)]})

    def slow_sink(scan: str, index: int, timings: dict) -> None:
        time.sleep(SINK_SECONDS_PER_FRAME)

    daemon = Daemon(config, on_frame_done=slow_sink).start()
    backlog: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            backlog.append(daemon.sink.events.qsize())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    attacker = zmq.Context.instance().socket(zmq.DEALER)
    try:
        deadline = time.monotonic() + 120
        while not daemon.dispatcher.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.dispatcher.workers, "the worker never joined"
        sampler.start()
        frames = np.random.default_rng(0).poisson(3.0, (N_FRAMES, 195, 487)).astype(np.int32)
        nexus = nexus_file(scans / "fast.nxs", frames)
        store = nexus.with_suffix(".zarr")
        while daemon.sink.events.qsize() < SINK_BACKLOG // 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.sink.events.qsize() >= SINK_BACKLOG // 2, "the sink never fell behind"

        # the sink is behind: strangers' messages are still read and rejected at once
        rejected_before = daemon.dispatcher.counters["rejected"]
        messages = fuzzed_messages(np.random.default_rng(7), 300)
        attacker.setsockopt(zmq.LINGER, 5000)
        attacker.connect(daemon.dispatcher.endpoint)
        for parts in messages:
            attacker.send_multipart(parts)
        sent_at = time.monotonic()
        while daemon.dispatcher.counters["rejected"] - rejected_before < len(messages) and time.monotonic() - sent_at < 10:
            time.sleep(0.05)
        rejected = daemon.dispatcher.counters["rejected"] - rejected_before
        rejected_within_s = time.monotonic() - sent_at
        done_then = int(open_live(store)["frames/done"][:].sum())
        assert rejected == len(messages), f"{rejected} of {len(messages)} rejected while the sink was behind"
        assert done_then < N_FRAMES, "the sink caught up before the check: slow it down"

        while time.monotonic() < deadline:
            try:
                if open_live(store).attrs.get("status") == "complete":
                    break
            except Exception:
                pass
            time.sleep(0.2)
    finally:
        sampling.set()
        attacker.close(linger=0)
        daemon.shutdown(drain=True, timeout=60)
    group = open_live(store)
    assert group.attrs["status"] == "complete" and group["frames/done"][:].tolist() == [1] * N_FRAMES
    in_flight_bound = config.workers.credit * config.workers.local
    print(f"sink backlog: max {max(backlog)} events (bound {SINK_BACKLOG} + {in_flight_bound} in flight); "
          f"{rejected} hostile messages rejected within {rejected_within_s:.1f} s while the sink was {N_FRAMES - done_then} "
          f"frames behind")
    assert max(backlog) <= SINK_BACKLOG + in_flight_bound
    assert daemon.dispatcher.counters["workers_lost"] == 0 and daemon.dispatcher.counters["redispatched"] == 0
