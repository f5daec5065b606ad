"""SLURM worker jobs the daemon manages: submitted with sbatch, watched with squeue, cancelled with scancel.

Each job runs one `pipeline worker` that connects back to the daemon (its socket file on the same host, or
`workers.bind` over TCP from other nodes) and says hello as `slurm-<job id>`. The daemon wants
ceil(frames waiting for SLURM workers / credit) jobs, at least one while a scan is active, at most
`workers.slurm.jobs`; a job that ends while frames wait (scancel, preemption, time limit, node failure) is replaced,
and jobs beyond what is wanted for `idle_s` are cancelled, as are all of them when the daemon stops. A job that is
preempted and requeued keeps its id and counts as one of ours while it waits to run again.

The frames a job held when it ended are not lost: its worker says bye on SIGTERM (or falls silent), and the dispatcher
sends them to another worker, exactly once into the store.

SLURM's commands can hang (a slurmctld that does not answer): they run only on this module's own thread, each with a
deadline, so the daemon's scheduler, which calls `supervise`, never waits on them. When jobs cannot be submitted
(an unknown partition, no sbatch on PATH), `unable` says why in one line, logged once per distinct reason, and
submissions are retried with growing waits; local workers carry on meanwhile.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, SlurmSettings

if TYPE_CHECKING:
    from pipeline.live.dispatch import Dispatcher

log = logging.getLogger(__name__)

WORKER_PREFIX = "slurm-"  # a job's worker says hello as slurm-<job id>
# squeue states in which a job still is, or will again be, one of our workers; any other state means it ended
ALIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                          "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})
RETRY_S = (10.0, 300.0)  # waits between failed submissions: the first, and the most (doubling in between)
GIVE_UP_JOBS = 3  # jobs in a row that end before their worker started: then `unable` says so
KEEP_ENDED = 20  # ended jobs still listed by status()
SUPERVISE_EVERY_S = 0.5  # the scheduler calls `supervise` every ~0.1 s; demand is looked at this often
SEEN_GRACE_S = 10.0  # a job squeue does not list yet this soon after sbatch returned is not taken for ended


class SlurmError(Exception):
    """A SLURM command that failed; the message is one line for the user."""


@dataclass
class SlurmJob:
    job_id: str
    submitted_at: float  # wall clock (time.time)
    log: Path
    state: str = "SUBMITTED"
    reason: str = ""
    node: str = ""
    joined: bool = False  # its worker said hello to the dispatcher
    cancelled: bool = False  # by this daemon (surplus, idle or stop)
    ended: bool = False
    started: bool = False  # its worker started (joined, or said it connected in its log) before the job ended
    reported: bool = False  # its end has been logged
    seen_at: float = 0.0  # monotonic time squeue last listed it
    submitted_monotonic: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "reason": self.reason, "node": self.node,
                "submitted_at": round(self.submitted_at, 1), "worker": f"{WORKER_PREFIX}{self.job_id}" if self.joined else None,
                "log": str(self.log)}


def job_name() -> str:
    """`pipeline-worker-<host>-<pid>`: whose jobs these are, so `squeue --name` finds this daemon's and no other's."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname().split(".")[0]) or "host"
    return f"pipeline-worker-{host}-{os.getpid()}"


