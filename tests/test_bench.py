"""`pipeline bench` for real on a tiny scan: a live writer, the real daemon and worker, DiPID's way beside it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeline.testing.configs import write_config
from pipeline.tools.bench.command import add_parser, run_bench, worker_counts
from pipeline.tools.bench.measure import percentiles_ms

pytestmark = pytest.mark.daemon

FRAMES = 6


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_bench_measures_a_live_scan(tmp_path: Path, untrained_weights: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", untrained_weights)
    figures, trace = tmp_path / "bench.json", tmp_path / "rss.csv"
    args = _parse(["--config", str(config), "--frames", str(FRAMES), "--workers", "1", "--scale", "1",
                   "--baseline-frames", "2", "--json", str(figures), "--memory-trace", str(trace), "--no-progress"])
    assert run_bench(args) == 0

    printed = capsys.readouterr().out
    for heading in ("throughput", "latency (ms)", "time per frame", "peak memory", "scaling", "machine:"):
        assert heading in printed
    report = json.loads(figures.read_text())
    baseline, pipeline = report["baseline"], report["pipeline"]

    assert baseline["frames"] == 2 and baseline["fps"] > 0
    assert pipeline["frames_written"] == FRAMES and pipeline["frames_done"] == FRAMES
    assert pipeline["fps"] > 0
    assert report["ratio"] == pytest.approx(pipeline["fps"] / baseline["fps"], rel=1e-2)
    for latency in pipeline["latency_ms"].values():
        assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"]
    for stages in (pipeline["stages_ms"], baseline["stages_ms"]):
        assert all(value is not None and value >= 0 for value in stages.values()), stages
    memory = pipeline["memory"]
    assert memory["daemon_peak_rss_mib"] > 0
    assert len(memory["workers"]) == 1 and memory["workers"][0]["peak_rss_mib"] > 0
    assert memory["daemon_rss_at_10pct_mib"] > 0 and memory["daemon_rss_at_100pct_mib"] > 0
    assert [entry["workers"] for entry in report["scaling"]] == [1] and report["scaling"][0]["fps"] > 0
    assert sorted(row["frame"] for row in pipeline["per_frame"]) == list(range(FRAMES))
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    rows = trace.read_text().splitlines()
    assert rows[0] == "time_s,frames_done,process,pid,rss_mib" and len(rows) > 2


def test_bench_models_none_measures_the_daemons_own_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Workers answer at once with empty predictions: live and finished-file figures, beside DiPID's way without models."""
    figures = tmp_path / "bench.json"
    frames = 300  # enough for the CPU samples (every 0.2 s, in 10 ms ticks) to see every process at work
    args = _parse(["--models", "none", "--frames", str(frames), "--workers", "1", "--baseline-frames", "2",
                   "--json", str(figures), "--no-progress", "--keep", str(tmp_path / "kept")])
    assert run_bench(args) == 0
    printed = capsys.readouterr().out
    assert "tlm: disabled" in printed and "sslm: disabled" in printed
    assert "pipeline, finished file (every frame ready)" in printed and "no models: read, dead pixels, savez" in printed
    report = json.loads(figures.read_text())
    assert report["settings"]["models_mode"] == "none"
    assert report["pipeline"]["frames_done"] == frames and report["pipeline"]["writer_fps"] > 0
    finished = report["finished_file"]
    assert finished["frames_done"] == frames and finished["fps"] > 0
    assert (report["pipeline"]["stages_ms"]["tlm"] or 0.0) < 1.0  # no model ran: microseconds of bookkeeping
    assert report["settings"]["distinct_frames"] == 64  # the fast writer: synthesised once, written over and over
    cpu, by_thread = report["pipeline"]["cpu_ms_per_frame"], report["pipeline"]["daemon_cpu_ms_per_frame_by_thread"]
    assert cpu["daemon"] > 0 and cpu["workers"] > 0 and cpu["writer"] > 0  # measured, per process, while frames flowed
    assert cpu["readers"] > 0 and "daemon's readers (HDF5)" in printed  # HDF5 runs in reader processes: their CPU counts too
    assert {"follow (read frames)", "dispatch (ZeroMQ, results)", "sink (link, write)"} <= set(by_thread)
    assert sum(by_thread.values()) <= cpu["daemon"] * 1.5 + 1.0  # the threads' share adds up to about the process's
    assert "CPU per frame (ms, user + system)" in printed and "sink (link, write)" in printed
    from pipeline.store import StoreReader, schema

    for store in (tmp_path / "kept").rglob("*.zarr"):
        reader = StoreReader(store)
        assert reader.status == schema.STATUS_COMPLETE and reader.done_frames().tolist() == list(range(frames))
        assert int(reader.group[schema.TLM_LABELS][:].max()) == 0  # empty predictions, really


def test_bench_models_threshold_measures_the_daemon_with_masks_that_hold_something(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The stand-in workers' masks are the pixels above 20 counts: the stores hold exactly those, frame by frame, and
    the 3D volume links them (with --models none every mask would be empty, the daemon's cheapest case)."""
    import numpy as np

    from pipeline.store import StoreReader, schema
    from pipeline.tools.bench.stand_in_worker import THRESHOLD_COUNTS

    frames = 80
    figures = tmp_path / "bench.json"
    args = _parse(["--models", "threshold", "--frames", str(frames), "--workers", "1", "--baseline-frames", "0",
                   "--json", str(figures), "--no-progress", "--keep", str(tmp_path / "kept")])
    assert run_bench(args) == 0
    printed = capsys.readouterr().out
    assert "masks: the workers' stand-in, the pixels above 20 counts" in printed
    report = json.loads(figures.read_text())
    assert report["settings"]["models_mode"] == "threshold" and report["finished_file"]["frames_done"] == frames
    stores = sorted((tmp_path / "kept").rglob("*.zarr"))
    assert len(stores) == 2  # live and finished file
    for store in stores:
        reader = StoreReader(store)
        assert reader.status == schema.STATUS_COMPLETE and reader.done_frames().tolist() == list(range(frames))
        with reader.raw_frames() as raw:
            expected = raw[:frames] > THRESHOLD_COUNTS
        np.testing.assert_array_equal(reader.group[schema.SSL_MASK][:frames], expected.astype(np.uint8), err_msg=str(store))
        np.testing.assert_array_equal(reader.group[schema.TLM_LABELS][:frames], expected.astype(np.uint16))
        with_peaks = expected.reshape(frames, -1).any(axis=1)
        assert 0 < with_peaks.sum() < frames  # frames with and without: both kinds of write ran
        volume = reader.group[schema.VOLUME_LABELS][:frames]
        assert (volume[~with_peaks] == 0).all() and volume[with_peaks].max() > 0


@pytest.mark.parametrize("argv", [["--frames", "0"], ["--scale", "1,x"], ["--rate", "-3"], ["--workers", "two"]])
def test_bad_arguments_give_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        _parse(argv)
    assert stopped.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bad_settings_give_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--frames", "3", "--baseline-frames", "5"], ["--config", str(tmp_path / "missing.yaml")],
                 ["--json", str(tmp_path / "no" / "such" / "dir.json")]):
        assert run_bench(_parse(argv)) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_figures_helpers() -> None:
    assert worker_counts("1, 2,4,2") == [1, 2, 4]
    figures = percentiles_ms([0.001 * i for i in range(1, 101)])
    assert figures["p50"] <= figures["p95"] <= figures["p99"]
    assert percentiles_ms([]) == {"p50": None, "p95": None, "p99": None}
