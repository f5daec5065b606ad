"""The labelling loop, closed on simulator scans: export, re-import, fine-tune, evaluate.

Three simulated scans (one per I16 layout) go through `pipeline process`; their stores are given
the simulator's true labels and exported with the project's own exporter to one DiPID-format CSV,
as a scientist would export predictions to correct them. The CSV is imported again against the
scans (mask -> polygon -> mask keeps every peak), both models are fine-tuned for a few steps on it
with whole scans held out, and `pipeline evaluate --labels` writes its figures as JSON.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.models.card import read_card
from pipeline.models.labels import export_store, load_labelled_frames
from pipeline.models.scoring import pairwise_iou
from pipeline.simulator.writers import LAYOUTS, ScanPlan, write_scan
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.stores import put_truth_labels

pytestmark = pytest.mark.daemon

N_FRAMES = 3  # frames per scan: 9 labelled frames, 3 held out; the models run on each several times (CPU time)


def _pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=900)


def test_export_import_fine_tune_and_evaluate_on_labelled_frames(tmp_path: Path, untrained_weights) -> None:
    scans = tmp_path / "scans"
    plans = [ScanPlan(directory=scans / layout, name=f"7{index}0{index}", layout=layout, n_frames=N_FRAMES, rate_hz=1000.0,
                      seed=30 + index, n_peaks=3) for index, layout in enumerate(LAYOUTS)]
    for plan in plans:
        write_scan(plan)
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)
    processed = _pipeline("process", "--config", str(config), "--no-progress", *[str(p.nxs_path) for p in plans])
    assert processed.returncode == 0, processed.stderr[-3000:]

    labels_csv = tmp_path / "labels.csv"
    rows: list[dict[str, str]] = []
    for plan in plans:
        store = plan.nxs_path.with_suffix(".zarr")
        put_truth_labels(store, plan.truth_path)
        exported = tmp_path / f"{plan.name}.csv"
        assert export_store(store, exported) == N_FRAMES
        with open(exported, newline="") as handle:
            rows += list(csv.DictReader(handle))
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["classification_id", "subject_data", "annotations", "subject_ids"])
        writer.writeheader()
        for number, row in enumerate(rows):
            writer.writerow({**row, "classification_id": str(1000 + number)})

    labelled = load_labelled_frames(labels_csv, scans)
    assert labelled.unpaired == [] and len(labelled.frames) == len(plans) * N_FRAMES
    worst = 1.0
    for frame in labelled.frames:
        plan = next(p for p in plans if p.name == frame.scan)
        with h5py.File(plan.truth_path, "r") as handle:
            truth = handle["labels"][frame.frame].astype(np.int64)
        ious, truth_ids, _ = pairwise_iou(frame.labels.astype(np.int64), truth)
        for row, peak in enumerate(truth_ids):
            if np.count_nonzero(truth == peak) >= 5:
                worst = min(worst, float(ious[row].max()) if ious.shape[1] else 0.0)
    assert worst >= 0.95, f"a peak came back from its polygon with IoU {worst:.3f}"

    weights = {}
    for model in ("tlm", "sslm"):
        run = tmp_path / f"run-{model}"
        trained = _pipeline("train", model, "--labels", str(labels_csv), "--scan-dir", str(scans), "--steps", "2", "--batch-size", "2",
                            "--init", str(untrained_weights[model]), "--hold-out", "0.34", "--out", str(run), "--device", "cpu",
                            "--no-progress")
        assert trained.returncode == 0, trained.stderr[-3000:]
        weights[model] = run / f"{model}.safetensors"
        card = read_card(weights[model])
        assert card is not None and card.steps == 2
        held = card.evaluation["labelled_held_out"]
        assert len(held["held_out_scans"]) == 1 and len(held["train_scans"]) == 2
        assert not set(held["held_out_scans"]) & set(held["train_scans"])  # whole scans on one side only
        assert held["csv_sha256"] in card.data and held["after"]["frames"] == N_FRAMES
        assert 0.0 <= held["after"]["mean_iou"] <= 1.0 and 0.0 <= held["before"]["f1"] <= 1.0
        assert json.loads((run / "losses.jsonl").read_text().splitlines()[-1])["step"] == 1

    figures = tmp_path / "figures.json"
    evaluated = _pipeline("evaluate", "--labels", str(labels_csv), "--scan-dir", str(scans), "--tlm", str(weights["tlm"]),
                          "--sslm", str(weights["sslm"]), "--json", str(figures))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"labelled: {len(plans) * N_FRAMES} frames of 3 scans" in evaluated.stdout
    report = json.loads(figures.read_text())
    assert report["labelled"]["frames"] == len(plans) * N_FRAMES and report["labelled"]["csv_sha256"] == labelled.csv_sha256
    true_instances = sum(len(np.unique(f.labels[f.labels > 0])) for f in labelled.frames)
    for method in ("tlm", "sslm", "union", "baseline", "baseline_significance"):
        summary = report["methods"][method]
        assert summary["frames"] == len(plans) * N_FRAMES and summary["true_instances"] == true_instances
        assert 0.0 <= summary["mean_iou"] <= 1.0
