"""Looks at every store under the roots, and at the daemon when one answers, on one thread of its own.

Requests never walk the file system: they read the latest snapshot that this thread made (a list
of summaries, newest first, and a version number that grows whenever anything in it changed), so
a front page over hundreds of scans answers at once and the update stream only compares versions.
Frames per second are what this thread saw the frames-done count do over the last few seconds;
once a scan is over, its frames done over its run time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import one_line
from pipeline.store import schema
from pipeline.web.index import StoreIndex
from pipeline.web.summary import signature, sort_key, summarize

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # frames per second over this many seconds
MAX_PROBLEMS = 20
MAX_PROBLEM_CHARS = 500
DaemonStatus = Callable[[], "dict[str, Any] | None"]


def slurm_job_lines(slurm: object) -> list[str]:
    """The daemon's SLURM worker jobs (`workers.slurm`) as at most MAX_PROBLEMS short lines, e.g. "job 812 RUNNING on
    node3"; why none can be submitted comes first. Nothing when the daemon uses no SLURM."""
    if not isinstance(slurm, dict):
        return []
    jobs = slurm.get("jobs")
    if not isinstance(jobs, list):
        jobs = []
    lines = [f"cannot submit: {slurm['unable']}"] if slurm.get("unable") else []
    for job in jobs[:MAX_PROBLEMS]:
        if isinstance(job, dict):
            where = f" on {job['node']}" if job.get("node") else ""
            reason = f" ({job['reason']})" if job.get("reason") else ""
            lines.append(f"job {job.get('job_id')} {job.get('state')}{reason}{where}")
    return [" ".join(line.split())[:MAX_PROBLEM_CHARS] for line in lines[:MAX_PROBLEMS]]


def missing_root_lines(roots: list[Path]) -> list[str]:
    """One line per root that is not a folder (yet): the page says why it lists nothing from there."""
    return [f"web root {root} does not exist (yet): its scans are listed once it does" for root in roots if not os.path.isdir(root)]


def problem_lines(problems: object) -> list[str]:
    """The daemon's `problems` (what needs a person: a watched directory that does not exist) as at most
    MAX_PROBLEMS lines of at most MAX_PROBLEM_CHARS each, whatever the daemon sent."""
    if not isinstance(problems, list):
        return []
    lines = [" ".join(str(problem).split()) for problem in problems[:MAX_PROBLEMS]]
    return [line if len(line) <= MAX_PROBLEM_CHARS else line[:MAX_PROBLEM_CHARS - 1] + "…" for line in lines if line]


class _Seen:
    """What the monitor remembers about one store between passes."""

    def __init__(self) -> None:
        self.signature: tuple[int, int] | None = None
        self.summary: dict[str, Any] | None = None
        self.history: deque[tuple[float, int]] = deque()  # (monotonic time, frames done)
        self.changed_at = time.time()


