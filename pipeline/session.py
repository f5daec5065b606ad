"""One scan's way through the daemon: follow the file, submit frames, and turn results into its store.

The session's own thread opens the scan, creates or resumes its store (replaying the 3D linker
over the frames already done) and then follows the file, submitting each complete frame. After
that, only the sink thread touches the store, through `accept` and `end`, so writes to one
store never race.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import Config
from pipeline.follow import ScanError, ScanFollower, ScanInfo
from pipeline.models.prediction import FramePrediction
from pipeline.sink import STATUS_COMPLETE, STATUS_INCOMPLETE, ScanStore, mark_failed, store_path_for
from pipeline.volume import VolumeLinker

log = logging.getLogger(__name__)

COMPLETE_ENDINGS = ("finished", "end_time")
FrameDoneHook = Callable[[str, int, dict[str, float]], None]  # (scan key, frame, timings): for benchmarks and metrics


def combined_mask(prediction: FramePrediction, source: str) -> np.ndarray:
    """The per-frame mask that feeds the 3D volume, as the config chooses."""
    tlm = prediction.tlm_labels > 0
    ssl = prediction.ssl_mask > 0
    return {"tlm": tlm, "sslm": ssl, "union": tlm | ssl}[source]


@dataclass
class SessionState:
    """What `pipeline status` shows about a scan."""

    frames_read: int = 0
    frames_done: int = 0
    status: str = "opening"
    reason: str = ""
    started: float = field(default_factory=time.time)


class ScanSession:
    def __init__(self, nexus_path: Path, config: Config, submit: Callable[..., bool], provenance: dict[str, Any],
                 post: Callable[[tuple], None], on_frame_done: "FrameDoneHook | None" = None) -> None:
        self.nexus_path = nexus_path
        self.key = str(nexus_path)
        self.config = config
        self.submit = submit
        self.provenance = provenance
        self.post = post  # hands an event to the sink thread
        self.on_frame_done = on_frame_done
        self.store_path = store_path_for(nexus_path, config.output.root)
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.state = SessionState()
        self.follower = ScanFollower(nexus_path, config.follow, self.stop)
        self.info: ScanInfo | None = None
        self.store: ScanStore | None = None
        self.linker = VolumeLinker()
        self.waiting: dict[int, tuple[np.ndarray, np.ndarray, float | None, dict[str, float]]] = {}
        self.submitted = 0
        self.received = 0
        self.max_index = -1
        self.failed_frames: list[int] = []
        self.end_reason: str | None = None
        self.last_tables = 0.0
        self.thread = threading.Thread(target=self._follow, name=f"scan-{nexus_path.stem}", daemon=True)

    # -- the session's thread ----------------------------------------------------------------

    def _follow(self) -> None:
        try:
            self.info = self.follower.open()
            start = self._open_store()
            self.state.status = "running"
            for frame in self.follower.frames(start=start):
                if not self.submit(self.key, frame.index, frame.data, context=(self, frame.axis_value), stop=self.stop):
                    break
                self.submitted += 1
                self.max_index = max(self.max_index, frame.index)
                self.state.frames_read = self.max_index + 1
            self.post(("end", self, self.follower.end_reason or "stopped"))
        except (ScanError, PermissionError, OSError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.post(("failed", self, message))
        except Exception as error:  # a bug must cost one scan, never the daemon or its drain
            log.exception("%s: unexpected error while following", self.nexus_path)
            self.post(("failed", self, f"{self.nexus_path}: internal error {type(error).__name__}: {error}"))
        finally:
            self.follower.close()

    def _open_store(self) -> int:
        """Create or resume the store; returns the first frame still to do."""
        attrs = {"config": self.config.model_dump(mode="json"), "models": self.provenance.get("models", {}),
                 "device": self.provenance.get("device", "")}
        self.store = ScanStore.create_or_resume(self.store_path, self.info, self.config.follow.frame_shape, attrs)
        start = self.store.done_prefix()
        if start:
            log.info("%s: resuming at frame %d", self.nexus_path.name, start)
            for index in range(start):  # rebuild the running peak sums from what is already done
                frame_data = self.follower.read_frame(index)
                axis = self.store.group["frames/axis"][index]
                self.linker.record(index, self.store.read_volume(index), frame_data, None if np.isnan(axis) else float(axis))
        self.state.frames_done = start
        self.max_index = start - 1
        return start

    # -- called by the sink thread ---------------------------------------------------------

    def accept(self, index: int, raw: np.ndarray, axis_value: float | None, prediction: FramePrediction | None,
               timings: dict[str, float] | None = None) -> None:
        """A worker's result for frame `index` (None: no worker could do it); `timings` travel to `on_frame_done`."""
        self.received += 1
        timings = dict(timings or {})
        write_started = time.perf_counter()
        if prediction is None:  # no worker could segment it: keep the place, leave it not done
            self.failed_frames.append(index)
            mask = np.zeros(raw.shape, dtype=bool)
        else:
            self.store.write_prediction(index, prediction)
            mask = combined_mask(prediction, self.config.volume.source)
        timings["write_s"] = time.perf_counter() - write_started
        self.waiting[index] = (mask, raw, axis_value, timings)
        self._link_ready()
        if time.monotonic() - self.last_tables >= self.config.output.refresh_tables_s:
            self._write_tables()
        if self.end_reason is not None:
            self._maybe_finish()

    def _link_ready(self, fill_gaps: bool = False) -> None:
        while True:
            index = self.linker.next_frame
            if index in self.waiting:
                mask, raw, axis, timings = self.waiting.pop(index)
                done = index not in self.failed_frames
            elif fill_gaps and index <= self.max_index:
                shape = self.config.follow.frame_shape
                mask, raw, axis, timings, done = np.zeros(shape, bool), np.zeros(shape), None, {}, False
            else:
                return
            started = time.perf_counter()
            labels = self.linker.link(index, mask, raw, axis)
            linked = time.perf_counter()
            self.store.write_volume(index, labels, axis, done=done)
            self.state.frames_done += done
            if done and self.on_frame_done is not None:
                timings.update(link_s=linked - started, write_s=timings.get("write_s", 0.0) + time.perf_counter() - linked, done_at=time.time())
                self.on_frame_done(self.key, index, timings)

    def _write_tables(self) -> None:
        self.store.write_tables(self.linker.table(), range(self.linker.next_frame))
        self.last_tables = time.monotonic()

    def end(self, reason: str) -> None:
        self.end_reason = reason
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.received < self.submitted or self.finished.is_set():
            return
        self._link_ready(fill_gaps=True)
        self._write_tables()
        frames_total = self.max_index + 1
        expected = self.info.expected_frames
        done = self.store.done_prefix()
        complete = self.end_reason in COMPLETE_ENDINGS and done == frames_total and (expected is None or frames_total == expected)
        status = STATUS_COMPLETE if complete else STATUS_INCOMPLETE
        self.store.finish(status, self.end_reason, frames_total, {"failed_frames": self.failed_frames})
        try:
            from pipeline.quicklook import write_quicklook  # matplotlib: imported only when a scan ends

            log.info("%s: quick look %s", self.nexus_path.name, write_quicklook(self.store_path))
        except Exception as error:  # a picture must never fail the scan
            log.warning("%s: no quick look (%s)", self.nexus_path.name, str(error).splitlines()[0])
        self.state.status, self.state.reason = status, self.end_reason
        log.info("%s: %s (%s), %d/%d frames done, %d peaks -> %s", self.nexus_path.name, status, self.end_reason, done,
                 frames_total, len(self.linker.peaks), self.store_path)
        self.finished.set()

    def fail(self, reason: str) -> None:
        log.error("%s", reason)
        if self.store is not None:
            mark_failed(self.store_path, reason)
        self.state.status, self.state.reason = "failed", reason
        self.finished.set()
