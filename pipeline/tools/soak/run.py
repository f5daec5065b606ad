"""`Soak`: one soak from set-up to report (the daemon's config, the main loop, the checks at the end)."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.store import open_live, read_attributes, schema, store_status
from pipeline.tools.soak.faults import FaultInjector
from pipeline.tools.soak.hostile import HostileSenders, MisbehavingPeer
from pipeline.tools.soak.processes import DaemonProcess, Incarnation, RemoteWorkers
from pipeline.tools.soak.report import compare_with_process, daemon_figures, done_flags
from pipeline.tools.soak.scans import BadFile, GoodScan
from pipeline.tools.soak.settings import (
    MIB,
    MISBEHAVING_S,
    READY_TIMEOUT_S,
    RSS_EVERY_S,
    SOAK_HEARTBEAT_S,
    SOAK_IDLE_TIMEOUT_S,
    SOAK_TASK_TIMEOUT_S,
    SOAK_TIMEOUT_S,
    STATUS_EVERY_S,
    STORES_DISK_MIB,
    TICK_S,
    SoakError,
    SoakSettings,
    free_port,
)

if TYPE_CHECKING:
    import psutil

    from pipeline.config import Config

MODELS: tuple[Literal["tlm", "sslm"], ...] = ("tlm", "sslm")


class Soak:
    def __init__(self, settings: SoakSettings) -> None:
        self.settings = settings
        self.duration_s = settings.seconds
        self.rng = np.random.default_rng(settings.seed)
        self.scans: list[GoodScan] = []
        self.bad_files: list[BadFile] = []
        self.events: list[dict[str, Any]] = []  # every fault and notable happening, with its time
        self.hostile_senders = HostileSenders()
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []  # what makes the run fail besides lost/doubled/status
        self.warnings: list[str] = []  # what looks wrong but may cost nothing (e.g. a worker that never rejoined)
        self.audit: Counter[tuple[str, int]] = Counter()
        self.audit_pids: dict[tuple[str, int], list[int]] = {}
        self.audit_bad_lines = 0
        self._audit_offset = 0
        self.worker_peak_rss_mib = 0.0
        self.worker_peak_pid: int | None = None
        self.zombie_workers: dict[int, dict[str, Any]] = {}  # pid -> first seen alive but unknown to the dispatcher
        self.stalls: list[dict[str, Any]] = []
        self._last_status: dict[str, Any] | None = None
        self._last_status_at = 0.0
        self._last_rss_at = 0.0
        self.stalled_frozen: set[int] = set()  # workers stopped by a worker_stall fault (FaultInjector)
        self._ever_joined: set[int] = set()  # worker pids the dispatcher has listed at some point
        self._final: dict[Path, str] = {}  # stores whose status is final: complete or failed
        self._daemon: DaemonProcess | None = None  # made by run()
        self._remote: RemoteWorkers | None = None
        self.misbehaving: list[MisbehavingPeer] = []  # hung and rogue peers (FaultInjector)
        self.idle_connections: list[tuple[list[socket.socket], float]] = []  # (connections, close at)
        self.stores_disk: Path | None = None  # the stores' own small file system (disk_full fault), when one could be mounted
        self.fillers: list[tuple[Path, float]] = []  # (file filling it, delete at)
        self.t0 = time.time()

    # -- set-up ----------------------------------------------------------------------------

    def _config(self, root: Path) -> tuple[Path, Path, dict[str, Any]]:
        """The daemon's config (and one for `pipeline process`): the user's models and settings, our directories and timeouts."""
        import yaml

        from pipeline.config import ConfigError, load_config

        try:
            base = load_config(self.settings.config)
        except ConfigError as error:
            raise SoakError(str(error)) from None
        self._check_weights(base)
        control = f"tcp://127.0.0.1:{free_port()}"
        overrides: dict[str, Any] = {
            "watch.dirs": [str(self.watch)], "watch.resume_existing": True,
            "watch.rescan_interval_s": min(base.watch.rescan_interval_s, 2.0),
            "workers.local": self.settings.workers, "workers.timeout_s": SOAK_TIMEOUT_S, "workers.heartbeat_s": SOAK_HEARTBEAT_S,
            "workers.task_timeout_s": SOAK_TASK_TIMEOUT_S,
            "output.root": None if self.stores_disk is None else str(self.stores_disk), "output.resume_free_mib": 1.0,
            "follow.allowed_roots": [],  # the `link_outside` bad files link out of the watched directory: they must fail
            # remote workers need an endpoint that stays the same across daemon restarts
            "workers.bind": f"tcp://127.0.0.1:{free_port()}" if self.settings.remote_workers else None,
            "follow.idle_timeout_s": SOAK_IDLE_TIMEOUT_S,
            "follow.link_timeout_s": min(base.follow.link_timeout_s, 30.0),
            "follow.open_timeout_s": min(base.follow.open_timeout_s, 30.0),
            "daemon.control": control, "daemon.log_level": "INFO", "daemon.log_file": None,
            "daemon.metrics_port": None, "daemon.audit_log": str(self.audit_path),
        }
        if self.settings.device is not None:
            overrides["workers.device"] = self.settings.device
        try:
            config = base.with_overrides(overrides)
            offline = config.with_overrides({"daemon.audit_log": None, "daemon.control": f"tcp://127.0.0.1:{free_port()}",
                                             "watch.dirs": []})
        except ConfigError as error:
            raise SoakError(str(error)) from None
        live_path, offline_path = root / "soak.yaml", root / "offline.yaml"
        live_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        offline_path.write_text(yaml.safe_dump(offline.model_dump(mode="json"), sort_keys=False))
        self.worker_endpoint = config.workers.bind or ""  # remote workers only connect when it is set
        figures = {"control": control, "workers": self.settings.workers, "remote_workers": self.settings.remote_workers,
                   "device": config.workers.device,
                   "timeout_s": SOAK_TIMEOUT_S, "heartbeat_s": SOAK_HEARTBEAT_S, "idle_timeout_s": SOAK_IDLE_TIMEOUT_S,
                   "credit": config.workers.credit, "batch_size": config.workers.batch_size,
                   "weights": {name: str(getattr(config.models, name).weights or "shipped") for name in MODELS}}
        return live_path, offline_path, figures

    @staticmethod
    def _check_weights(config: Config) -> None:
        """Fail in one line before starting anything when weights are missing (the workers would only log it)."""
        from pipeline.store.provenance import missing_weights  # torch-free

        missing = missing_weights(config.models)
        if missing is not None:
            raise SoakError(missing)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        settings = self.settings
        if settings.json is not None and not settings.json.resolve().parent.is_dir():
            raise SoakError(f"cannot write {settings.json}: no directory {settings.json.resolve().parent}")
        temporary = settings.out is None
        root = Path(tempfile.mkdtemp(prefix="pipeline-soak-")) if settings.out is None else settings.out.resolve()
        if not temporary:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SoakError(f"cannot create {root}: {error.strerror}") from None
            if any(root.iterdir()):
                raise SoakError(f"{root} is not empty: give a new or empty directory")
        self.root, self.watch, self.logs = root, root / "scans", root / "logs"
        self.audit_path = root / "audit.jsonl"
        self.outside = root / "another-visit"  # outside the watched directory: where `link_outside` bad files point
        self.watch.mkdir()
        self.logs.mkdir()
        self.outside.mkdir()
        if "disk_full" in settings.faults:
            self.stores_disk = self._mount_stores_disk(root / "stores")
        try:
            live_config, offline_config, figures = self._config(root)
            self._daemon = DaemonProcess(live_config, self.watch, self.logs, figures["control"])
            self._remote = RemoteWorkers(settings.remote_workers, self.worker_endpoint, live_config, self.logs, self.event)
            report = self._run(figures, offline_config)
        finally:
            self._cleanup()
            self._unmount_stores_disk(keep=not temporary or settings.keep)
            if temporary and not settings.keep:
                shutil.rmtree(root, ignore_errors=True)
        report["outputs"] = str(root) if (not temporary or settings.keep) else None
        return report

    def _run(self, figures: dict[str, Any], offline_config: Path) -> dict[str, Any]:
        from tqdm import tqdm

        settings, daemon = self.settings, self.daemon
        started = time.time()
        daemon.start()
        self.remote.start()
        bar = tqdm(total=round(self.duration_s), desc="soak: starting", unit="s", file=sys.stderr, leave=False,
                   disable=not settings.progress or None, bar_format="{desc} |{bar}| {n:.0f}/{total} s {postfix}")
        try:
            self._wait_ready(READY_TIMEOUT_S)
            startup_s = time.time() - started
            self.t0 = time.time()
            self.injector = FaultInjector(self, settings, self.rng)
            bar.set_description_str("soak")
            while (elapsed := time.time() - self.t0) < self.duration_s:
                self._tick()
                self._feed_scans()
                self.injector.tick(elapsed)
                bar.n = min(elapsed, self.duration_s)
                bar.set_postfix_str(self._postfix(), refresh=False)
                bar.refresh()
                time.sleep(TICK_S)
            bar.set_description_str("soak: finishing")
            drain_started = time.time()
            self._drain(bar)
            drain_s = time.time() - drain_started
        finally:
            bar.close()
        if settings.remote_workers and daemon.current is not None and daemon.current.ready_at is not None:
            # give remote workers their chance to join the last daemon before judging them
            time.sleep(max(0.0, daemon.current.ready_at + 2 * SOAK_TIMEOUT_S + 1 - time.time()))
        self.sample_status(force=True)
        self.hostile_senders.close_all()
        how, survivors = daemon.stop()
        self.remote.stop()
        self._read_audit()
        if how != "stopped":
            self.problems.append(f"the daemon {how}")
        if survivors:
            self.problems.append(f"worker process(es) {survivors} outlived the daemon's SIGTERM")
        report = self._report(figures, startup_s, drain_s)
        if settings.compare:
            report["compare"] = compare_with_process(self.scans, offline_config, self.root / "offline")
            if report["compare"].get("equal") is False:
                report["passed"] = False
                report["problems"].append(f"store of {report['compare']['scan']} differs from `pipeline process`: "
                                          f"{report['compare']['difference']}")
        return report

    @property
    def daemon(self) -> DaemonProcess:
        if self._daemon is None:
            raise RuntimeError("the soak's daemon is made by Soak.run()")
        return self._daemon

    @property
    def remote(self) -> RemoteWorkers:
        if self._remote is None:
            raise RuntimeError("the soak's remote workers are made by Soak.run()")
        return self._remote

    def _remote_processes(self) -> list[psutil.Process]:
        return [] if self._remote is None else self._remote.running()

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the daemon answers and all its local workers have joined."""
        daemon = self.daemon
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            how = daemon.check_exit()
            if how is not None:
                tail = daemon.incarnations[-1].log.read_text()[-2000:]
                raise SoakError(f"the daemon {how} before it was ready: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
            status = daemon.status()
            incarnation = daemon.current
            if (status is not None and incarnation is not None
                    and len(status["dispatch"]["workers"]) >= self.settings.workers + self.settings.remote_workers):
                incarnation.ready_at = time.time()
                self._ever_joined |= {w["pid"] for w in status["dispatch"]["workers"]}
                return
            time.sleep(0.3)
        raise SoakError(f"the daemon's {self.settings.workers} worker(s) did not join within {timeout_s:g} s "
                        f"(see {daemon.incarnations[-1].log})")

    def _postfix(self) -> str:
        done = sum(self.audit.values())
        return (f"{len(self.scans)} scans, {done} frames done, {self.counts['daemon_restart']} restarts, "
                f"{self.counts['worker_kill']} worker kills, {self.counts['bad_file']} bad files, "
                f"{self.counts['hostile_sent']} hostile")

    def event(self, what: str, **detail: Any) -> None:
        self.events.append({"t": round(time.time() - self.t0, 2), "event": what, **detail})

    # -- every tick ----------------------------------------------------------------------------

    def _tick(self) -> None:
        daemon = self.daemon
        how = daemon.check_exit()
        if how is not None:  # the daemon died and not by our hand: a bug; note it and carry on with a new one
            self.problems.append(f"daemon pid {daemon.incarnations[-1].pid} {how} (see {daemon.incarnations[-1].log})")
            self.event("daemon_died", how=how, pid=daemon.incarnations[-1].pid)
            daemon.start()
        self.remote.supervise()
        self._read_audit()
        self._sample_rss()
        self.sample_status()
        current = daemon.current
        self.hostile_senders.service(current.pid if current is not None and daemon.alive() else None)

    def _read_audit(self) -> None:
        try:
            with self.audit_path.open("rb") as handle:
                handle.seek(self._audit_offset)
                data = handle.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._audit_offset += end + 1
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
                key = (Path(entry["scan"]).name, int(entry["frame"]))
            except (ValueError, KeyError, TypeError):
                self.audit_bad_lines += 1
                continue
            self.audit[key] += 1
            self.audit_pids.setdefault(key, []).append(entry.get("pid"))

    def _sample_rss(self) -> None:
        import psutil

        if time.monotonic() - self._last_rss_at < RSS_EVERY_S:
            return
        self._last_rss_at = time.monotonic()
        daemon = self.daemon
        incarnation = daemon.current
        if incarnation is None or not daemon.alive():
            return
        try:
            rss = psutil.Process(incarnation.pid).memory_info().rss / MIB
        except psutil.Error:
            return
        incarnation.peak_rss_mib = max(incarnation.peak_rss_mib, rss)
        if incarnation.first_rss_mib is None and incarnation.ready_at is not None:
            incarnation.first_rss_mib = rss
        incarnation.last_rss_mib = rss
        for worker in daemon.workers() + self._remote_processes():
            try:
                worker_rss = worker.memory_info().rss / MIB
            except psutil.Error:
                continue
            incarnation.worker_pids.add(worker.pid)
            if worker_rss > self.worker_peak_rss_mib:
                self.worker_peak_rss_mib, self.worker_peak_pid = worker_rss, worker.pid

    def sample_status(self, force: bool = False) -> dict[str, Any] | None:
        """The daemon's status (read at most every STATUS_EVERY_S unless `force`); None while it does not answer."""
        if not force and time.monotonic() - self._last_status_at < STATUS_EVERY_S:
            return self._last_status
        self._last_status_at = time.monotonic()
        daemon = self.daemon
        status = daemon.status(timeout_s=2.0 if force else 1.0)
        incarnation = daemon.current
        if status is None or incarnation is None:
            return None
        self._last_status = status
        dispatch = status["dispatch"]
        incarnation.rejected = max(incarnation.rejected, int(dispatch["rejected"]))
        incarnation.received = max(incarnation.received, int(dispatch.get("received", 0)))
        incarnation.status_at = time.time()
        if incarnation.ready_at is None and len(dispatch["workers"]) >= self.settings.workers:
            incarnation.ready_at = time.time()
        self._check_workers(status, incarnation)
        return status

    def _check_workers(self, status: dict[str, Any], incarnation: Incarnation) -> None:
        """Local workers alive but unknown to the dispatcher for long (dropped and never back), and a dispatcher whose
        workers all look silent for far longer than its own timeout (its thread is not running)."""
        dispatch = status["dispatch"]
        known = {w["pid"] for w in dispatch["workers"]}
        self._ever_joined |= known
        now = time.time()
        remote = {process.pid for process in self._remote_processes()}
        for process in self.daemon.workers() + self._remote_processes():
            if process.pid in remote and (incarnation.ready_at is None or now - incarnation.ready_at < 2 * SOAK_TIMEOUT_S):
                continue  # a remote worker gets its chance to join each new daemon
            if process.pid in known:
                self.zombie_workers.pop(process.pid, None)
                continue
            if process.pid in self.stalled_frozen:
                continue
            try:
                age = now - process.create_time()
            except Exception:
                continue
            if process.pid not in self._ever_joined and age < 120:  # still importing torch and loading models
                continue
            entry = self.zombie_workers.setdefault(process.pid, {"pid": process.pid, "daemon_pid": incarnation.pid,
                                                                 "first_seen_t": round(now - self.t0, 1), "reported": False,
                                                                 "remote": process.pid in remote})
            grace = 0 if process.pid in remote else 3 * SOAK_TIMEOUT_S  # a remote worker had its 2x timeout already
            if not entry["reported"] and now - self.t0 - entry["first_seen_t"] >= grace:
                entry["reported"] = True
                self.event("zombie_worker", pid=process.pid, daemon_pid=incarnation.pid)
        silent = [w["silent_s"] for w in dispatch["workers"]]
        if silent and min(silent) > 3 * SOAK_TIMEOUT_S and not any(s["daemon_pid"] == incarnation.pid for s in self.stalls):
            self.stalls.append({"daemon_pid": incarnation.pid, "t": round(now - self.t0, 1), "queued": dispatch["queued"],
                                "in_flight": dispatch["in_flight"], "workers_silent_s": silent,
                                "why": "every worker listed as silent for longer than 3x workers.timeout_s: "
                                       "the dispatcher thread is not running"})
            self.event("dispatcher_stuck", daemon_pid=incarnation.pid, silent_s=silent)

    # -- scans ---------------------------------------------------------------------------------

    def _status_of(self, store: Path) -> str | None:
        """A store's status; `complete` and `failed` are remembered (a daemon never reopens those)."""
        status = self._final.get(store)
        if status is None:
            status = store_status(store)
            if status in (schema.STATUS_COMPLETE, schema.STATUS_FAILED):
                self._final[store] = status
        return status

    def _unfinished_good(self) -> int:
        return sum(1 for scan in self.scans if self._status_of(scan.store) not in schema.FINAL_STATUSES)

    def _feed_scans(self) -> None:
        from pipeline.simulator.writers import LAYOUTS, ScanPlan, ScanWriter

        now = time.time()
        self._reap_writers()
        writing = sum(1 for scan in self.scans if scan.written_at is None)
        if writing >= self.settings.parallel or self._unfinished_good() >= self.settings.parallel + 2:
            return  # back-pressure: the daemon is behind (or down); do not pile up a backlog
        number = len(self.scans)
        layout = LAYOUTS[number % len(LAYOUTS)] if number < len(LAYOUTS) else str(self.rng.choice(LAYOUTS))
        low, high = self.settings.frames
        rate_low, rate_high = self.settings.rate
        plan = ScanPlan(directory=self.watch, name=f"soak-{number:04d}-{layout}", layout=layout,
                        n_frames=int(self.rng.integers(low, high + 1)), rate_hz=float(self.rng.uniform(rate_low, rate_high)),
                        seed=int(self.rng.integers(0, 2**31)),
                        link_delay_s=float(self.rng.choice([0.0, 0.0, 0.5, 1.5])) if layout != "nexus" else 0.0)
        self.scans.append(GoodScan(plan, ScanWriter(plan).start(), now, output_root=self.stores_disk))

    def _drain(self, bar: Any) -> None:
        """Let every scan finish: writers first, then every store (good and bad) reaching its final status."""
        deadline = time.monotonic() + self.settings.drain_timeout
        while time.monotonic() < deadline:
            self._tick()
            self._reap_writers()
            self.injector.thaw()  # faults still in progress end on time after the time is up, too
            self.free_space()
            self.close_idle_connections()
            pending = [s.store for s in self.scans if s.written_at is None or self._status_of(s.store) not in schema.FINAL_STATUSES]
            pending += [b.store for b in self.bad_files if not b.skipped and self._status_of(b.store) not in schema.FINAL_STATUSES]
            bar.set_postfix_str(f"{len(pending)} scans still running; {self._postfix()}", refresh=True)
            if not pending:
                return
            time.sleep(TICK_S)
        unfinished = [s.plan.name for s in self.scans if store_status(s.store) not in schema.FINAL_STATUSES]
        unfinished += [b.path.stem for b in self.bad_files if not b.skipped and store_status(b.store) not in schema.FINAL_STATUSES]
        self.problems.append(f"{len(unfinished)} scan(s) not finished {self.settings.drain_timeout:g} s after the time was up: "
                             f"{', '.join(unfinished[:8])}")

    def _reap_writers(self) -> None:
        now = time.time()
        for scan in self.scans:
            if scan.written_at is None and not scan.writer.is_alive():
                scan.written_at = now
                try:
                    scan.writer.join(timeout=1)
                except RuntimeError as error:
                    scan.writer_error = str(error)
                    self.problems.append(f"simulator: {error}")

    def _cleanup(self) -> None:
        self.hostile_senders.close_all()
        self.close_idle_connections(everything=True)
        for peer in self.misbehaving:
            peer.join(timeout=MISBEHAVING_S + 5)
        for scan in self.scans:
            if scan.writer.is_alive():
                scan.writer.kill()
        daemon = self._daemon
        if daemon is not None and daemon.alive():
            for worker in daemon.workers():
                try:
                    worker.resume()  # a worker left frozen by an interrupted worker_stall
                except Exception:
                    pass
            daemon.kill()
        if self._remote is not None:
            self._remote.kill()

    # -- the end ---------------------------------------------------------------------------------

    def free_space(self, everything: bool = False) -> None:
        """Delete the disk_full fault's fillers whose time is up (all of them at the end)."""
        keep = []
        for filler, until in self.fillers:
            if everything or time.monotonic() >= until:
                filler.unlink(missing_ok=True)
            else:
                keep.append((filler, until))
        self.fillers = keep

    def _mount_stores_disk(self, directory: Path) -> Path | None:
        """A tmpfs of STORES_DISK_MIB for the stores, so the disk_full fault fills only them; None where it cannot be mounted."""
        import subprocess

        directory.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORES_DISK_MIB}m", "tmpfs", str(directory)],
                                capture_output=True, text=True)
        return directory if result.returncode == 0 else None

    def _unmount_stores_disk(self, keep: bool) -> None:
        """Copy the stores off the tmpfs when the outputs are kept, then unmount it."""
        import subprocess

        disk = self.stores_disk
        if disk is None:
            return
        self.free_space(everything=True)
        if keep:
            shutil.copytree(disk, disk.with_name("stores-copy"), symlinks=True)
        subprocess.run(["umount", "-l", str(disk)], check=False)
        if keep:
            disk.rmdir()
            disk.with_name("stores-copy").rename(disk)

    def close_idle_connections(self, everything: bool = False) -> None:
        """Close the idle connections whose time is up (all of them at the end)."""
        keep = []
        for connections, until in self.idle_connections:
            if everything or time.monotonic() >= until:
                for connection in connections:
                    connection.close()
            else:
                keep.append((connections, until))
        self.idle_connections = keep

    def _forged_accepted(self, stores: list[Path]) -> list[str]:
        """Frames in `stores` that name a hung or rogue peer as their maker: forged (or never made) results accepted."""
        names = {peer.name for peer in self.misbehaving}
        found: list[str] = []
        for store in stores:
            try:
                worker = open_live(store)[schema.FRAMES_WORKER]
            except Exception:
                continue
            makers = list(worker.attrs.get(schema.WORKER_NAMES_ATTR, []))
            for number, maker in enumerate(makers, start=1):
                if maker in names:
                    frames = np.flatnonzero(worker[:] == number)
                    found += [f"{store.name} frame {int(i)} by {maker}" for i in frames]
        return found

    def _report(self, figures: dict[str, Any], startup_s: float, drain_s: float) -> dict[str, Any]:
        settings = self.settings
        daemon = self.daemon
        good = [s for s in self.scans if s.writer_error is None]
        scans: list[dict[str, Any]] = []
        lost_in_store = lost_in_audit = 0
        frames_written = frames_processed = 0
        lost_examples: list[str] = []
        incomplete: list[dict[str, Any]] = []
        for scan in good:
            n = scan.plan.n_frames
            frames_written += n
            attrs = read_attributes(scan.store) or {}
            done = done_flags(scan.store, n)
            audited = {frame for (name, frame) in self.audit if name == scan.plan.nxs_path.name}
            frames_processed += len(audited & set(range(n)))
            not_done = [i for i in range(n) if not done[i]]
            not_audited = [i for i in range(n) if done[i] and i not in audited]
            lost_in_store += len(not_done)
            lost_in_audit += len(not_audited)
            if not_done or not_audited:
                lost_examples.append(f"{scan.plan.name}: not done {not_done[:10]}, done without audit line {not_audited[:10]}")
            status = attrs.get(schema.Attr.STATUS)
            if status != schema.STATUS_COMPLETE:
                incomplete.append({"scan": scan.plan.name, "status": status, "end_reason": attrs.get(schema.Attr.END_REASON)})
            scans.append({"scan": scan.plan.name, "layout": scan.plan.layout, "frames": n, "rate_hz": round(scan.plan.rate_hz, 1),
                          "status": status, "end_reason": attrs.get(schema.Attr.END_REASON), "frames_done": int(sum(done)),
                          "resumed": schema.Attr.RESUMED_AT in attrs})
        doubled_keys = {key: count for key, count in self.audit.items() if count > 1}
        doubled = sum(count - 1 for count in doubled_keys.values())
        good_names = {s.plan.nxs_path.name for s in good}
        stray = sorted({name for (name, _) in self.audit if name not in good_names})
        bad: list[dict[str, Any]] = []
        bad_not_failed: list[str] = []
        for item in self.bad_files:
            attrs = read_attributes(item.store) or {}
            status = attrs.get(schema.Attr.STATUS)
            bad.append({"file": item.path.name, "kind": item.kind, "status": status, "end_reason": attrs.get(schema.Attr.END_REASON),
                        "skipped": item.skipped})
            if item.skipped:
                if status is not None:  # skipped, with no store: a store means it was taken for a scan
                    bad_not_failed.append(f"{item.path.name} ({item.kind}, to be skipped with no store): store {status}")
            elif status != schema.STATUS_FAILED:
                bad_not_failed.append(f"{item.path.name} ({item.kind}): {status}")
        failed_scans = [entry for entry in [*scans, *bad] if entry["status"] == schema.STATUS_FAILED]
        hostile_sent = self.counts["hostile_sent"]
        rejected = sum(i.rejected for i in daemon.incarnations)
        problems = list(self.problems)
        if bad_not_failed:
            problems.append(f"bad file(s) not failed: {', '.join(bad_not_failed[:8])}")
        if stray:
            problems.append(f"frames done for files that are not good scans: {', '.join(stray[:8])}")
        warnings = list(self.warnings)
        # defects that the soak's own restarts may have hidden: a daemon in production would not be restarted
        for entry in self.zombie_workers.values():
            if entry["reported"]:
                what = "remote worker" if entry.get("remote") else "worker"
                problems.append(f"{what} pid {entry['pid']} alive but unknown to the dispatcher of daemon {entry['daemon_pid']} "
                                f"(dropped or never admitted, and never rejoined) since t={entry['first_seen_t']} s")
        for stall in self.stalls:
            problems.append(f"daemon {stall['daemon_pid']} at t={stall['t']} s: {stall['why']} (it would have stalled for good)")
        for incarnation in daemon.incarnations:
            settled = incarnation.last_hostile_at is not None and incarnation.status_at - incarnation.last_hostile_at >= 10
            if settled and incarnation.rejected < incarnation.hostile_sent:
                problems.append(f"daemon {incarnation.pid} counted {incarnation.rejected} rejections for {incarnation.hostile_sent} "
                                f"hostile messages sent to it ({incarnation.received} messages of any kind read by its dispatcher)")
        forged = self._forged_accepted([s.store for s in good])
        if forged:
            problems.append(f"{len(forged)} frame(s) made by a hung or rogue peer were accepted: {', '.join(forged[:5])}")
        lost = lost_in_store + lost_in_audit
        passed = lost == 0 and doubled == 0 and not incomplete and not problems
        return {
            "passed": passed,
            "settings": {"seconds": self.duration_s, "seed": settings.seed, "faults": list(settings.faults),
                         "fault_every_s": settings.fault_every, "hostile_mix": settings.hostile_mix,
                         "frames": list(settings.frames), "rate_hz": list(settings.rate), "parallel": settings.parallel,
                         "config": None if settings.config is None else str(settings.config), **figures},
            "startup_s": round(startup_s, 1), "drain_s": round(drain_s, 1),
            "scans_written": len(good), "frames_written": frames_written, "frames_processed": frames_processed,
            "lost": lost, "lost_not_done": lost_in_store, "lost_not_audited": lost_in_audit, "lost_examples": lost_examples[:10],
            "doubled": doubled,
            "doubled_examples": [{"scan": k[0], "frame": k[1], "times": c, "pids": self.audit_pids.get(k)}
                                 for k, c in list(doubled_keys.items())[:10]],
            "audit_lines": sum(self.audit.values()), "audit_unreadable_lines": self.audit_bad_lines,
            "good_not_complete": incomplete,
            "failed_scans": failed_scans, "bad_files": bad, "bad_files_injected": len(self.bad_files),
            "restarts_survived": self.counts["daemon_restart"], "worker_kills": self.counts["worker_kill"],
            "worker_stalls": self.counts["worker_stall"],
            "hung_workers": self.counts["hung_worker"], "rogue_workers": self.counts["rogue_worker"],
            "forged_sent": sum(peer.forged_sent for peer in self.misbehaving),
            "frames_taken_by_misbehaving": sum(peer.frames_taken for peer in self.misbehaving),
            "forged_accepted": len(forged), "idle_connection_bursts": self.counts["idle_connections"],
            "disk_full_faults": self.counts["disk_full"] - self.counts["disk_full_skipped"],
            "disk_full_skipped": self.counts["disk_full_skipped"],
            "hostile_bursts": self.counts["hostile"], "hostile_sent": hostile_sent, "rejected": rejected,
            "scans_resumed": sum(1 for s in scans if s["resumed"]),
            "memory": {"daemon_peak_rss_mib": round(max((i.peak_rss_mib for i in daemon.incarnations), default=0.0), 1),
                       "worker_peak_rss_mib": round(self.worker_peak_rss_mib, 1), "worker_peak_pid": self.worker_peak_pid},
            "daemons": [daemon_figures(i) for i in daemon.incarnations],
            "orphaned_workers": self.counts["orphaned_workers"],
            "problems": problems,
            "warnings": warnings,
            "scans": scans,
            "events": self.events,
        }
