"""The daemon: watcher, scan sessions, dispatcher, local workers and the sink, wired together.

Threads: the watcher reports new files; each scan's session thread takes its file's frames from a
reader process and submits them; the dispatcher thread owns the workers' socket; the sink thread
(`pipeline.live.sink`) alone writes stores; the control thread answers `pipeline status`. Child
processes: local workers (restarted if they die), readers (pipeline.live.readers: every HDF5 call,
under deadlines) and the quick-look painter. The daemon's own process never calls HDF5, so no
scan file, however broken, can stop it.

Scans wait in arrival order, except that a file still being written (modified in the last
LIVE_WINDOW_S) goes first and may take one slot beyond `daemon.max_active_scans`: a live scan is
never queued behind a backlog of finished files.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.cluster.slurm import SlurmWorkers
from pipeline.common.file_names import name_problem, shown
from pipeline.common.run_folder import remove_abandoned
from pipeline.config import Config
from pipeline.live.confinement import is_inside, not_regular
from pipeline.live.control import ControlServer
from pipeline.live.dispatch import Dispatch, Dispatcher
from pipeline.live.events import ResultArrived, ScanEnded
from pipeline.live.local_workers import LocalWorkers
from pipeline.live.metrics import Metrics
from pipeline.live.painter import QuickLookPainter, picture_missing
from pipeline.live.readers import ReaderPool
from pipeline.live.session import FrameDoneHook, ScanSession
from pipeline.live.shortage import has_passed, raise_descriptor_limit
from pipeline.live.sink import Sink
from pipeline.live.timings import FrameTimings
from pipeline.live.watch import Watcher, find_scans, is_scan_name
from pipeline.live.wire import FrameResult
from pipeline.store import schema
from pipeline.store.location import recorded_stat_matches, stat_identity, store_path_for
from pipeline.store.provenance import describe_models
from pipeline.store.reader import store_status

log = logging.getLogger(__name__)

LIVE_WINDOW_S = 5.0  # a scan file modified this recently is being written: it goes before finished ones
STOP_READERS_S = 5.0  # at a stop, readers get this long to end their scans before they are killed
KEEP_FINISHED_SESSIONS = 256  # finished scans still listed by `pipeline status`
MAX_REMEMBERED_NOT_SCANS = 100_000  # files known to hold no detector frames (a path and three numbers each)
MAX_REMEMBERED_NAMES = 10_000  # unusable file names already said (each is said once)
SPACE_CHECK_INTERVAL_S = 2.0  # how often scans stopped by a shortage (space, descriptors) look again
# the most a drained stop waits for quick looks still to draw: a backlog (200 small scans finished at once: ~0.3-1 s a
# picture) or one picture blocked on its raw file used to hold the stop for its whole minute, and the steps after it
# then pushed it past the minute a supervisor gives (scripts/scan_setup_bench.py, tests/test_stop_pictures.py)
PICTURES_AT_STOP_S = 20.0


class Daemon:
    def __init__(self, config: Config, watch: bool = True, on_frame_done: FrameDoneHook | None = None, control: bool = True) -> None:
        self.config = config
        self.watch = watch
        self.started = time.time()
        self.sessions: dict[str, ScanSession] = {}
        self._not_scans: dict[str, list[int]] = {}  # path -> stat identity of files that are no detector scans
        self._unusable_names: set[str] = set()  # paths whose names cannot be used (pipeline.common.file_names), said once
        self._names_of_files: dict[tuple[int, int], str] = {}  # (device, inode) of each file offered -> its first name
        self._aliases_said: set[str] = set()  # other names of followed files, said once
        self.waiting_scans = WaitingScans()
        self._output_roots: dict[str, Path] = {}  # scan path -> the output root its follow request named (oldest first)
        self.stopping = threading.Event()
        self._closing = threading.Event()  # set by shutdown: no new scan starts
        self._session_ended = threading.Event()
        self.sink = Sink(on_scan_finished=self._session_ended.set)
        self.dispatcher = Dispatcher(config.workers, self._on_result, max_queued=max(16, config.workers.credit * 2),
                                     may_send=self.sink.may_send, max_frame_pixels=config.follow.max_frame_pixels)
        self.watcher = Watcher(config.watch, self._found_by_watcher) if watch else None
        self.painter = QuickLookPainter()
        self.readers = ReaderPool(config.readers, config.readers.processes or config.daemon.max_active_scans + 1,
                                  log_level=config.daemon.log_level)
        self.local_workers = LocalWorkers(config, self.dispatcher.local_endpoint, self.dispatcher.folder.path,
                                          joined=self.dispatcher.joined_pids.__contains__)
        self.slurm_workers = (SlurmWorkers(config, self.dispatcher, lambda: any(not s.finished.is_set() for s in list(self.sessions.values())))
                              if config.workers.slurm else None)
        self._said_unable: str | None = None
        self._resume_reasons: dict[Path, str] = {}  # scans stopped by a shortage, queued again: why they stopped
        self._space_checked = 0.0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._scheduler_loop, name="scheduler", daemon=True),
        ]
        self.control: ControlServer | None = None
        self._serve_control = control  # `pipeline process` runs without one (a daemon of the same config may hold it)
        self.provenance: dict[str, Any] = {"models": describe_models(config.models), "device": config.workers.device}
        self.metrics: Metrics | None = Metrics(self.status) if config.daemon.metrics_port is not None else None
        self.metrics_port: int | None = None
        self._audit = open(config.daemon.audit_log, "a", buffering=1) if config.daemon.audit_log is not None else None
        self._frame_hooks = [hook for hook in (on_frame_done, self.metrics and self.metrics.frame_done) if hook]
        if self._audit is not None:
            self._frame_hooks.append(self._audit_frame)

    # -- set-up ---------------------------------------------------------------------------

    def start(self) -> Daemon:
        before, after = raise_descriptor_limit()
        if after != before:
            log.info("open-file limit raised from %d to %d (a socket per peer, files per scan)", before, after)
        abandoned = remove_abandoned()
        if abandoned:
            log.info("removed %d private folder(s) left in %s by daemons that were killed: %s", len(abandoned), abandoned[0].parent,
                     ", ".join(folder.name for folder in abandoned[:5]) + (", ..." if len(abandoned) > 5 else ""))
        try:
            if self._serve_control:  # first: a taken port stops the start before anything else runs
                self.control = ControlServer(self.config.daemon.control, self.status, self.follow)
                self._threads.append(threading.Thread(target=self.control.serve, args=(self.stopping,), name="control", daemon=True))
            if self.metrics is not None and self.config.daemon.metrics_port is not None:
                self.metrics_port = self.metrics.serve(self.config.daemon.metrics_port, self.config.daemon.metrics_address)
                log.info("Prometheus metrics on http://%s:%d/metrics", self.config.daemon.metrics_address, self.metrics_port)
        except BaseException:  # a refused start leaves nothing behind
            self.dispatcher.discard()
            raise
        self.readers.start(count=1)  # the first scan waits for no process start
        self.dispatcher.start()
        self.sink.start()
        self.painter.start()
        if self.watcher is not None:  # before `pipeline status` is answered: a missing watched directory is in the first answer
            self.watcher.check_roots()
        for thread in self._threads:
            thread.start()
        self.local_workers.start()
        if self.slurm_workers is not None:
            self.slurm_workers.start()
        if self.watcher is not None:
            if not self.config.watch.resume_existing:
                self._ignore_existing_scans(self.watcher)
            self.watcher.start()  # its first rescan offers every existing scan; add_scan skips finished ones
        return self

    def _ignore_existing_scans(self, watcher: Watcher) -> None:
        """With `resume_existing: false`, files already there at start-up are left alone."""
        for path in find_scans(watcher.roots, self.config.watch.patterns, self.config.watch.recursive):
            watcher.mark_seen(path)

    @property
    def workers(self) -> list[subprocess.Popen[bytes]]:
        """The local worker processes running now (the benchmark samples their memory)."""
        return self.local_workers.processes()

    # -- scans ----------------------------------------------------------------------------

    def _found_by_watcher(self, path: Path) -> None:
        """A file the watcher found: followed, unless it is another name of a file followed by its own (a link such as
        `latest.nxs -> scan_1234.nxs`, or a hard link): each name was processed in full, doubling the workers' load."""
        first = self._first_name_of(path) if name_problem(path) is None else None
        if first is None:
            self.add_scan(path)
        elif str(path) not in self._aliases_said and len(self._aliases_said) < MAX_REMEMBERED_NAMES:
            self._aliases_said.add(str(path))
            log.info("%s: the same file as %s; followed once, by that name", path, first)

    def _first_name_of(self, path: Path) -> Path | None:
        """The name under which the file at `path` is followed when that is not `path`: a symbolic link's target inside
        the watched directories (the watcher finds it there too), or the first name seen of a file with several."""
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            watched = is_inside(target, list(self.config.watch.dirs)) and is_scan_name(target.name, self.config.watch.patterns)
            return target if watched and target != path else None
        try:
            status = os.stat(path)
        except OSError:
            return None
        with self._lock:  # every file's first name, as a hard link may come after the file was offered
            if len(self._names_of_files) >= MAX_REMEMBERED_NOT_SCANS:
                self._names_of_files.clear()
            first = self._names_of_files.setdefault((status.st_dev, status.st_ino), str(path))
        if first == str(path) or status.st_nlink < 2:
            return None
        try:
            same = os.path.samefile(first, path)
        except OSError:  # the first name is gone
            same = False
        if not same:  # the first name is gone or names another file now: this one is followed
            with self._lock:
                self._names_of_files[(status.st_dev, status.st_ino)] = str(path)
        return Path(first) if same else None

    def add_scan(self, path: Path) -> None:
        """Queue a scan unless its store, made from this very file, is already complete or failed
        (rerun those with `pipeline process --force`); a replaced file gets a fresh store."""
        unusable = name_problem(path)
        if unusable is not None:
            if str(path) not in self._unusable_names:  # said once, not at every rescan
                if len(self._unusable_names) < MAX_REMEMBERED_NAMES:
                    self._unusable_names.add(str(path))
                log.warning("%s", unusable)
            return
        with self._lock:
            self._remember_not_scans()
        if self._not_scans.get(str(path)) == stat_identity(path) is not None:
            log.debug("%s: not a detector scan (unchanged since); skipped", path.name)
            return
        store = self._store_path(path)
        status = store_status(store, follow_symlinks=False)
        if status in (schema.STATUS_COMPLETE, schema.STATUS_FAILED) and recorded_stat_matches(store, path):
            log.debug("%s: store already %s; skipped", path.name, status)
            if picture_missing(store, status):  # a stop ran out of time for it (its log named the store)
                log.info("%s: store complete but its quick look was never drawn: drawing it", path.name)
                self.painter.paint(store)
            return  # the very file, unchanged; anything less sure is for a reader to look at (the daemon reads no HDF5)
        self.waiting_scans.put(path)

    def _store_path(self, path: Path) -> Path:
        """Where this scan's store goes: under the output root its follow request named; else where a store of it is
        already (as configured, else under one of output.requested_roots: a follow request of an earlier run); else as
        configured."""
        if (requested := self._output_roots.get(str(path))) is not None:
            return store_path_for(path, requested, self.config.watch.dirs)
        configured = store_path_for(path, self.config.output.root, self.config.watch.dirs)
        if not os.path.lexists(configured):
            for root in self.config.output.requested_roots:
                if os.path.lexists(elsewhere := store_path_for(path, root, self.config.watch.dirs)):
                    return elsewhere
        return configured

    def follow(self, path: Path, output_root: Path | None = None) -> dict[str, Any]:
        """Follow `path` now, as asked over the control socket (the Zocalo service: GDA's trigger, no wait for the watcher).
        Only a regular file inside the watched directories whose name matches watch.patterns is taken, and an output root
        only if output.requested_roots lists it (where a restarted daemon looks for the store too); otherwise the
        answer is one line naming the path and the reason. `queued` is false when the store is already complete or failed
        for this very file (nothing more will be written); asking again while the scan is followed queues nothing more,
        and `store` says where it is written (a scan followed already keeps its store, whatever output root is asked)."""
        path = Path(os.path.abspath(path))  # as the watcher names it, `..` taken out; links are resolved by the checks
        roots = list(self.config.watch.dirs)
        requested_roots = [Path(os.path.abspath(root)) for root in self.config.output.requested_roots]
        if output_root is not None:
            output_root = Path(os.path.abspath(output_root))
        why = None
        if self._closing.is_set():
            why = "the daemon is stopping"
        elif output_root is not None and output_root not in requested_roots:
            why = (f"output root {shown(str(output_root))} is not one of output.requested_roots "
                   f"({', '.join(map(str, requested_roots)) or 'none set'}); no store is written elsewhere")
        elif output_root is not None and output_root.exists() and not output_root.is_dir():
            why = f"output root {shown(str(output_root))} is not a folder"
        elif not is_inside(path, roots):
            why = f"outside the watched directories ({', '.join(map(str, roots))}); nothing outside them is read"
        elif not any(fnmatch.fnmatch(path.name, pattern) for pattern in self.config.watch.patterns):
            why = f"the name matches no watch.patterns ({', '.join(self.config.watch.patterns)})"
        elif (unusable := name_problem(path)) is not None:
            why = unusable.split(": ", 1)[1]
        elif not path.exists():
            why = "no such file"
        elif (kind := not_regular(path)) is not None:
            why = kind.removeprefix(f"{path}: ")
        else:
            with self._lock:
                self._remember_not_scans()
            if self._not_scans.get(str(path)) == stat_identity(path) is not None:
                why = "not a detector scan (looked at before, unchanged since)"
        if why is not None:
            log.warning("follow request refused: %s: %s", shown(str(path)), why)
            return {"accepted": False, "reason": f"{shown(str(path))}: {why}"}
        with self._lock:
            session = self.sessions.get(str(path))
            active = session if session is not None and not session.finished.is_set() else None
            following = active is not None or path in self.waiting_scans
            if output_root is not None and not following:
                self._output_roots[str(path)] = output_root
                while len(self._output_roots) > MAX_REMEMBERED_NAMES:
                    del self._output_roots[next(iter(self._output_roots))]
        store = active.store_path if active is not None else self._store_path(path)
        final = store_status(store, follow_symlinks=False) in (schema.STATUS_COMPLETE, schema.STATUS_FAILED) and recorded_stat_matches(store, path)
        if self.watcher is not None:
            self.watcher.mark_seen(path)  # its own later look at the file must not queue it a second time
        if not final and not following:
            self.add_scan(path)
        log.info("%s: follow request: %s", path, "store already final" if final else "followed already" if following else "queued")
        if following and output_root is not None and not is_inside(store, [output_root]):
            log.warning("%s: followed already, into %s: the output root %s asked for now is not used", path, store, shown(str(output_root)))
        return {"accepted": True, "scan": str(path), "store": str(store), "queued": not final, "pid": os.getpid()}

    def _scheduler_loop(self) -> None:
        while not self.stopping.is_set():
            active = sum(1 for s in self.sessions.values() if not s.finished.is_set())
            limit = self.config.daemon.max_active_scans
            if self._closing.is_set():
                time.sleep(0.1)
            elif active < limit + 1:  # the slot beyond the limit is for a live scan only
                path = self.waiting_scans.take(timeout=0.2, live_only=active >= limit)
                if path is not None:
                    try:
                        self._start_session(path)
                    finally:
                        self.waiting_scans.handed_on()
                    continue
            else:
                self._session_ended.wait(0.1)  # woken as soon as a scan ends, so failing files do not queue up
                self._session_ended.clear()
            self.local_workers.supervise()
            if self.slurm_workers is not None:
                self.slurm_workers.supervise()
            self._resume_stalled()
            unable = self.local_workers.unable
            if unable is not None and unable != self._said_unable:
                log.error("%s; frames wait for a remote worker", unable)
                self._said_unable = unable

    def _resume_stalled(self) -> None:
        """Queue again every scan stopped by a shortage that has passed (space: `resume_free_mib` free where its store is)."""
        if time.monotonic() - self._space_checked < SPACE_CHECK_INTERVAL_S:
            return
        self._space_checked = time.monotonic()
        with self._lock:
            stalled = [s for s in self.sessions.values() if s.finished.is_set() and s.stalled and s.nexus_path not in self._resume_reasons]
        for session in stalled:
            assert session.stalled is not None
            wanting, reason = session.stalled
            if has_passed(wanting, session.store_path, self.config.output.resume_free_mib):
                self._resume_reasons[session.nexus_path] = reason
                session.stalled = None
                log.info("%s: %s again; resuming the scan", session.nexus_path.name, wanting)
                self.waiting_scans.put(session.nexus_path)

    def _start_session(self, path: Path) -> None:
        if self._closing.is_set():
            return  # the daemon is stopping: the scan is taken up at the next start
        key = str(path)
        previous = self.sessions.get(key)
        if previous is not None and not previous.finished.is_set():
            retry = threading.Timer(1.0, self.add_scan, (path,))  # a replaced file: offer it again once the old scan ends
            retry.daemon = True
            retry.start()
            return
        session = ScanSession(path, self.config, self.dispatcher.submit, self.provenance, self.sink.post, self._frame_done,
                              self.painter.paint, resumed_after=self._resume_reasons.pop(path, None), readers=self.readers,
                              store_path=self._store_path(path))
        with self._lock:
            if self._closing.is_set():  # under the lock: a stop that began meanwhile would never tell this session
                return
            self._remember_not_scans()  # before old sessions are let go, so none of them is forgotten
            self.sessions[key] = session
            finished = [k for k, s in self.sessions.items() if s.finished.is_set()]
            for old in finished[: max(0, len(finished) - KEEP_FINISHED_SESSIONS)]:  # status shows the recent ones
                del self.sessions[old]
        log.info("%s: following", path)
        session.thread.start()

    def _remember_not_scans(self) -> None:
        """Files found to be no detector scans, by path and stat identity: offered again unchanged (every rescan does),
        they are skipped without a reader. Bounded: the oldest are forgotten (and looked at once more)."""
        for key, session in self.sessions.items():
            if session.not_a_scan is not None:
                self._not_scans[key] = session.not_a_scan
        while len(self._not_scans) > MAX_REMEMBERED_NOT_SCANS:
            del self._not_scans[next(iter(self._not_scans))]

    def _frame_done(self, scan: str, index: int, timings: FrameTimings) -> None:
        for hook in self._frame_hooks:
            hook(scan, index, timings)

    def _audit_frame(self, scan: str, index: int, timings: FrameTimings) -> None:
        """One line per frame done, written after its done flag: an audit trail that survives crashes."""
        assert self._audit is not None
        self._audit.write(json.dumps({"scan": scan, "frame": index, "pid": os.getpid(), "done_at": timings.done_at,
                                      "worker": timings.made_by}) + "\n")

    def _on_result(self, dispatch: Dispatch, result: FrameResult | None, error: str | None) -> None:
        self.sink.post(ResultArrived(dispatch, result, error))

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            sessions = list(self.sessions.values())
        now = time.time()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "scans": [
                {"scan": s.nexus_path.name, "path": s.key, "store": str(s.store_path), "status": s.state.status, "reason": s.state.reason,
                 "frames_read": s.state.frames_read, "frames_done": s.state.frames_done,
                 "fps": round(s.state.frames_per_second(now), 2)}
                for s in sessions
            ],
            "waiting_scans": self.waiting_scans.qsize(),
            "problems": self.watcher.problems() if self.watcher is not None else [],
            "readers": self.readers.status(),
            "local_workers": self.local_workers.status(),
            "unable": self.local_workers.unable,
            "slurm_workers": self.slurm_workers.report() if self.slurm_workers is not None else None,
            "dispatch": self.dispatcher.stats(),
        }

    # -- stopping ---------------------------------------------------------------------------

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no scan is waiting or in progress and every finished scan has its quick look
        (used by `process`, `demo` and tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            with self._lock:
                busy = any(not s.finished.is_set() for s in self.sessions.values())
            if not busy and self.waiting_scans.empty() and self.painter.idle():
                return True
            time.sleep(0.05)
        return False

    def _wait_sessions(self, deadline: float, hurry: threading.Event | None = None) -> bool:
        """True once every started scan has ended (its frames in flight written), False at `deadline` or once `hurry`
        is set (a second Ctrl-C: stop without waiting for frames in flight)."""
        while time.monotonic() < deadline and not (hurry is not None and hurry.is_set()):
            with self._lock:
                if all(s.finished.is_set() for s in self.sessions.values()):
                    return True
            time.sleep(0.05)
        return False

    def _stop_readers(self) -> None:
        """Give the readers STOP_READERS_S to end their scans, then kill those still busy: a reader blocked inside HDF5
        answers no stop, and stopping must always work (its scan ends `stopped`, its frames read so far drained)."""
        deadline = time.monotonic() + STOP_READERS_S
        for session in list(self.sessions.values()):
            if session.thread.is_alive():
                session.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(session.thread.is_alive() for session in self.sessions.values()):
            log.warning("readers still busy %.0f s after the stop; stopping them", STOP_READERS_S)
            self.readers.close()

    def _end_unfinished(self, wait_s: float = 10.0) -> None:
        """Scans still open at the stop (results that will not come: workers gone, the drain out of time) end now, their
        stores `incomplete` with `end_reason: stopped` and their missing frames not done: never left saying `running`."""
        with self._lock:
            unfinished = [s for s in self.sessions.values() if not s.finished.is_set() and s.store is not None]
        for session in unfinished:
            self.sink.post(ScanEnded(session, "stopped", abandon_in_flight=True))
        deadline = time.monotonic() + wait_s
        for session in unfinished:
            session.finished.wait(max(0.0, deadline - time.monotonic()))

    def shutdown(self, drain: bool = True, timeout: float = 60.0, hurry: threading.Event | None = None) -> None:
        """Stop following; with `drain`, let frames already read reach their stores first, unless `hurry` is set
        meanwhile. Either way every scan started ends with an honest status (`incomplete`, `stopped`), never `running`."""
        deadline = time.monotonic() + timeout
        self._closing.set()  # no scan starts from now on; those still waiting are taken up again at the next start
        left_waiting = self.waiting_scans.clear()
        if left_waiting:
            log.info("%d scan(s) still waiting are left for the next start", left_waiting)
        if self.watcher is not None:
            self.watcher.stop()
        with self._lock:  # every session started before `_closing` was set is in here (see _start_session)
            started = list(self.sessions.values())
        for session in started:
            session.stop.set()
        self._stop_readers()
        if drain and not self._wait_sessions(deadline, hurry):
            self._end_unfinished()
        elif not drain:
            self._end_unfinished(wait_s=2.0)
        self.stopping.set()
        self.readers.close()
        self.local_workers.retire()  # before they are told to stop: their exit is no crash to restart them from
        if self.slurm_workers is not None:
            self.slurm_workers.retire()
        self.dispatcher.stop()
        self.sink.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        undrawn = self.painter.stop(finish=drain, timeout=min(PICTURES_AT_STOP_S, max(1.0, deadline - time.monotonic())))
        if undrawn:
            named = ", ".join(str(store) for store in undrawn[:10]) + (f", ... {len(undrawn) - 10} more" if len(undrawn) > 10 else "")
            log.warning("%d quick look(s) not drawn: the stop waits for pictures at most %g s (the next start draws them; "
                        "`pipeline quicklook STORE` draws one now): %s", len(undrawn), PICTURES_AT_STOP_S, named)
        self.local_workers.stop()
        if self.slurm_workers is not None:
            self.slurm_workers.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._audit is not None:
            self._audit.close()


class WaitingScans:
    """Scans waiting for a slot: in arrival order, but a file being written now (modified in the last LIVE_WINDOW_S,
    the newest first) before any other, so a live scan never waits behind a backlog of finished files."""

    def __init__(self) -> None:
        self._paths: list[Path] = []
        self._ready = threading.Condition()
        # taken and not yet a registered session: counted as waiting, or `Daemon.wait_idle` could see no scan anywhere
        # in between and `pipeline process` stop the daemon under a scan it was starting (CI saw it)
        self._in_hand = 0

    def put(self, path: Path) -> None:
        with self._ready:
            self._paths.append(path)
            self._ready.notify()

    def clear(self) -> int:
        """Forget every waiting scan (the daemon is stopping); returns how many there were."""
        with self._ready:
            count = len(self._paths)
            self._paths.clear()
            return count

    def qsize(self) -> int:
        with self._ready:
            return len(self._paths)

    def __contains__(self, path: object) -> bool:
        with self._ready:
            return path in self._paths

    def empty(self) -> bool:
        """No scan waiting, and none taken but not yet handed on (`handed_on`)."""
        with self._ready:
            return not self._paths and self._in_hand == 0

    def handed_on(self) -> None:
        """The scan last taken is a registered session now (or was dropped): it no longer counts as waiting."""
        with self._ready:
            self._in_hand = max(0, self._in_hand - 1)

    def take(self, timeout: float, live_only: bool = False) -> Path | None:
        """The next scan to start, or None after `timeout`; with `live_only`, only a live one."""
        with self._ready:
            if not self._paths:
                self._ready.wait(timeout)
            if not self._paths:
                return None
            now = time.time()
            live = [(mtime, i) for i, path in enumerate(self._paths) if now - (mtime := _modified(path)) <= LIVE_WINDOW_S]
            if live:
                self._in_hand += 1
                return self._paths.pop(max(live)[1])
            if live_only:
                self._ready.wait(timeout)  # nothing to start: do not spin
                return None
            self._in_hand += 1
            return self._paths.pop(0)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