class Monitor:
    """`refresh` every `interval_s` on its thread; `snapshot`/`get` for requests, from any thread."""

    def __init__(self, index: StoreIndex, daemon_status: DaemonStatus | None = None, interval_s: float = 1.0) -> None:
        self.index = index
        self.daemon_status = daemon_status
        self.interval_s = interval_s
        self.version = 0
        self.daemon: dict[str, Any] | None = None
        self.problems: list[str] = []  # the web view's own: a root that does not exist (yet)
        self._seen: dict[Path, _Seen] = {}
        self._scans: list[dict[str, Any]] = []
        self._by_id: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="web-monitor", daemon=True)
        self.refreshed = threading.Event()  # set after the first pass

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # one bad pass must not end the view; the next pass tries again
                log.exception("web view: looking at the stores failed")
            self.refreshed.set()
            self._stop.wait(max(0.05, self.interval_s - (time.monotonic() - started)))

    # -- one pass ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Look at every store (final ones only when their metadata changed) and at the daemon; publish if anything changed."""
        found = self.index.refresh()
        problems = missing_root_lines(self.index.roots)
        daemon = self._ask_daemon()
        daemon_scans = {os.path.realpath(str(scan.get("store"))): scan for scan in (daemon or {}).get("scans", [])}
        now = time.monotonic()
        rows: list[tuple[float, dict[str, Any]]] = []
        for scan_id, path in found.items():
            seen = self._seen.setdefault(path, _Seen())
            current = signature(path)
            final = seen.summary is not None and seen.summary["status"] in schema.FINAL_STATUSES
            if not (final and current == seen.signature and seen.summary is not None and seen.summary["id"] == scan_id):
                fresh = self._summarize(path, scan_id)
                if fresh is None:
                    continue
                if seen.summary is None or fresh["frames_done"] != seen.summary["frames_done"] or fresh["status"] != seen.summary["status"]:
                    seen.changed_at = time.time()
                seen.summary, seen.signature = fresh, current
            assert seen.summary is not None
            summary = dict(seen.summary)
            self._rate(seen, summary, now)
            entry = daemon_scans.get(os.path.realpath(path))
            if entry is not None:
                summary["daemon"] = {key: entry.get(key) for key in ("status", "reason", "frames_read", "frames_done", "fps")}
                if summary["fps"] is None and summary["status"] == schema.STATUS_RUNNING:
                    summary["fps"] = entry.get("fps")
            summary["updated"] = round(seen.changed_at, 3)
            rows.append((sort_key(summary, seen.changed_at), summary))
        for path in [p for p in self._seen if p not in set(found.values())]:
            del self._seen[path]
        rows.sort(key=lambda row: (-row[0], row[1]["id"]))
        scans = [summary for _, summary in rows]
        with self._lock:
            if scans != self._scans or daemon != self.daemon or problems != self.problems:
                self._scans, self.daemon, self.problems = scans, daemon, problems
                self._by_id = {summary["id"]: summary for summary in scans}
                self.version += 1

    def _summarize(self, path: Path, scan_id: str) -> dict[str, Any] | None:
        try:
            return summarize(path, scan_id)
        except Exception as error:  # whatever a damaged store does, the page lists it with the problem
            return {"id": scan_id, "name": path.name.removesuffix(".zarr"), "store": str(path), "status": "unknown", "end_reason": None,
                    "frames_done": 0, "frames_expected": None, "newest_done": None, "peaks": 0, "fps": None,
                    "start_time": None, "end_time": None, "scan_command": None, "layout": None, "axis_name": None,
                    "problem": f"cannot read the store ({one_line(error)})", "daemon": None}

    def _rate(self, seen: _Seen, summary: dict[str, Any], now: float) -> None:
        """Frames per second over the last RATE_WINDOW_S while running (None until two looks apart)."""
        if summary["status"] != schema.STATUS_RUNNING:
            seen.history.clear()
            return
        seen.history.append((now, summary["frames_done"]))
        while len(seen.history) > 2 and now - seen.history[0][0] > RATE_WINDOW_S:
            seen.history.popleft()
        (first_time, first_done), (last_time, last_done) = seen.history[0], seen.history[-1]
        if last_time - first_time >= 0.5:
            summary["fps"] = round(max(0, last_done - first_done) / (last_time - first_time), 2)

    def _ask_daemon(self) -> dict[str, Any] | None:
        if self.daemon_status is None:
            return None
        try:
            status = self.daemon_status()
        except Exception as error:  # a daemon that answers nonsense is the same as none
            log.debug("web view: daemon status failed (%s)", one_line(error))
            return None
        if not isinstance(status, dict):
            return None
        dispatch = status.get("dispatch") or {}
        return {"pid": status.get("pid"), "version": status.get("version"), "uptime_s": status.get("uptime_s"),
                "workers": len(dispatch.get("workers") or []), "queued": dispatch.get("queued"), "in_flight": dispatch.get("in_flight"),
                "waiting_scans": status.get("waiting_scans"), "problems": problem_lines(status.get("problems")),
                "slurm_jobs": slurm_job_lines(status.get("slurm_workers")), "scans": status.get("scans") or []}

    # -- for requests -------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
        """(version, summaries newest first, daemon summary or None)."""
        with self._lock:
            return self.version, self._scans, self._public_daemon()

    def own_problems(self) -> list[str]:
        """What the web view itself needs a person for (the daemon's problems are in its summary)."""
        with self._lock:
            return list(self.problems)

    def _public_daemon(self) -> dict[str, Any] | None:
        if self.daemon is None:
            return None
        return {key: value for key, value in self.daemon.items() if key != "scans"}

    def get(self, scan_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._by_id.get(scan_id)
