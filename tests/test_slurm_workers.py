"""SLURM worker jobs the daemon manages, against a real SLURM on this machine (scripts/slurm/start.sh).

The daemon submits its own `pipeline worker` jobs with sbatch and watches them with squeue. A job cancelled
(scancel) or preempted (a job of a higher-priority partition, PreemptMode=REQUEUE) mid-scan loses no frame and
doubles none: its worker's frames go to the next one, and the store ends complete with each frame done once (the
daemon's audit log). A stopped daemon leaves no job behind; an unknown partition is one line, and a local worker
carries the scan; a slurmctld that does not answer never holds up the daemon's scheduler.

Workers run without models and sleep per frame on purpose (pipeline.testing.slow_worker), so that a scan lasts
long enough to be interrupted and costs little CPU on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config
from pipeline.live.control import query_status
from pipeline.simulator.writers import ScanPlan, ScanWriter, write_scan
from pipeline.store import open_live
from pipeline.testing.configs import MODELS_OFF, control_endpoint, free_port, write_config
from pipeline.testing.daemons import poll, start_daemon, stop_daemon, wait_for_status, wait_until
from pipeline.testing.slow_worker import DELAY_ENV
from pipeline.testing.stores import done_count

pytestmark = pytest.mark.daemon

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("PIPELINE_SLURM_DIR", "/tmp/pipeline-slurm"))


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    """A single-node SLURM on localhost, started by the repository's script (installed first if missing)."""
    already_up = subprocess.run(["sinfo", "--noheader"], capture_output=True).returncode == 0 if _on_path("sinfo") else False
    result = subprocess.run(["bash", str(REPO / "scripts/slurm/start.sh")], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"scripts/slurm/start.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    yield
    if not already_up:
        subprocess.run(["bash", str(REPO / "scripts/slurm/stop.sh")], capture_output=True, timeout=120)


def _on_path(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def _config(tmp_path: Path, slurm: dict[str, Any], local: int = 0, web: dict[str, Any] | None = None, **workers: Any) -> Path:
    return write_config(tmp_path / "config.yaml", models=MODELS_OFF,
                        workers={"local": local, "credit": 2, "batch_size": 1, "timeout_s": 10.0, **workers,
                                 "command": [sys.executable, "-m", "pipeline.testing.slow_worker"],
                                 "slurm": {"jobs": 1, "partition": "pipeline", "cpus_per_job": 1, "poll_s": 0.5, "idle_s": 3.0,
                                           "log_dir": str(tmp_path / "slurm"), **slurm}},
                        daemon={"audit_log": str(tmp_path / "audit.jsonl")},
                        # the jobs' copy of the config leaves the web token out (dumped as `**********`, it would not load)
                        web=web or ({"token": "a-token-of-20-chars"} if not local else {}))


def _status(config: Path) -> dict[str, Any]:
    status = query_status(control_endpoint(config), timeout_s=5.0)
    assert status is not None, "the daemon stopped answering"
    return status


def _jobs(config: Path) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = _status(config)["slurm_workers"]["jobs"]
    return jobs


def _squeue(*arguments: str) -> list[list[str]]:
    """squeue's rows (`|`-separated fields) for the given options."""
    out = subprocess.run(["squeue", "--noheader", *arguments], capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.strip().split("|") for line in out.splitlines() if line.strip()]


def _job_state(job_id: str) -> str:
    rows = _squeue("--states=all", f"--jobs={job_id}", "--format=%T")
    return rows[0][0] if rows else "GONE"


def _start(config: Path, scans: Path, log: Path, delay_s: float, monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen[bytes]:
    with monkeypatch.context() as patch:  # only this daemon's workers (the job inherits sbatch's environment) are slow
        patch.setenv(DELAY_ENV, str(delay_s))
        return start_daemon(config, scans, log)


def _frames_done_once(tmp_path: Path, daemon: subprocess.Popen[bytes], plan: ScanPlan) -> None:
    """The store complete, every frame done, and the audit log saying each frame was done exactly once."""
    group = open_live(plan.nxs_path.with_suffix(".zarr"))
    assert group.attrs["status"] == "complete", dict(group.attrs)
    assert group["frames/done"][:].tolist() == [1] * plan.n_frames
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    done = sorted(line["frame"] for line in lines if line["pid"] == daemon.pid and line["scan"] == str(plan.nxs_path))
    assert done == list(range(plan.n_frames)), done


def test_a_job_cancelled_mid_scan_is_replaced_and_every_frame_is_done_once(slurm: None, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    scans = tmp_path / "scans"
    plan = ScanPlan(directory=scans, name="cancelled", layout="nexus", n_frames=24, rate_hz=1000.0, seed=71)
    write_scan(plan)
    config = _config(tmp_path, {})
    daemon = _start(config, scans, tmp_path / "daemon.log", 0.3, monkeypatch)
    store = plan.nxs_path.with_suffix(".zarr")
    try:
        wait_until(lambda: done_count(store) >= 4, 90, "4 frames done by the first SLURM job")
        first = _jobs(config)
        assert [job["state"] for job in first] == ["RUNNING"], first
        job_id = first[0]["job_id"]
        assert first[0]["worker"] == f"slurm-{job_id}" and first[0]["log"].endswith(f"-{job_id}.log")
        shown = subprocess.run([sys.executable, "-m", "pipeline", "status", "--config", str(config)], capture_output=True, text=True,
                               timeout=30).stdout
        assert f"slurm job {job_id}: RUNNING" in shown, shown  # what a person at the beamline sees
        subprocess.run(["scancel", job_id], check=True, timeout=30)  # SIGTERM to the worker, mid-scan
        wait_for_status([store], timeout=120)
        status = _status(config)
        jobs = {job["job_id"]: job for job in status["slurm_workers"]["jobs"]}
        dispatch = status["dispatch"]
        # then, the scan done and nothing waiting, the replacement is cancelled after idle_s (3 s)
        wait_until(lambda: all(_job_state(j) in ("CANCELLED", "COMPLETED", "GONE") for j in _jobs_of(config)), 30,
                   "the idle replacement job cancelled")
    finally:
        stop_daemon(daemon)
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert jobs[job_id]["state"] == "CANCELLED", jobs
    replacements = [j for j in jobs if j != job_id]
    assert len(replacements) == 1 and int(replacements[0]) > int(job_id), jobs
    assert f"worker slurm-{replacements[0]} joined" in log
    assert dispatch["redispatched"] >= 1, dispatch  # the cancelled worker held frames: they went to the replacement
    assert (dispatch["failed"], dispatch["rejected"]) == (0, 0), dispatch
    assert "not needed for 3 s (workers.slurm.idle_s)" in log
    _frames_done_once(tmp_path, daemon, plan)


def _jobs_of(config: Path) -> list[str]:
    return [job["job_id"] for job in _jobs(config)]


def test_a_job_preempted_by_a_higher_priority_partition_loses_nothing(slurm: None, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    scans = tmp_path / "scans"
    plan = ScanPlan(directory=scans, name="preempted", layout="nexus", n_frames=24, rate_hz=1000.0, seed=72)
    write_scan(plan)
    config = _config(tmp_path, {"idle_s": 60.0})
    daemon = _start(config, scans, tmp_path / "daemon.log", 0.3, monkeypatch)
    store = plan.nxs_path.with_suffix(".zarr")
    urgent = None
    try:
        wait_until(lambda: done_count(store) >= 4, 90, "4 frames done by the SLURM job")
        job_id = _jobs_of(config)[0]
        # a job of the `urgent` partition (PriorityTier 10) asking for every CPU: SLURM requeues the worker's job
        urgent = subprocess.run(["sbatch", "--parsable", "--partition=urgent", f"--cpus-per-task={os.cpu_count()}", "--job-name=urgent",
                                 f"--output={tmp_path / 'urgent.log'}", "--wrap=sleep 4"],
                                capture_output=True, text=True, check=True, timeout=30).stdout.strip().split(";")[0]
        wait_until(lambda: _job_state(urgent) == "RUNNING", 30, "the urgent job running")
        wait_until(lambda: _job_state(job_id) == "PENDING", 30, "the worker's job requeued")
        done_at_preemption = done_count(store)
        # a requeued job waits ~120 s (BeginTime) before it may run again: let it run as soon as the node is free
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)
        wait_for_status([store], timeout=120)
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
        dispatch = _status(config)["dispatch"]
    finally:
        stop_daemon(daemon)
        if urgent:
            subprocess.run(["scancel", urgent], timeout=30)
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert done_at_preemption < plan.n_frames  # preempted mid-scan
    assert "Restarts=1" in show, show  # the very job ran again after the preemption
    assert log.count(f"worker slurm-{job_id} joined") >= 1
    assert (dispatch["failed"], dispatch["rejected"]) == (0, 0), dispatch
    _frames_done_once(tmp_path, daemon, plan)


def test_a_stopped_daemon_leaves_no_job_in_squeue(slurm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its jobs connect over TCP with CurveZMQ, as jobs on other nodes do (the key file on a file system they see)."""
    from pipeline.live.security import generate_keys

    scans = tmp_path / "scans"
    scans.mkdir()
    _, secret = generate_keys(tmp_path / "keys", "daemon")
    address = f"tcp://127.0.0.1:{free_port()}"
    config = _config(tmp_path, {"jobs": 2, "idle_s": 60.0, "endpoint": address}, bind=address, curve_secret_key=str(secret))
    daemon = _start(config, scans, tmp_path / "daemon.log", 0.5, monkeypatch)
    plan = ScanPlan(directory=scans, name="live", layout="gda9", n_frames=200, rate_hz=5.0, seed=73)
    writer = ScanWriter(plan).start()  # a live scan: the daemon wants its jobs until it stops
    try:
        wait_until(lambda: done_count(plan.nxs_path.with_suffix(".zarr")) >= 2, 90, "2 frames done by a SLURM job")
        report = _status(config)["slurm_workers"]
        name = report["name"]
        assert report["endpoint"] == address
        assert _squeue(f"--name={name}", "--format=%i|%T"), "no job of the daemon in squeue while it works"
    finally:
        stop_daemon(daemon)
        writer.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]
    assert name.startswith("pipeline-worker-")
    job_logs = sorted((tmp_path / "slurm").glob(f"{name}-*.log"))
    assert any(f"connected to {address}" in path.read_text() for path in job_logs), [p.read_text()[-500:] for p in job_logs]
    alive = _squeue(f"--name={name}", "--states=PENDING,RUNNING,CONFIGURING,SUSPENDED", "--format=%i|%T")
    assert alive == [], alive  # cancelled before the daemon exited
    assert poll(lambda: not _squeue(f"--name={name}", "--format=%i|%T"), timeout=30), _squeue(f"--name={name}", "--format=%i|%T")
    at_stop = log[log.index("SIGTERM: draining"):]
    # each job either still ran and was cancelled, or its worker stopped when told to: neither is a crash to replace
    for job_id in {line.split("job ")[1].split()[0] for line in log.splitlines() if "submitted (" in line}:
        assert re.search(rf"jobs [0-9, ]*\b{job_id}\b[0-9, ]* cancelled \(the daemon stops\)", at_stop) or \
            f"job {job_id} ended (COMPLETED): its worker stopped with the daemon" in at_stop, at_stop
    assert "a new job is submitted" not in at_stop and "submitted (" not in at_stop, at_stop


def test_an_unknown_partition_is_one_line_and_a_local_worker_completes_the_scan(slurm: None, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    scans = tmp_path / "scans"
    plan = ScanPlan(directory=scans, name="local", layout="nexus", n_frames=8, rate_hz=1000.0, seed=74)
    write_scan(plan)
    config = _config(tmp_path, {"partition": "nosuch"}, local=1)
    daemon = _start(config, scans, tmp_path / "daemon.log", 0.0, monkeypatch)
    try:
        wait_for_status([plan.nxs_path.with_suffix(".zarr")], timeout=120)
        wait_until(lambda: _status(config)["slurm_workers"]["unable"], 30, "the SLURM part saying why it has no job")
        slurm_status = _status(config)["slurm_workers"]
    finally:
        stop_daemon(daemon)
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]
    expected = "cannot submit SLURM worker jobs to partition nosuch: sbatch: Batch job submission failed: Invalid partition name specified"
    assert slurm_status["unable"] == expected, slurm_status
    assert slurm_status["jobs"] == []
    lines = [line for line in log.splitlines() if "cannot submit SLURM worker jobs" in line]
    assert len(lines) == 1 and lines[0].endswith(expected + "; local workers carry on"), lines
    _frames_done_once(tmp_path, daemon, plan)


def test_a_slurmctld_that_does_not_answer_never_holds_up_the_scheduler(slurm: None, tmp_path: Path) -> None:
    """sbatch against a stopped slurmctld hangs: it runs on the SLURM thread under a deadline, and `supervise`, called by the
    daemon's scheduler every ~0.1 s, returns at once all the while."""
    from pipeline.cluster.slurm import SlurmWorkers
    from pipeline.live.dispatch import Dispatcher

    config = Config.model_validate({"workers": {"local": 0, "slurm": {"partition": "pipeline", "cpus_per_job": 1, "poll_s": 0.2,
                                                                       "command_timeout_s": 2.0, "log_dir": str(tmp_path / "slurm")}}})
    dispatcher = Dispatcher(config.workers, lambda *_: None).start()
    workers = SlurmWorkers(config, dispatcher, scans_active=lambda: True)
    controller = int((SLURM_DIR / "run/slurmctld.pid").read_text())
    os.kill(controller, signal.SIGSTOP)
    try:
        workers.start()
        slowest = 0.0
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and workers.unable is None:
            started = time.perf_counter()
            workers.supervise()
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.1)
        unable = workers.unable
    finally:
        os.kill(controller, signal.SIGCONT)
        workers.stop()
        dispatcher.stop()
    assert unable is not None and "did not answer within 2 s" in unable, unable
    assert slowest < 0.05, slowest
    assert workers.status() == []


def test_no_sbatch_is_one_line_naming_where_it_was_looked_for(tmp_path: Path) -> None:
    from pipeline.cluster.slurm import SlurmWorkers
    from pipeline.live.dispatch import Dispatcher

    empty = tmp_path / "bin"
    empty.mkdir()
    config = Config.model_validate({"workers": {"local": 1, "slurm": {"partition": "pipeline", "bin_dir": str(empty), "poll_s": 0.2,
                                                                       "log_dir": str(tmp_path / "slurm")}}})
    dispatcher = Dispatcher(config.workers, lambda *_: None).start()
    workers = SlurmWorkers(config, dispatcher, scans_active=lambda: True)
    try:
        workers.start()
        workers.supervise()
        assert poll(lambda: workers.unable is not None, timeout=10)
    finally:
        workers.stop()
        dispatcher.stop()
    assert workers.unable == f"cannot submit SLURM worker jobs to partition pipeline: sbatch not found in {empty}"
    assert workers.status() == [] and workers.processes() == []
    assert not (tmp_path / "slurm" / f"{workers.name}.json").exists()  # its files are gone with it


def test_jobs_follow_the_frames_waiting_from_none_to_the_most_and_back_and_the_web_page_lists_them(
        slurm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, browser: Any) -> None:
    """No scan: no job. 40 frames waiting with credit 2: the most jobs (3; the node's 2 CPUs run two, the third waits for
    resources). The scan done: every job cancelled after idle_s. The daemon's own web page lists the jobs as squeue has them."""
    from pipeline.testing.web import wait_in_page

    scans = tmp_path / "scans"
    scans.mkdir()
    web_port = free_port()
    config = _config(tmp_path, {"jobs": 3}, web={"port": web_port, "token": "a-token-of-20-chars", "poll_interval_s": 0.5})
    daemon = _start(config, scans, tmp_path / "daemon.log", 0.5, monkeypatch)
    plan = ScanPlan(directory=scans, name="backlog", layout="nexus", n_frames=40, rate_hz=1000.0, seed=75)
    store = plan.nxs_path.with_suffix(".zarr")
    try:
        wait_until(lambda: query_status(control_endpoint(config), timeout_s=2.0) is not None, 60, "the daemon answering")
        time.sleep(3.0)  # several rounds of the SLURM thread (poll_s 0.5) with nothing to do
        idle = _status(config)["slurm_workers"]
        name = idle["name"]
        assert (idle["wanted"], idle["jobs"], _squeue(f"--name={name}", "--format=%i")) == (0, [], []), idle
        write_scan(plan)
        wait_until(lambda: len(_jobs(config)) == 3, 60, "three jobs submitted for 40 frames waiting")
        busy = _status(config)["slurm_workers"]
        assert busy["wanted"] == 3 and busy["max_jobs"] == 3, busy
        browser.get(f"http://127.0.0.1:{web_port}/?token=a-token-of-20-chars")
        shown = wait_in_page(browser, "(document.getElementById('daemon') || {}).textContent.includes(' RUNNING on ') && "
                                      "document.getElementById('daemon').textContent", 30, "the SLURM jobs on the front page")
        wait_for_status([store], timeout=120)
        wait_until(lambda: all(job["state"] == "CANCELLED" for job in _jobs(config)), 30, "every job cancelled once nothing waits")
        after = _status(config)["slurm_workers"]
        assert not _squeue(f"--name={name}", "--states=PENDING,RUNNING,CONFIGURING", "--format=%i")
    finally:
        stop_daemon(daemon)
    log = (tmp_path / "daemon.log").read_text()
    assert daemon.returncode == 0, log[-3000:]
    submitted = re.findall(r"SLURM worker job (\d+) submitted", log)
    assert len(submitted) == 3, submitted  # no more than workers.slurm.jobs, and no replacement: none ended on its own
    ours = [job["job_id"] for job in busy["jobs"]]
    assert "; SLURM job " in shown and any(f"job {job_id} RUNNING on " in shown for job_id in ours), (ours, shown)
    assert after["wanted"] == 0 and len(after["jobs"]) == 3, after
    assert "not needed for 3 s (workers.slurm.idle_s)" in log
    _frames_done_once(tmp_path, daemon, plan)


def test_a_daemon_killed_with_kill_9_leaves_no_job_holding_the_node(slurm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody cancels the jobs of a daemon killed with kill -9. The next daemon started on the same host cancels them at
    once; were there none, each job's worker would end once the daemon had been unreachable for orphan_s (its script
    says `--leave-after`; tests/test_worker_leave_after.py has a worker do so), here 600 s: not what ends the job."""
    scans = tmp_path / "scans"
    scans.mkdir()
    config = _config(tmp_path, {"orphan_s": 600.0})
    killed = _start(config, scans, tmp_path / "killed.log", 0.5, monkeypatch)
    plan = ScanPlan(directory=scans, name="orphaned", layout="gda9", n_frames=200, rate_hz=5.0, seed=76)
    writer = ScanWriter(plan).start()
    successor, name = None, "none"
    try:
        wait_until(lambda: done_count(plan.nxs_path.with_suffix(".zarr")) >= 2, 90, "2 frames done by a SLURM job")
        (job_id,) = _jobs_of(config)
        name = _status(config)["slurm_workers"]["name"]
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        time.sleep(2.0)
        assert _job_state(job_id) == "RUNNING"  # its worker waits for the daemon to come back
        gone_at = time.monotonic()
        successor = _start(config, tmp_path / "elsewhere", tmp_path / "successor.log", 0.5, monkeypatch)
        wait_until(lambda: _job_state(job_id) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), 60, f"job {job_id} ended")
        took = time.monotonic() - gone_at
        state = _job_state(job_id)
    finally:
        writer.kill()
        if successor is not None:
            stop_daemon(successor)
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
    script = (tmp_path / "slurm" / f"{name}.sh").read_text()  # left behind by the killed daemon
    assert " --leave-after 600 " in script, script
    log = (tmp_path / "successor.log").read_text()
    assert f"cancelled SLURM worker jobs {job_id}: their daemon (pid {killed.pid} on this host) is gone" in log, log[-3000:]
    assert state == "CANCELLED" and took < 40, (state, took)
