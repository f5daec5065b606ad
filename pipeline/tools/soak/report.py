"""The soak's figures: the pieces of the report that need no `Soak` (a store's done flags, one daemon's figures,
the comparison with `pipeline process`) and the printout of the whole report."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.store import open_live, read_attributes, schema, store_status, stores_difference
from pipeline.tools.soak.processes import Incarnation
from pipeline.tools.soak.scans import GoodScan

PROCESS_TIMEOUT_S = 600


def done_flags(store: Path, n: int) -> list[bool]:
    """Whether each of the first `n` frames is done in `store` (all False when it cannot be read)."""
    try:
        done = open_live(store)[schema.FRAMES_DONE][:]
    except Exception:
        return [False] * n
    return [bool(i < done.shape[0] and done[i] == 1) for i in range(n)]


def daemon_figures(incarnation: Incarnation) -> dict[str, Any]:
    """One daemon process's line of the report."""
    i = incarnation
    return {"number": i.number, "pid": i.pid, "how_ended": i.how_ended,
            "lived_s": round((i.ended or time.time()) - i.started, 1), "rejected": i.rejected,
            "received": i.received,
            "hostile_sent": i.hostile_sent, "peak_rss_mib": round(i.peak_rss_mib, 1),
            "rss_when_ready_mib": None if i.first_rss_mib is None else round(i.first_rss_mib, 1),
            "rss_last_mib": None if i.last_rss_mib is None else round(i.last_rss_mib, 1),
            "worker_pids": sorted(i.worker_pids), "log": str(i.log)}


def compare_with_process(scans: Sequence[GoodScan], offline_config: Path, out: Path) -> dict[str, Any]:
    """One good scan (preferably one resumed after a daemon kill) against `pipeline process` of the same file into `out`."""
    complete = [s for s in scans if s.writer_error is None and store_status(s.store) == schema.STATUS_COMPLETE]
    if not complete:
        return {"scan": None, "equal": None, "difference": "no complete scan to compare"}
    resumed = [s for s in complete if schema.Attr.RESUMED_AT in (read_attributes(s.store) or {})]
    scan = (resumed or complete)[0]
    command = [sys.executable, "-m", "pipeline", "process", "--config", str(offline_config), "--output-root", str(out),
               "--workers", "1", "--no-progress", str(scan.plan.nxs_path)]
    started = time.time()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"scan": scan.plan.name, "equal": None, "difference": f"`pipeline process` took over {PROCESS_TIMEOUT_S} s"}
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return {"scan": scan.plan.name, "equal": None, "difference": f"`pipeline process` failed: {last}"}
    difference = stores_difference(scan.store, out / scan.store.name)
    return {"scan": scan.plan.name, "resumed": bool(resumed), "equal": difference is None, "difference": difference,
            "seconds": round(time.time() - started, 1)}


# --------------------------------------------------------------------------- the printout


def format_report(report: dict[str, Any]) -> str:
    settings = report["settings"]
    memory = report["memory"]
    lines = [
        f"soak: {settings['seconds'] / 60:.1f} min, seed {settings['seed']}, {settings['workers']} workers on {settings['device']}, "
        f"faults {','.join(settings['faults']) or 'none'} about every {settings['fault_every_s']:g} s, "
        f"hostile mix {settings['hostile_mix']}",
        f"weights: tlm {settings['weights']['tlm']}, sslm {settings['weights']['sslm']}",
        f"daemon ready after {report['startup_s']:.0f} s; last scans finished {report['drain_s']:.0f} s after the time was up",
        "",
        f"scans written (good)         {report['scans_written']:>8}   ({report['scans_resumed']} resumed after a daemon kill)",
        f"frames written               {report['frames_written']:>8}",
        f"frames processed             {report['frames_processed']:>8}   (distinct in the audit log)",
        f"lost                         {report['lost']:>8}   ({report['lost_not_done']} not done in the store, "
        f"{report['lost_not_audited']} done without an audit line)",
        f"doubled                      {report['doubled']:>8}",
        f"good scans not complete      {len(report['good_not_complete']):>8}",
        f"failed scans                 {len(report['failed_scans']):>8}   (bad files injected: {report['bad_files_injected']})",
        f"daemon restarts survived     {report['restarts_survived']:>8}",
        f"worker kills                 {report['worker_kills']:>8}",
    ]
    if report["worker_stalls"]:
        lines.append(f"worker stalls (SIGSTOP)      {report['worker_stalls']:>8}")
    if report["hung_workers"] or report["rogue_workers"]:
        lines += [
            f"hung / rogue peers           {report['hung_workers']:>4} / {report['rogue_workers']:<4}   took "
            f"{report['frames_taken_by_misbehaving']} frames, sent {report['forged_sent']} forged results",
            f"forged results accepted      {report['forged_accepted']:>8}",
        ]
    if report["idle_connection_bursts"]:
        lines.append(f"idle-connection bursts       {report['idle_connection_bursts']:>8}")
    if report["disk_full_faults"] or report["disk_full_skipped"]:
        skipped = f"   ({report['disk_full_skipped']} skipped: no tmpfs without root)" if report["disk_full_skipped"] else ""
        lines.append(f"stores' disk filled          {report['disk_full_faults']:>8}{skipped}")
    lines += [
        f"hostile messages sent        {report['hostile_sent']:>8}   in {report['hostile_bursts']} bursts",
        f"rejected by the daemons      {report['rejected']:>8}   (" + ", ".join(
            f"pid {d['pid']}: {d['rejected']} of {d['hostile_sent']} sent" for d in report["daemons"] if d["hostile_sent"] or d["rejected"]) + ")",
        f"peak RSS daemon              {memory['daemon_peak_rss_mib']:>8.0f} MiB",
        f"peak RSS worker              {memory['worker_peak_rss_mib']:>8.0f} MiB",
    ]
    for entry in report["failed_scans"]:
        lines.append(f"  failed: {entry.get('file') or entry.get('scan')}: {entry['end_reason']}")
    for entry in report["good_not_complete"]:
        lines.append(f"  NOT COMPLETE: {entry['scan']}: {entry['status']} ({entry['end_reason']})")
    for example in report["lost_examples"]:
        lines.append(f"  LOST: {example}")
    for example in report["doubled_examples"]:
        lines.append(f"  DOUBLED: {example['scan']} frame {example['frame']} done {example['times']} times (pids {example['pids']})")
    lines.append("daemon processes (pid: how it ended, lifetime, RSS when ready -> at the end, peak):")
    for d in report["daemons"]:
        ready = "-" if d["rss_when_ready_mib"] is None else f"{d['rss_when_ready_mib']:.0f}"
        last = "-" if d["rss_last_mib"] is None else f"{d['rss_last_mib']:.0f}"
        lines.append(f"  {d['pid']}: {d['how_ended']}, {d['lived_s']:.0f} s, {ready} -> {last} MiB, peak {d['peak_rss_mib']:.0f} MiB")
    compare = report.get("compare")
    if compare:
        if compare.get("equal"):
            lines.append(f"store of {compare['scan']}{' (resumed)' if compare.get('resumed') else ''} equals `pipeline process` "
                         f"of the same file, frame by frame")
        else:
            lines.append(f"compare with `pipeline process`: {compare.get('scan')}: {compare.get('difference')}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    for warning in report.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    if report.get("outputs"):
        lines.append(f"outputs kept in {report['outputs']}")
    lines.append("PASSED: nothing lost or doubled; every good scan complete, every bad file failed (or, with no detector frames, "
                 "skipped with no store)" if report["passed"] else "FAILED")
    return "\n".join(lines)