def _one_line(text: str) -> str:
    """The line of a SLURM command's stderr that says what went wrong (`sbatch: error: ...`), without the prefix."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    if not errors:
        return "no message"
    last = errors[-1]
    for prefix in ("sbatch: error: ", "squeue: error: ", "scancel: error: "):
        last = last.removeprefix(prefix)
    return " ".join(last.split())[:300]


class SlurmWorkers:
    """The daemon's SLURM worker jobs, with the interface of `LocalWorkers` (start, supervise, status, unable, stop)."""

    def __init__(self, config: Config, dispatcher: Dispatcher, scans_active: Callable[[], bool]) -> None:
        if config.workers.slurm is None:
            raise ValueError("SlurmWorkers needs workers.slurm")
        self.config = config
        self.settings: SlurmSettings = config.workers.slurm
        self.dispatcher = dispatcher
        self.scans_active = scans_active
        self.name = job_name()
        self.endpoint = self.settings.endpoint or dispatcher.local_endpoint
        self.log_dir = self.settings.log_dir or Path("~/.pipeline/slurm").expanduser()
        self.script = self.log_dir / f"{self.name}.sh"
        self.config_file = self.log_dir / f"{self.name}.json"
        self.jobs: dict[str, SlurmJob] = {}
        self.wanted = 0
        self._unable: str | None = None
        self._said: set[str] = set()  # reasons already logged
        self._failed_submits = 0
        self._next_submit = 0.0  # monotonic: no sbatch before this (after failures)
        self._sbatch_run = False  # whether sbatch ran at all (else stop has no job to cancel)
        self._failed_jobs = 0  # jobs in a row that ended before their worker started
        self._surplus_since: float | None = None
        self._retired = False  # the daemon stops: no job is submitted or replaced from now on
        self._demand_at = 0.0
        self._lock = threading.Lock()  # guards `jobs`, `wanted`, `_unable` and `_retired`; never held while a command runs
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slurm-workers", daemon=True)

    # -- the interface the daemon uses (any thread; none of it waits on SLURM) --------------------------------------

    def start(self) -> None:
        """Write the job script and the workers' config, then start the thread that talks to SLURM."""
        try:
            self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._write_private(self.config_file, json.dumps(self.config.for_workers()))
            self._write_private(self.script, self._script_text(), mode=0o700)
        except OSError as error:
            self._set_unable(f"cannot write SLURM job files in {self.log_dir} ({error.strerror or error})")
            return
        log.info("SLURM worker jobs %s: up to %d, connecting to %s; logs in %s", self.name, self.settings.jobs, self.endpoint,
                 self.log_dir)
        self._thread.start()

    def supervise(self) -> None:
        """Called by the daemon's scheduler: look at the frames waiting (at most every SUPERVISE_EVERY_S) and wake the
        SLURM thread when the jobs wanted change. Only reads the dispatcher's counters: never blocks."""
        now = time.monotonic()
        if now - self._demand_at < SUPERVISE_EVERY_S:
            return
        self._demand_at = now
        wanted = self._wanted()
        with self._lock:
            changed, self.wanted = wanted != self.wanted, wanted
        if changed:
            self._wake.set()

    @property
    def unable(self) -> str | None:
        """Why no SLURM worker job can be had (one line), or None."""
        with self._lock:
            return self._unable

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return []  # the workers run under SLURM, not as this process's children

    def status(self) -> list[dict[str, Any]]:
        """Each job, running or recently ended: job_id, state (squeue's), reason, node, submitted_at, worker, log."""
        with self._lock:
            return [job.describe() for job in self.jobs.values()]

    def report(self) -> dict[str, Any]:
        """What `pipeline status` shows: the jobs' name, how many are wanted, each job, and why none can run if so."""
        return {"name": self.name, "endpoint": self.endpoint, "wanted": self.wanted, "max_jobs": self.settings.jobs,
                "logs": str(self.log_dir / f"{self.name}-%j.log"), "jobs": self.status(), "unable": self.unable}

    def retire(self) -> None:
        """From now on no job is submitted, and one that ends is no loss to replace: called before the dispatcher tells
        the workers to stop, as they then end their jobs within ms (cli._end_worker_now)."""
        with self._lock:
            self._retired = True

    def stop(self) -> None:
        """Cancel every job of this daemon (the dispatcher has told their workers to stop already)."""
        self.retire()
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.settings.command_timeout_s + 5)
        with self._lock:
            alive = [job.job_id for job in self.jobs.values() if not job.ended]
        if not alive and not self._sbatch_run:
            return self._remove_files()
        try:  # by name: also a job whose sbatch timed out here, which may have been submitted all the same
            self._run("scancel", [f"--name={self.name}", f"--user={_user()}"], timeout=min(self.settings.command_timeout_s, 15.0))
            if alive:
                log.info("SLURM worker jobs %s cancelled (the daemon stops)", ", ".join(alive))
        except SlurmError as error:
            log.warning("could not cancel the SLURM worker jobs %s (%s); cancel them with scancel --name=%s", ", ".join(alive) or "(none known)",
                        error, self.name)
        self._remove_files()

    def _remove_files(self) -> None:
        self.script.unlink(missing_ok=True)
        self.config_file.unlink(missing_ok=True)

    # -- demand -------------------------------------------------------------------------------------------------------

    def _wanted(self) -> int:
        """ceil(frames waiting for SLURM workers / credit), at least 1 while a scan is active, at most `jobs`."""
        stats = self.dispatcher.stats()
        held = sum(w["in_flight"] for w in stats["workers"] if str(w["name"]).startswith(WORKER_PREFIX))
        waiting = int(stats["queued"]) + held  # frames held by local or hand-started workers need no job
        wanted = math.ceil(waiting / max(1, self.config.workers.credit))
        if self.scans_active():
            wanted = max(wanted, 1)
        return min(wanted, self.settings.jobs)

    # -- the SLURM thread -------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        self._cancel_orphans()
        while not self._stop.is_set():
            try:
                self._refresh()
                if not self._stop.is_set():
                    self._scale()
            except Exception:  # nothing here may end the thread: the next round tries again
                log.exception("SLURM worker jobs: unexpected error")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def _cancel_orphans(self) -> None:
        """Cancel the worker jobs that daemons of this host and user which are gone (killed with kill -9, crashed) left:
        no other daemon would ever cancel them, and their workers wait for a daemon until workers.slurm.orphan_s. A job
        named for a process that still runs is left alone (another daemon of this host, or its process id taken again)."""
        prefix = self.name.rsplit("-", 1)[0] + "-"  # pipeline-worker-<host>-
        try:
            out = self._run("squeue", ["--noheader", f"--user={_user()}", "--states=PENDING,RUNNING,CONFIGURING,SUSPENDED,REQUEUED",
                                       "--format=%i|%j"])
        except SlurmError as error:
            log.debug("could not look for the jobs of daemons that are gone (%s)", error)
            return
        orphans: dict[str, list[str]] = {}
        for line in out.splitlines():
            job_id, _, name = line.strip().partition("|")
            pid = name.removeprefix(prefix)
            if name.startswith(prefix) and pid.isdigit() and name != self.name and not _process_exists(int(pid)):
                orphans.setdefault(pid, []).append(job_id)
        for pid, job_ids in orphans.items():
            try:
                self._run("scancel", job_ids)
            except SlurmError as error:
                log.warning("could not cancel the SLURM worker jobs %s of a daemon that is gone (pid %s): %s", ", ".join(job_ids), pid, error)
                continue
            log.warning("cancelled SLURM worker jobs %s: their daemon (pid %s on this host) is gone", ", ".join(job_ids), pid)

    def _refresh(self) -> None:
        """Ask squeue about this daemon's jobs: their states, and which ended."""
        try:
            out = self._run("squeue", ["--noheader", "--states=all", f"--name={self.name}", f"--user={_user()}", "--format=%i|%T|%r|%N"])
        except SlurmError as error:
            self._say(f"cannot ask squeue about the SLURM worker jobs ({error}); trying again", logging.WARNING)
            return
        listed: dict[str, tuple[str, str, str]] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 4:
                listed[parts[0]] = (parts[1], "" if parts[2] in ("None", "(null)") else parts[2], parts[3])
        joined = {str(w["name"]) for w in self.dispatcher.stats()["workers"]}
        now = time.monotonic()
        ended: list[SlurmJob] = []
        requeued: list[SlurmJob] = []
        with self._lock:
            for job in self.jobs.values():
                if not job.joined and f"{WORKER_PREFIX}{job.job_id}" in joined:
                    job.joined = True
                    self._failed_jobs = 0  # jobs work (again)
                    if self._unable is not None and "ended before their worker started" in self._unable:
                        self._unable = None
                if job.job_id in listed:
                    job.state, job.reason, job.node = listed[job.job_id]
                    job.seen_at = now
                    alive = job.state in ALIVE_STATES
                    if job.ended and alive:  # requeued after preemption: one of ours again
                        job.ended = job.reported = False
                        requeued.append(job)
                    elif not job.ended and not alive:
                        job.ended = True
                        ended.append(job)
                elif not job.ended and now - job.submitted_monotonic > SEEN_GRACE_S:
                    job.state, job.reason, job.ended = "GONE", "no longer known to SLURM", True
                    ended.append(job)
            # said once the state is final: COMPLETING (the job's processes being cleaned up) says nothing of why
            to_report = [job for job in self.jobs.values() if job.ended and not job.reported and job.state != "COMPLETING"]
            for job in to_report:
                job.reported = True
            finished = [key for key, job in self.jobs.items() if job.ended and job.reported]
            for key in finished[: max(0, len(finished) - KEEP_ENDED)]:
                del self.jobs[key]
        for job in ended:
            self._ended(job)
        for job in to_report:
            self._report(job)
        for job in requeued:
            log.warning("SLURM worker job %s was requeued (%s%s): it runs again when SLURM lets it; jobs beyond those wanted "
                        "are cancelled after workers.slurm.idle_s", job.job_id, job.state, f", {job.reason}" if job.reason else "")

    def _ended(self, job: SlurmJob) -> None:
        """A job has just ended: one that never started its worker counts towards the back-off (and `unable`)."""
        if job.cancelled:
            return
        job.started = job.joined or " connected to " in _tail(job.log)
        if job.started:
            self._failed_jobs = 0
            return
        self._failed_jobs += 1  # it ended before its worker started: a job that cannot work, not one that was stopped
        self._next_submit = time.monotonic() + min(RETRY_S[1], RETRY_S[0] * 2 ** (self._failed_jobs - 1))
        if self._failed_jobs >= GIVE_UP_JOBS:
            last = _last_line(job.log)
            self._set_unable(f"{self._failed_jobs} SLURM worker jobs in a row ended before their worker started; the last said: "
                             f"{last or 'nothing'} (log {job.log})")

    def _report(self, job: SlurmJob) -> None:
        """One log line for a job that ended, with its final state."""
        why = f"{job.state}{f', {job.reason}' if job.reason else ''}"
        with self._lock:
            retired = self._retired
        if job.cancelled:
            log.info("SLURM worker job %s ended (%s)", job.job_id, why)
        elif retired and job.started:
            log.info("SLURM worker job %s ended (%s): its worker stopped with the daemon", job.job_id, why)
        elif job.started:
            log.warning("SLURM worker job %s ended (%s); its frames go to other workers, and a new job is submitted while frames "
                        "wait", job.job_id, why)
        else:
            log.error("SLURM worker job %s ended (%s) before its worker started: %s (log %s)", job.job_id, why,
                      _last_line(job.log) or "no output", job.log)

    def _scale(self) -> None:
        """Submit jobs up to the number wanted; cancel the surplus once it has lasted idle_s."""
        with self._lock:
            if self._retired:
                return
            wanted = self.wanted
            alive = [job for job in self.jobs.values() if not job.ended and not job.cancelled]
        now = time.monotonic()
        if len(alive) < wanted:
            self._surplus_since = None
            if now >= self._next_submit:
                for _ in range(wanted - len(alive)):
                    if not self._submit():
                        break
            return
        if len(alive) == wanted:
            self._surplus_since = None
            return
        if self._surplus_since is None:
            self._surplus_since = now
        if now - self._surplus_since < self.settings.idle_s:
            return
        held = {str(w["name"]): int(w["in_flight"]) for w in self.dispatcher.stats()["workers"]}
        # those not running first, then those whose worker holds fewest frames, the newest first among equals
        order = sorted(alive, key=lambda j: (j.state == "RUNNING", held.get(f"{WORKER_PREFIX}{j.job_id}", 0), -j.submitted_at))
        self._cancel(order[: len(alive) - wanted], why=f"not needed for {self.settings.idle_s:g} s (workers.slurm.idle_s)")
        self._surplus_since = None

    def _submit(self) -> bool:
        arguments = self._sbatch_arguments()
        self._sbatch_run = True
        try:
            out = self._run("sbatch", arguments)
        except SlurmError as error:
            where = f"partition {self.settings.partition}" if self.settings.partition else "the default partition"
            reason = f"cannot submit SLURM worker jobs to {where}: {error}"
            self._failed_submits += 1
            self._next_submit = time.monotonic() + min(RETRY_S[1], RETRY_S[0] * 2 ** (self._failed_submits - 1))
            self._set_unable(reason)
            return False
        job_id = out.strip().split(";")[0].strip()
        if not job_id.isdigit():
            self._set_unable(f"sbatch --parsable answered {out.strip()[:100]!r}, not a job id")
            return False
        job = SlurmJob(job_id, time.time(), self.log_dir / f"{self.name}-{job_id}.log", submitted_monotonic=time.monotonic())
        with self._lock:
            self.jobs[job_id] = job
            if self._unable is not None and self._unable.startswith("cannot submit") and self._failed_jobs < GIVE_UP_JOBS:
                log.info("SLURM worker jobs are submitted again")
                self._unable = None
        self._failed_submits = 0
        self._said = {reason for reason in self._said if not reason.startswith("cannot submit")}
        log.info("SLURM worker job %s submitted (%s)", job_id, self.name)
        return True

    def _cancel(self, jobs: Sequence[SlurmJob], why: str) -> None:
        if not jobs:
            return
        try:
            self._run("scancel", [job.job_id for job in jobs])
        except SlurmError as error:
            self._say(f"cannot cancel SLURM worker jobs {', '.join(j.job_id for j in jobs)} ({error})", logging.WARNING)
            return
        with self._lock:
            for job in jobs:
                job.cancelled = True
        log.info("SLURM worker job(s) %s cancelled: %s", ", ".join(job.job_id for job in jobs), why)

    # -- helpers ------------------------------------------------------------------------------------------------------------

    def _sbatch_arguments(self) -> list[str]:
        s = self.settings
        arguments = ["--parsable", f"--job-name={self.name}", f"--output={self.log_dir / f'{self.name}-%j.log'}", "--open-mode=append",
                     f"--time={s.time_limit}", "--ntasks=1", f"--cpus-per-task={s.cpus_per_job}", f"--chdir={self.log_dir}"]
        if s.partition:
            arguments.append(f"--partition={s.partition}")
        if s.gpus_per_job:
            arguments.append(f"--gres=gpu:{s.gpus_per_job}")
        return [*arguments, *s.sbatch_args, str(self.script)]

    def _script_text(self) -> str:
        """The batch script: exec the worker, so scancel's SIGTERM reaches it (it finishes its batch and says bye)."""
        program = self.config.workers.command or [sys.executable, "-m", "pipeline", "worker"]
        options = ["--connect", self.endpoint, "--config", str(self.config_file), "--device", self.config.workers.device,
                   "--threads", str(self.settings.cpus_per_job), "--log-level", self.config.daemon.log_level,
                   "--leave-after", f"{self.settings.orphan_s:g}"]
        command = " ".join(shlex.quote(part) for part in [*program, *options])
        return (f"#!/bin/sh\n# A worker job of the pipeline daemon {self.name} (pid {os.getpid()} on {socket.gethostname()}), "
                "written by pipeline.cluster.slurm.\n"
                f'exec {command} --name "{WORKER_PREFIX}$SLURM_JOB_ID"\n')

    @staticmethod
    def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(path, mode)

    def _run(self, program: str, arguments: list[str], timeout: float | None = None) -> str:
        """A SLURM command's stdout; SlurmError with one line when it is missing, fails or overruns its deadline."""
        executable = str(self.settings.bin_dir / program) if self.settings.bin_dir else program
        try:
            result = subprocess.run([executable, *arguments], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                    timeout=timeout or self.settings.command_timeout_s)
        except FileNotFoundError:
            where = f"in {self.settings.bin_dir}" if self.settings.bin_dir else "on PATH (set workers.slurm.bin_dir)"
            raise SlurmError(f"{program} not found {where}") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{program} did not answer within {timeout or self.settings.command_timeout_s:g} s") from None
        except OSError as error:
            raise SlurmError(f"cannot run {executable}: {error.strerror or error}") from None
        if result.returncode != 0:
            raise SlurmError(f"{program}: {_one_line(result.stderr or result.stdout)}")
        return result.stdout

    def _set_unable(self, reason: str) -> None:
        with self._lock:
            self._unable = reason
        suffix = "; local workers carry on" if self.config.workers.local else "; frames wait for a worker"
        self._say(reason + suffix, logging.ERROR)

    def _say(self, line: str, level: int) -> None:
        """Log `line` once: a reason that repeats every poll is said the first time only."""
        if line not in self._said:
            self._said.add(line)
            log.log(level, "%s", line)


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: it exists
    return True


def _tail(path: Path, limit: int = 8192) -> str:
    """The end of a job's log (what its worker said last), or ''."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _last_line(path: Path) -> str:
    """The last non-empty line of a job's log, or ''."""
    lines = [line.strip() for line in _tail(path).splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
