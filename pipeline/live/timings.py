"""When a frame passed each point of the daemon and what each stage cost: one typed record per frame.

It is filled along the way (dispatcher: queued and sent; sink: received, linked, written, done)
and handed to the frame-done hooks (metrics, the audit log, `pipeline bench`). The worker's own
stage seconds arrive as a plain mapping on the wire and are kept as they came.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FrameTimings:
    """Wall-clock times (`time.time()`, comparable across processes) and stage durations (seconds) of one frame."""

    queued_at: float  # read from the file and queued for a worker
    sent_at: float  # sent to the worker that answered
    received_at: float  # its result reached the sink
    done_at: float | None = None  # its frames/done flag was written
    worker: dict[str, float] = field(default_factory=dict)  # the worker's stages: preprocess, tlm, sslm, worker_total
    link_s: float = 0.0  # 3D linking
    write_s: float = 0.0  # writing its outputs to the store
    made_by: str | None = None  # the worker whose result was written (its name, as it said hello)
    made_on: str | None = None  # the device that worker said it runs on ("cpu", "cuda:0")

    def as_dict(self) -> dict[str, float]:
        """One flat mapping (the worker's stages beside the daemon's), as the benchmark's JSON keeps it."""
        flat = {"queued_at": self.queued_at, "sent_at": self.sent_at, "received_at": self.received_at, **self.worker,
                "link_s": self.link_s, "write_s": self.write_s}
        if self.done_at is not None:
            flat["done_at"] = self.done_at
        return flat
