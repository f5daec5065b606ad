"""The figures as a readable table: what `pipeline bench` prints (`--json` keeps them all)."""

from __future__ import annotations

from typing import Any

from pipeline.tools.bench.measure import FLUSH_POLL_S


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The figures as a readable table."""
    machine, settings, pipeline = report["machine"], report["settings"], report["pipeline"]
    baseline = report.get("baseline")
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"GPU: {machine['gpu'] or 'none'}, torch {machine['torch']}, nice {machine['nice']}, "
        f"load {machine['load_average_1m']} at start",
        f"scan: {settings['layout']}, {settings['frames']} frames written live at {settings['rate_hz']:g} Hz"
        f"{'' if not settings.get('distinct_frames') else ' (' + str(settings['distinct_frames']) + ' distinct frames, repeated)'}; "
        f"device {settings['device']} ({settings['resolved_device']}), batch {settings['batch_size']}, credit {settings['credit']}, "
        f"precision {settings.get('precision', 'float32')}",
    ]
    for name in ("tlm", "sslm"):
        model = settings["models"][name]
        lines.append(f"{name}: {model['weights']} (sha256 {model['sha256'][:12]})" if model.get("enabled") else f"{name}: disabled")
    if settings.get("models_mode") == "threshold":
        lines.append("masks: the workers' stand-in, the pixels above 20 counts (pipeline.tools.bench.stand_in_worker)")
    lines += ["", f"{'throughput':<44}{'frames/s':>10}"]
    if baseline:
        what = "TLM at 800" if settings["models"]["tlm"].get("enabled") else "no models: read, dead pixels, savez"
        lines.append(f"  {'baseline, DiPID way (' + str(baseline['frames']) + ' frames, ' + what + ')':<42}{_cell(baseline['fps'], 2):>10}")
    workers = f"{pipeline['workers']} worker{'s' if pipeline['workers'] > 1 else ''}"
    done = f"{pipeline['frames_done']}/{pipeline['frames_written']} frames done"
    lines.append(f"  {'pipeline (' + workers + ', ' + done + ')':<42}{_cell(pipeline['fps'], 2):>10}")
    if pipeline.get("writer_fps") is not None:
        lines.append(f"  {'  (the writer wrote at)':<42}{_cell(pipeline['writer_fps'], 1):>10}")
    finished = report.get("finished_file")
    if finished:
        lines.append(f"  {'pipeline, finished file (every frame ready)':<42}{_cell(finished['fps'], 2):>10}")
    if report.get("ratio") is not None:
        lines.append(f"  {'ratio pipeline / baseline':<42}{report['ratio']:>9.1f}x")
    lines += ["", f"{'latency (ms)':<34}{'p50':>10}{'p95':>10}{'p99':>10}"]
    for key, label in (("flush_to_done", "frame flushed -> frames/done"), ("queued_to_done", "frame read -> frames/done")):
        figures = pipeline["latency_ms"][key]
        lines.append(f"  {label:<32}{_cell(figures['p50']):>10}{_cell(figures['p95']):>10}{_cell(figures['p99']):>10}")
    lines += ["", f"{'time per frame (ms, mean)':<34}{'baseline':>10}{'pipeline':>10}"]
    base_stages = baseline["stages_ms"] if baseline else {}
    rows = (("read", "read", "read"), ("queue_in_daemon", None, "queue in daemon (read -> sent)"),
            ("preprocess", "preprocess", "dead pixels + normalise"),
            ("transfer", None, "transfer (+ wait in worker)"), ("tlm", "tlm", "TLM"), ("sslm", "sslm", "SSLM"),
            ("volume_linking", None, "3D volume linking"), ("write", "write", "write"))
    for key, base_key, label in rows:
        base = base_stages.get(base_key) if base_key else None
        lines.append(f"  {label:<32}{_cell(base, 2):>10}{_cell(pipeline['stages_ms'][key], 2):>10}")
    lines.append("  (pipeline: worker stages are per frame of a batch; workers run side by side)")
    cpu = pipeline.get("cpu_ms_per_frame") or {}
    finished_cpu = (finished or {}).get("cpu_ms_per_frame") or {}
    if cpu:
        lines += ["", f"{'CPU per frame (ms, user + system)':<34}{'live':>10}{'finished':>10}"]
        for role, label in (("daemon", "daemon (follow, dispatch, sink)"), ("readers", "daemon's readers (HDF5)"),
                            ("workers", "workers, all together"),
                            ("writer", "the simulated detector")):
            lines.append(f"  {label:<32}{_cell(cpu.get(role), 2):>10}{_cell(finished_cpu.get(role), 2):>10}")
        threads = pipeline.get("daemon_cpu_ms_per_frame_by_thread") or {}
        finished_threads = (finished or {}).get("daemon_cpu_ms_per_frame_by_thread") or {}
        for stage in dict.fromkeys([*threads, *finished_threads]):
            lines.append(f"    {stage:<30}{_cell(threads.get(stage), 2):>10}{_cell(finished_threads.get(stage), 2):>10}")
    memory = pipeline.get("memory") or {}
    if memory:
        lines += ["", f"{'peak memory (RSS, MiB)':<34}{'peak':>10}"]
        lines.append(f"  {'daemon (this process)':<32}{_cell(memory['daemon_peak_rss_mib'], 0):>10}"
                     f"   at 10% of frames {_cell(memory['daemon_rss_at_10pct_mib'], 0)}, "
                     f"at 100% {_cell(memory['daemon_rss_at_100pct_mib'], 0)}")
        for worker in memory["workers"] + memory.get("readers", []):
            lines.append(f"  {worker['process'] + ' (pid ' + str(worker['pid']) + ')':<32}{_cell(worker['peak_rss_mib'], 0):>10}")
    lines += ["", f"{'scaling':<34}{'frames/s':>10}"]
    for entry in report["scaling"]:
        label = f"{entry['workers']} worker{'s' if entry['workers'] > 1 else ''}"
        lines.append(f"  {label:<32}{_cell(entry['fps'], 2):>10}")
    lines += ["", "latency counts from when this process saw the writer's frame counter pass the frame (polled every "
                  f"{FLUSH_POLL_S * 1000:g} ms); at a writer rate above the pipeline's, frames wait in the file and latency grows."]
    return "\n".join(lines)

