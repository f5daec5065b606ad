"""One scan's way through the daemon: follow the file, submit frames, and turn results into its store.

The session's own thread opens the scan, creates or resumes its store (replaying the 3D linker
over the frames already done) and then follows the file, submitting each complete frame. After
that, only the sink thread touches the store, through `accept_many` and `end`, so writes to one
store never race.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common.nexus import ScanInfo
from pipeline.common.volume import VolumeLinker
from pipeline.config import Config
from pipeline.errors import one_line, shortage_of
from pipeline.live import wire
from pipeline.live.events import FrameContext, ScanEnded, ScanFailed, ScanStalled, SinkEvent
from pipeline.live.follow import NotADetectorScan, ScanError
from pipeline.live.painter import picture_missing
from pipeline.live.readers import ReaderPool, RemoteScan, Shortage
from pipeline.live.shortage import SPACE, waiting_status
from pipeline.live.timings import FrameTimings
from pipeline.models.prediction import FramePrediction
from pipeline.store import schema
from pipeline.store.location import stat_identity, store_made_from, store_path_for
from pipeline.store.reader import store_status
from pipeline.store.writer import ScanStore, StoreRefused, mark_failed

log = logging.getLogger(__name__)

COMPLETE_ENDINGS = ("finished", "end_time")
FrameDoneHook = Callable[[str, int, FrameTimings], None]  # (scan key, frame, timings): for benchmarks and metrics


BAD_FRAME_WORDS = {"nan": "with NaN pixels", "inf": "with infinite pixels", "all_zero": "all zero"}


def _frame_list(frames: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in frames[:limit])
    return shown + (f", ... {len(frames) - limit} more" if len(frames) > limit else "")


def _why_not_writable(store: Path, error: OSError) -> str:
    """The reason a store could not be made, in words: the path in the way, or the system's message."""
    for parent in [store, *store.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            break
    detail = error.strerror or one_line(error)
    return f"{detail}: {error.filename}" if getattr(error, "filename", None) else detail


def combined_mask(prediction: FramePrediction, source: str) -> np.ndarray:
    """The per-frame mask that feeds the 3D volume, as the config chooses."""
    tlm = prediction.tlm_labels > 0
    ssl = prediction.ssl_mask > 0
    return {"tlm": tlm, "sslm": ssl, "union": tlm | ssl}[source]


@dataclass
class FrameOutcome:
    """What the sink hands a session for one frame: the worker's prediction, or None when every worker failed on it."""

    index: int
    raw: np.ndarray
    axis_value: float | None
    prediction: FramePrediction | None
    timings: FrameTimings


@dataclass
class SessionState:
    """What `pipeline status` shows about a scan."""

    frames_read: int = 0
    frames_done: int = 0
    status: str = "opening"
    reason: str = ""
    started: float = field(default_factory=time.time)
    done_before: int = 0  # frames an earlier run had done (the resume point): not this run's work
    ended: float | None = None  # once the session has ended: its rate stops there, not falling for ever after

    def frames_per_second(self, now: float) -> float:
        """This run's rate: frames it did over the time it has run (until it ended)."""
        return max(0, self.frames_done - self.done_before) / max((self.ended or now) - self.started, 1e-6)


class ScanSession:
    def __init__(self, nexus_path: Path, config: Config, submit: Callable[..., bool], provenance: dict[str, Any],
                 post: Callable[[SinkEvent], None], on_frame_done: FrameDoneHook | None = None,
                 paint: Callable[[Path], None] | None = None, resumed_after: str | None = None,
                 readers: ReaderPool | None = None, store_path: Path | None = None) -> None:
        self.nexus_path = nexus_path
        self.resumed_after = resumed_after  # why the last session of this scan stopped (a full disk, no descriptors), if it did
        self.stalled: tuple[str, str] | None = None  # (wanting, reason) once a shortage stopped it: the daemon retries the scan
        self.key = str(nexus_path)
        self.config = config
        self.submit = submit
        self.provenance = provenance
        self.post = post  # hands an event to the sink thread
        self.on_frame_done = on_frame_done
        self.paint = paint  # takes a finished store whose quick-look picture is to be drawn
        self.store_path = store_path or store_path_for(nexus_path, config.output.root, config.watch.dirs)  # given: a follow request's root
        self.store_unusable = False  # no store can be made there: the failure is only logged
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.state = SessionState()
        roots = [*config.watch.dirs, *config.follow.allowed_roots, Path(nexus_path).parent]  # the scan's own directory: chosen by whoever put it there
        assert readers is not None, "a session reads its scan through the daemon's reader processes"
        self.follower = RemoteScan(readers, nexus_path, config.follow, roots, self.stop)
        self.info: ScanInfo | None = None
        self.store: ScanStore | None = None
        self.linker = VolumeLinker(self.config.volume.min_pixels)
        self.waiting: dict[int, tuple[np.ndarray, np.ndarray, float | None, FrameTimings]] = {}
        self.submitted = 0
        self.received = 0
        self.max_index = -1
        self.failed_frames: list[int] = []
        self.devices: set[str] = set()  # what the workers that made this run's frames said they run on
        self.bad_frames: dict[str, list[int]] = {}  # "nan", "inf", "all_zero" -> frames (processed anyway)
        self.lost_frames: list[int] = []  # frames a truncation of the file cut out: never processed, the scan incomplete
        self.not_a_scan: list[int] | None = None  # the file's inode, size and mtime once found to hold no detector frames
        self.capped_frames: list[int] = []  # frames whose TLM hit its detection cap (crowded): warned once, listed in the store
        self.detection_cap = 0
        self.end_reason: str | None = None
        self.last_tables = 0.0
        self.thread = threading.Thread(target=self._follow, name=f"scan-{nexus_path.stem}", daemon=True)

    # -- the session's thread ----------------------------------------------------------------

    def _follow(self) -> None:
        try:
            self.info = self.follower.open()
            if self._already_final():
                return
            self._open_store()
            self.state.status = "running"
            for frame in self.follower.frames():
                if frame.problem == "lost":
                    self.lost_frames.append(frame.index)
                    self.max_index = max(self.max_index, frame.index)
                    continue
                if frame.problem is not None:
                    self.bad_frames.setdefault(frame.problem, []).append(frame.index)
                if not self.submit(self.key, frame.index, wire.carried(frame.data), context=FrameContext(self, frame.axis_value),
                                   stop=self.stop):
                    break
                self.submitted += 1
                self.max_index = max(self.max_index, frame.index)
                self.state.frames_read = self.max_index + 1
            self.post(ScanEnded(self, self.follower.end_reason or "stopped"))
        except Shortage as error:
            self.post(ScanStalled(self, f"{self.nexus_path}: stopped for want of {error.wanting} ({error})", error.wanting))
        except OSError as error:
            wanting = shortage_of(error)
            if wanting is None:
                self.post(ScanFailed(self, one_line(error)))
            else:  # the file may be fine: try again when the shortage has passed
                self.post(ScanStalled(self, f"{self.nexus_path}: stopped for want of {wanting} ({one_line(error)})", wanting))
        except NotADetectorScan as error:
            log.info("%s; not a detector scan: skipped, no store made", error)
            self.not_a_scan = stat_identity(self.nexus_path)
            self.state.status, self.state.reason = "skipped", f"not a detector scan ({error})"
            self._end()
        except (ScanError, PermissionError, ValueError) as error:
            if self.stop.is_set() and self.store is None:  # stopped before anything was written: nothing to record
                log.info("%s: stopped before its store was opened", self.nexus_path.name)
                self.state.status, self.state.reason = "stopped", "stopped before the scan was opened"
                self._end()
            else:
                self.post(ScanFailed(self, one_line(error)))
        except Exception as error:  # a bug must cost one scan, never the daemon or its drain
            log.exception("%s: unexpected error while following", self.nexus_path)
            self.post(ScanFailed(self, f"{self.nexus_path}: internal error {type(error).__name__}: {error}"))
        finally:
            self.follower.close()

    def _already_final(self) -> bool:
        """Whether this very file already has a complete or failed store (the daemon could not tell without reading the
        file, which only a reader does): then nothing is written and the scan is listed as it was."""
        status = store_status(self.store_path, follow_symlinks=False)
        if status not in (schema.STATUS_COMPLETE, schema.STATUS_FAILED):
            return False
        info = self._info
        if not store_made_from(self.store_path, self.nexus_path, {"start_time": info.start_time, "scan_command": info.scan_command}):
            return False
        log.debug("%s: store already %s; skipped", self.nexus_path.name, status)
        if self.paint is not None and picture_missing(self.store_path, status):
            log.info("%s: store complete but its quick look was never drawn: drawing it", self.nexus_path.name)
            self.paint(self.store_path)
        self.follower.leave()
        self.state.status, self.state.reason = status, "already processed"
        self._end()
        return True

    def _open_store(self) -> int:
        """Create or resume the store; returns the first frame still to do."""
        attrs = {"config": self.config.model_dump(mode="json"), "models": self.provenance.get("models", {}),
                 "device": self.provenance.get("device", "")}
        try:
            self.store = ScanStore.create_or_resume(self.store_path, self._info, self._info.frame_shape, attrs,
                                                    fsync=self.config.output.fsync)
            if self.resumed_after is not None:
                if SPACE in self.resumed_after:
                    self.store.record_resumed_after_disk_full(self.resumed_after)
                log.info("%s: resuming after a shortage (%s)", self.nexus_path.name, self.resumed_after)
        except OSError as error:
            if shortage_of(error) is not None:
                raise  # not the store's fault: the scan stalls and is tried again
            self.store_unusable = True
            raise ScanError(f"{self.nexus_path}: cannot create its store {self.store_path} ({_why_not_writable(self.store_path, error)})") from None
        except StoreRefused as error:
            self.store_unusable = True
            raise ScanError(f"{self.nexus_path}: {error}") from None
        start = self.store.done_prefix()
        previous = self.store.recorded_bad_frames()
        for problem, frames in previous.items():  # bad frames before the resume point, as the last run found them
            kept = [int(i) for i in frames if int(i) < start]
            if kept:
                self.bad_frames[problem] = kept
        self.follower.begin(start, replay=start)
        if start:
            log.info("%s: resuming at frame %d", self.nexus_path.name, start)
        for index, raw in self.follower.replayed():  # rebuild the running peak sums from what is already done
            self.linker.record(index, self.store.read_volume(index), wire.carried(raw), self.store.read_axis_value(index))
        self.state.frames_done = self.state.done_before = start
        self.last_tables = time.monotonic()  # the first rewrite of the tables after refresh_tables_s, not with the first frame
        self.max_index = start - 1
        return start

    # -- called by the sink thread ---------------------------------------------------------

    @property
    def _store(self) -> ScanStore:
        """The open store: the sink calls in only between the session opening it and finishing."""
        assert self.store is not None, f"{self.nexus_path}: store used after the scan finished"
        return self.store

    @property
    def _info(self) -> ScanInfo:
        assert self.info is not None, f"{self.nexus_path}: scan not opened yet"
        return self.info

    def _devices_used(self) -> dict[str, str]:
        """The store's `device` as the frames were really made (workers on SLURM or Kubernetes GPUs under a daemon whose
        own `workers.device` is `cpu` or `auto`): replaces the configured one it had while the scan ran."""
        return {schema.Attr.DEVICE: ", ".join(sorted(self.devices))} if self.devices else {}

    def accept_many(self, outcomes: list[FrameOutcome]) -> None:
        """Results that reached the sink together, written together: one write per array for the lot.
        Each outcome's `timings` travel on to `on_frame_done`."""
        self.received += len(outcomes)
        self.devices.update(o.timings.made_on for o in outcomes if o.timings.made_on)
        write_started = time.perf_counter()
        self._store.write_predictions({o.index: o.prediction for o in outcomes if o.prediction is not None},
                                      {o.index: o.timings.made_by for o in outcomes})
        write_s = (time.perf_counter() - write_started) / len(outcomes)
        for outcome in outcomes:
            if outcome.prediction is None:  # no worker could segment it: keep the place, leave it not done
                self.failed_frames.append(outcome.index)
                mask = np.zeros(outcome.raw.shape, dtype=bool)
            else:
                mask = combined_mask(outcome.prediction, self.config.volume.source)
                if outcome.prediction.detections_capped:
                    self._note_capped(outcome.index, outcome.prediction.detection_cap)
            outcome.timings.write_s = write_s
            self.waiting[outcome.index] = (mask, outcome.raw, outcome.axis_value, outcome.timings)
        self._link_ready()
        if time.monotonic() - self.last_tables >= self.config.output.refresh_tables_s:
            self._write_tables()
        if self.end_reason is not None:
            self._maybe_finish()

    def _note_capped(self, index: int, cap: int) -> None:
        """A crowded frame: said once per scan while it runs (a person can raise models.tlm.detections), listed at the end."""
        if not self.capped_frames:
            log.warning("%s frame %d: the TLM returned its cap of %d detections; more peaks may have been cut (frames at the "
                        "cap are listed in the store's capped_frames; models.tlm.detections raises the cap)",
                        self.nexus_path.name, index, cap)
        self.capped_frames.append(index)
        self.detection_cap = max(self.detection_cap, cap)

    def _link_ready(self, fill_gaps: bool = False) -> None:
        """Link every frame that is next in order, then write their volumes and done flags in one go."""
        first = self.linker.next_frame
        linked: list[tuple[np.ndarray, float | None, bool, FrameTimings | None]] = []  # labels, axis, done, timings
        while True:
            index = self.linker.next_frame
            timings: FrameTimings | None
            if index in self.waiting:
                mask, raw, axis, timings = self.waiting.pop(index)
                done = index not in self.failed_frames
            elif fill_gaps and index <= self.max_index:  # a frame never read: linked as empty, left not done
                shape = self._info.frame_shape
                mask, raw, axis, timings, done = np.zeros(shape, bool), np.zeros(shape), None, None, False
            else:
                break
            started = time.perf_counter()
            labels = self.linker.link(index, mask, raw, axis)
            if timings is not None:
                timings.link_s = time.perf_counter() - started
            linked.append((labels, axis, done, timings))
        if not linked:
            return
        started = time.perf_counter()
        self._store.write_volumes(first, [item[0] for item in linked], [item[1] for item in linked], [item[2] for item in linked])
        write_s = (time.perf_counter() - started) / len(linked)
        done_at = time.time()
        for offset, (_, _, done, timings) in enumerate(linked):
            self.state.frames_done += done
            if done and timings is not None and self.on_frame_done is not None:
                timings.write_s += write_s
                timings.done_at = done_at
                self.on_frame_done(self.key, first + offset, timings)

    def _write_tables(self) -> None:
        self._store.write_tables(self.linker.table(), range(self.linker.next_frame))
        self.last_tables = time.monotonic()

    def end(self, reason: str, abandon_in_flight: bool = False) -> None:
        self.end_reason = reason
        if abandon_in_flight and self.received < self.submitted:
            log.warning("%s: %d frame(s) still in flight at the stop are left not done", self.nexus_path.name,
                        self.submitted - self.received)
            self.submitted = self.received
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        reason = self.end_reason
        if reason is None or self.received < self.submitted or self.finished.is_set():
            return
        self._link_ready(fill_gaps=True)
        self._write_tables()
        frames_total = self.max_index + 1
        expected = self._info.expected_frames
        done = self._store.done_prefix()
        complete = (reason in COMPLETE_ENDINGS and done == frames_total and (expected is None or frames_total == expected)
                    and not self.lost_frames)
        status = schema.STATUS_COMPLETE if complete else schema.STATUS_INCOMPLETE
        if self.lost_frames:
            lost = sorted(set(self.lost_frames))
            reason = f"{reason}; {len(lost)} frame(s) lost: the detector file was truncated while being read ({_frame_list(lost)})"
            log.error("%s: %s", self.nexus_path, reason)
        bad_frames = {problem: sorted(set(frames)) for problem, frames in sorted(self.bad_frames.items())}
        self._store.finish(status, reason, frames_total, {"failed_frames": self.failed_frames, "bad_frames": bad_frames,
                                                          "lost_frames": sorted(set(self.lost_frames)),
                                                          schema.Attr.CAPPED_FRAMES: sorted(set(self.capped_frames)),
                                                          schema.Attr.DETECTION_CAP: self.detection_cap,
                                                          schema.Attr.SOURCE_STAT: stat_identity(self.nexus_path),
                                                          **self._devices_used()})
        if bad_frames:
            log.warning("%s: %s; processed anyway (non-finite pixels as dead pixels), listed in the store's bad_frames",
                        self.nexus_path, "; ".join(f"{len(frames)} frame(s) {BAD_FRAME_WORDS.get(problem, problem)} "
                                                    f"({_frame_list(frames)})" for problem, frames in bad_frames.items()))
        if self.paint is not None:
            self.paint(self.store_path)  # drawn on the painter's thread: the sink goes on writing
        self.state.status, self.state.reason = status, reason
        log.info("%s: %s (%s), %d/%d frames done, %d peaks -> %s", self.nexus_path.name, status, reason, done,
                 max(frames_total, expected or 0), len(self.linker.peaks), self.store_path)
        self._release()  # first: the store's lock is free before the daemon may start this scan again
        self._end()

    def stall(self, reason: str, wanting: str) -> None:
        """Stop for want of space or descriptors without failing: the store keeps what is done (and, for space, says
        why it stopped if it can), and the daemon starts the scan again, resuming it, once the shortage has passed."""
        log.error("%s; the scan stops and resumes when there is %s again", reason, wanting)
        if self.store is not None and wanting == SPACE:
            self.store.record_disk_full(reason)
        self.stalled = (wanting, reason)
        self.state.status, self.state.reason = waiting_status(wanting), reason
        self._release()  # first: the store's lock is free before the daemon may start this scan again
        self._end()

    def fail(self, reason: str) -> None:
        log.error("%s", reason)
        # a bare store records the failure for readers, unless none can be made or the file is gone with no store made
        if not self.store_unusable and (self.store is not None or self.store_path.exists() or self.nexus_path.exists()):
            root = self.config.output.root
            mark_failed(self.store_path, reason, self.nexus_path, self.info.start_time if self.info else None,
                        make_parents=root is not None and Path(root).is_dir())
        self.state.status, self.state.reason = schema.STATUS_FAILED, reason
        self._release()  # first: the store's lock is free before the daemon may start this scan again
        self._end()

    def _end(self) -> None:
        """The session is over: its rate stops counting, and whoever waits on `finished` goes on."""
        self.state.ended = time.time()
        self.finished.set()

    def _release(self) -> None:
        """A finished session stays listed by the daemon: keep only what `status` shows, not frames or peaks."""
        if self.store is not None:
            self.store.close()
        self.waiting.clear()
        self.linker = VolumeLinker(self.config.volume.min_pixels)
        self.store = None
