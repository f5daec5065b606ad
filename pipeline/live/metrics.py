"""An optional Prometheus endpoint, so facility monitoring can scrape the daemon.

Counters and the latency histogram are fed by the daemon's frame-done hook; the gauges (queue,
workers, scans) are read from `Daemon.status()` at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from pipeline.live.timings import FrameTimings

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300)


class _StatusCollector:
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        dispatch = status["dispatch"]
        yield GaugeMetricFamily("pipeline_queue_frames", "Frames read and waiting for a worker", value=dispatch["queued"])
        yield GaugeMetricFamily("pipeline_in_flight_frames", "Frames held by workers", value=dispatch["in_flight"])
        yield GaugeMetricFamily("pipeline_workers", "Workers connected", value=len(dispatch["workers"]))
        scans = GaugeMetricFamily("pipeline_scans", "Scans by status", labels=["status"])
        counts: dict[str, int] = {}
        for scan in status["scans"]:
            counts[scan["status"]] = counts.get(scan["status"], 0) + 1
        for name, count in sorted(counts.items()):
            scans.add_metric([name], count)
        yield scans
        for key, help_text in (("rejected", "Messages rejected as malformed, replayed or unauthorised"),
                               ("redispatched", "Frames sent again after their worker was lost"),
                               ("workers_lost", "Workers dropped after going silent")):
            yield GaugeMetricFamily(f"pipeline_{key}_total", help_text, value=dispatch[key])


class Metrics:
    """Owns its own registry, so several daemons in one process (tests) do not collide."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.frames = Counter("pipeline_frames_done", "Frames whose outputs are all written", registry=self.registry)
        self.latency = Histogram("pipeline_frame_latency_seconds", "From a frame being read to its frames/done",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StatusCollector(status))
        self.server: WSGIServer | None = None

    def frame_done(self, _scan: str, _index: int, timings: FrameTimings) -> None:
        self.frames.inc()
        if timings.done_at is not None:
            self.latency.observe(max(0.0, timings.done_at - timings.queued_at))

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint; returns the port (useful when 0 asked for any free one)."""
        self.server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return int(self.server.server_port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
