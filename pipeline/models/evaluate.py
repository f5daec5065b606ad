"""Held-out evaluation of TLM, SSLM, their union and a classical baseline, on the same frames.

The held-out set is made with another seed AND other generator settings than training
(`HELD_OUT_SETTINGS`: a brighter diffuse background, more streaks and hot pixels), plus a few
rocking scans for 3D recall. Figures, per method:

- mean IoU: per frame, IoU of the binary peak mask against the truth mask; a frame whose truth
  and prediction are both empty counts 1 (nothing to find, nothing claimed); then the mean.
- instance precision / recall / F1 at IoU 0.5: predicted instances are TLM instances, or the
  8-connected components (>= `MIN_COMPONENT_PX` pixels) of a mask for SSLM, union and baseline;
  matched to truth peaks greedily by decreasing IoU, one-to-one, pairs with IoU >= 0.5.
- 3D recall: per rocking scan the per-frame masks are linked into 3D components
  (`JointPredictor.compile_volume`, 26-connectivity); a true 3D peak counts as found when one
  component has voxel IoU >= 0.5 with it.
- real frames (`real_frames` in the report; default the 8 shipped Pilatus modules of a thaumatin crystal,
  `pipeline.models.real_frames`): real frames have no outlines, so nothing there is scored against a
  truth. Counted instead, per method: detections (TLM) and frames whose detections reached the TLM's
  cap (`FramePrediction.detections_capped`); reference spots (a classical spot finder: >= 3 pixels
  > 6 sigma above the local background) covered by the method's mask; the share of its instances
  (TLM instances, SSLM components) lying on a reference spot. Seconds per frame as above.
- baselines: threshold + connected components on the log-count input (`to_model_input`, what
  DiPID's models see) and on the background-subtracted significance input (`to_significance`,
  what an SSLM with `input_transform: significance` sees, so that the SSLM is compared with a
  threshold on its own input); each threshold tuned for mean IoU on training-distribution frames,
  never on the held-out set.
- backends: where ONNX Runtime is installed and the models run on the CPU, the same frames also go through
  `OnnxJointPredictor` (`models.backend: onnxruntime`, graphs exported into the ONNX cache in this process), frame
  for frame right after torch: its figures for the models (`backends` in the report) and how far its masks agree
  with torch's (same detection count per frame, equal TLM label and SSLM cluster pixels). torch's figures stay the
  report's main ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.joint import JointPredictor
from pipeline.models.preprocess import fix_dead_pixels, to_model_input, to_significance
from pipeline.models.real_frames import REAL_MODULES, instances_on_spots, load_frames, reference_spots, spots_covered
from pipeline.models.scoring import components, mask_iou, match_instances
from pipeline.models.training_data import training_frames
from pipeline.simulator import synth

METHODS = ("tlm", "sslm", "union", "baseline", "baseline_significance")
MODEL_METHODS = ("tlm", "sslm", "union")  # what a backend changes; the baselines do not run a model
BASELINE_INPUTS = {"baseline": "log", "baseline_significance": "significance"}
HELD_OUT_SETTINGS = synth.SynthSettings(
    background=3.0, diffuse_amplitude=18.0, streak_probability=0.5, hot_pixels_mean=4.0, dead_pixel_fraction=1e-3
)


@dataclass
class Tally:
    """Running sums for one method."""

    ious: list[float] = field(default_factory=list)
    matched: int = 0
    predicted: int = 0
    truths: int = 0
    found_3d: int = 0
    peaks_3d: int = 0
    components_3d: int = 0

    def add_frame(self, predicted_instances: np.ndarray, truth: np.ndarray) -> None:
        self.ious.append(mask_iou(predicted_instances > 0, truth > 0))
        matched, predicted, truths = match_instances(predicted_instances, truth)
        self.matched += matched
        self.predicted += predicted
        self.truths += truths

    def summary(self) -> dict[str, float]:
        precision = self.matched / self.predicted if self.predicted else 1.0
        recall = self.matched / self.truths if self.truths else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "mean_iou": float(np.mean(self.ious)) if self.ious else float("nan"),
            "precision": precision, "recall": recall, "f1": f1,
            "recall_3d": self.found_3d / self.peaks_3d if self.peaks_3d else float("nan"),
            "frames": len(self.ious), "predicted_instances": self.predicted, "true_instances": self.truths,
            "true_peaks_3d": self.peaks_3d, "predicted_components_3d": self.components_3d,
        }


@dataclass
class Agreement:
    """How far a second backend's masks agree with torch's, frame by frame."""

    frames: int = 0
    same_detection_count: int = 0
    tlm_pixels_equal: int = 0
    sslm_pixels_equal: int = 0
    pixels: int = 0

    def add(self, reference: Any, other: Any) -> None:
        self.frames += 1
        self.same_detection_count += len(reference.detections) == len(other.detections)
        self.tlm_pixels_equal += int(np.count_nonzero(reference.tlm_labels == other.tlm_labels))
        self.sslm_pixels_equal += int(np.count_nonzero(reference.ssl_clusters == other.ssl_clusters))
        self.pixels += reference.tlm_labels.size

    def summary(self) -> dict[str, float]:
        pixels = max(self.pixels, 1)
        return {"frames": self.frames, "same_detection_count": self.same_detection_count,
                "tlm_pixels_equal": self.tlm_pixels_equal / pixels, "sslm_pixels_equal": self.sslm_pixels_equal / pixels}


@dataclass
class BackendRun:
    """One backend's predictor and running sums; `agreement` (not the first run's) compares it with the first."""

    predictor: Any
    tallies: dict[str, Tally] = field(default_factory=lambda: {method: Tally() for method in METHODS})
    seconds: dict[str, float] = field(default_factory=lambda: {"preprocess": 0.0, "tlm": 0.0, "sslm": 0.0})
    agreement: Agreement = field(default_factory=Agreement)


def default_backends(device: str) -> list[str]:
    """torch, and onnxruntime too where it is installed and the models run on the CPU (`pipeline evaluate` prints both)."""
    from pipeline.models.backends import cuda_device_count, onnxruntime_installed

    on_cpu = device == "cpu" or (device == "auto" and cuda_device_count() == 0)
    return ["torch", "onnxruntime"] if on_cpu and onnxruntime_installed() else ["torch"]


def _other_runs(settings: Any, device: str, backends: Sequence[str] | None) -> tuple[list[BackendRun], dict[str, str]]:
    """Runs of the backends besides torch (onnxruntime), and the reason for each one that could not start."""
    runs, failed = [], {}
    for backend in (default_backends(device) if backends is None else backends):
        if backend == "torch":
            continue
        if backend != "onnxruntime":
            raise ValueError(f"unknown backend {backend!r} (torch, onnxruntime)")
        try:
            from pipeline.models import onnx_export
            from pipeline.models.onnx_predictor import OnnxJointPredictor

            runs.append(BackendRun(OnnxJointPredictor(settings, threads=0, exporter=onnx_export.export_in_process)))
        except Exception as error:  # an export failing leaves torch's figures standing; the report says why
            from pipeline.errors import one_line

            failed[backend] = f"{type(error).__name__}: {one_line(error)}"
    return runs, failed


def _backend_reports(runs: list[BackendRun], failed: dict[str, str], timed_frames: int, real_frames: Path | None,
                     batch_size: int) -> dict[str, Any]:
    """The `backends` part of a report: per other backend, its model figures and its agreement with torch."""
    reports: dict[str, Any] = {name: {"error": reason} for name, reason in failed.items()}
    for run in runs:
        reports["onnxruntime"] = {
            "methods": {method: run.tallies[method].summary() for method in MODEL_METHODS},
            "seconds_per_frame": {stage: value / max(timed_frames, 1) for stage, value in run.seconds.items()},
            "agreement": run.agreement.summary(),
            **({"real_frames": real_frame_case(run.predictor, real_frames, batch_size)} if real_frames is not None else {}),
            "models": run.predictor.provenance(),
        }
    return reports


def tune_baseline_threshold(seed: int = 0, frames: int = 48, input_transform: str = "log") -> float:
    """The threshold on the `input_transform` input with the best mean IoU on training-distribution frames."""
    inputs, labels = [], []
    for index in range(frames):
        frame_inputs, frame_labels = training_frames(seed, 2_000_000 + index, 1, input_transform)
        inputs.append(frame_inputs[0])
        labels.append(frame_labels[0])
    candidates = np.round(np.arange(0.10, 0.60, 0.01), 3)
    scores = [
        np.mean([mask_iou(components(x > t) > 0, y > 0) for x, y in zip(inputs, labels)]) for t in candidates
    ]
    return float(candidates[int(np.argmax(scores))])


def model_settings(config: Path | None, tlm: Path | None, sslm: Path | None, precision: str | None = None) -> Any:
    """The `models` section of `config` (default: the packaged config), with weights paths and precision overridden."""
    from pipeline.config import ModelSettings, load_config

    settings = load_config(config).models if config is not None else ModelSettings()
    data = settings.model_dump()
    for name, path in (("tlm", tlm), ("sslm", sslm)):
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"{path}: weights file not found")
            data[name]["weights"] = Path(path)
    if precision is not None:
        data["precision"] = precision
    return ModelSettings.model_validate(data)


def baseline_inputs(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each baseline's input for one raw frame."""
    fixed = fix_dead_pixels(counts)
    return {"baseline": to_model_input(fixed), "baseline_significance": to_significance(fixed)}


def _instances(prediction: Any, method: str, thresholds: dict[str, float], inputs: dict[str, np.ndarray]) -> np.ndarray:
    if method == "tlm":
        return prediction.tlm_labels
    if method == "sslm":
        return components(prediction.ssl_mask)
    if method == "union":
        return components((prediction.tlm_labels > 0) | (prediction.ssl_mask > 0))
    return components(inputs[method] > thresholds[method])


def _predictor_and_thresholds(settings: Any, device: str, baseline_thresholds: dict[str, float] | None) -> tuple[JointPredictor, dict[str, float]]:
    predictor = JointPredictor.from_settings(settings, device=device)
    thresholds = dict(baseline_thresholds or {})
    for method, input_transform in BASELINE_INPUTS.items():
        if method not in thresholds:
            thresholds[method] = tune_baseline_threshold(input_transform=input_transform)
    return predictor, thresholds


def _tally_frames(predictor: JointPredictor, frames: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: dict[str, float],
                  tallies: dict[str, Tally], seconds: dict[str, float], batch_size: int,
                  others: Sequence[BackendRun] = ()) -> int:
    """Every method on (raw counts, true instance labels) pairs, `batch_size` frames per prediction; returns the frames seen.

    `others`: more backends, each run on the same batch right after `predictor` and compared with it.
    """
    timed = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal timed
        batch = np.stack([counts for counts, _ in pending])
        predictions = predictor.predict_batch(batch)
        other_predictions = [run.predictor.predict_batch(batch) for run in others]
        for index, ((counts, truth), prediction) in enumerate(zip(pending, predictions)):
            inputs = baseline_inputs(counts)
            for method in METHODS:
                tallies[method].add_frame(_instances(prediction, method, thresholds, inputs), truth)
            for stage in seconds:
                seconds[stage] += prediction.timings.get(stage, 0.0)
            for run, predicted in zip(others, other_predictions):
                other = predicted[index]
                for method in MODEL_METHODS:
                    run.tallies[method].add_frame(_instances(other, method, thresholds, inputs), truth)
                for stage in run.seconds:
                    run.seconds[stage] += other.timings.get(stage, 0.0)
                run.agreement.add(prediction, other)
            timed += 1
        pending.clear()

    for pair in frames:
        pending.append(pair)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return timed


def real_frame_case(predictor: JointPredictor, path: Path = REAL_MODULES, batch_size: int = 4) -> dict[str, Any]:
    """What the models find on real frames without outlines (module docstring): counts, cap hits, reference spots."""
    frames, sources = load_frames(path)
    rows: list[dict[str, Any]] = []
    seconds = {"preprocess": 0.0, "tlm": 0.0, "sslm": 0.0}
    for first in range(0, len(frames), batch_size):
        batch = frames[first:first + batch_size]
        for frame, source, prediction in zip(batch, sources[first:first + batch_size], predictor.predict_batch(batch)):
            spots = reference_spots(frame)
            sslm_components = components(prediction.ssl_mask)
            rows.append({
                "source": source, "shape": list(frame.shape), "reference_spots": int(spots.max()),
                "tlm_detections": len(prediction.detections), "tlm_capped": prediction.detections_capped,
                "tlm_cap": prediction.detection_cap, "tlm_spots_covered": spots_covered(spots, prediction.tlm_labels),
                "tlm_instances_on_spots": instances_on_spots(prediction.tlm_labels, spots),
                "sslm_components": int(sslm_components.max()), "sslm_spots_covered": spots_covered(spots, prediction.ssl_mask),
                "sslm_components_on_spots": instances_on_spots(sslm_components, spots),
            })
            for stage in seconds:
                seconds[stage] += prediction.timings.get(stage, 0.0)

    def total(key: str) -> int:
        return int(sum(row[key] for row in rows))

    def share(part: int, whole: int) -> float:
        return part / whole if whole else float("nan")

    spot_count = total("reference_spots")
    return {
        "path": str(path), "frames": len(rows), "reference_spots": spot_count,
        "tlm": {"detections": total("tlm_detections"), "max_detections": max(row["tlm_detections"] for row in rows),
                "frames_at_cap": total("tlm_capped"), "caps": sorted({row["tlm_cap"] for row in rows}),
                "spots_covered": share(total("tlm_spots_covered"), spot_count),
                "instances_on_spots": share(total("tlm_instances_on_spots"), total("tlm_detections"))},
        "sslm": {"components": total("sslm_components"), "spots_covered": share(total("sslm_spots_covered"), spot_count),
                 "instances_on_spots": share(total("sslm_components_on_spots"), total("sslm_components"))},
        "seconds_per_frame": {stage: value / len(rows) for stage, value in seconds.items()},
        "per_frame": rows,
    }


def evaluate(
    settings: Any, frames: int = 200, scans: int = 4, scan_frames: int = 30, seed: int = 12345,
    device: str = "cpu", batch_size: int = 4, baseline_thresholds: dict[str, float] | None = None,
    real_frames: Path | None = REAL_MODULES, backends: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Figures for every method on the held-out set (and on `real_frames`, unless None); see the module docstring.

    `backends`: which run the models (torch always; None: `default_backends(device)`).
    """
    predictor, thresholds = _predictor_and_thresholds(settings, device, baseline_thresholds)
    others, failed = _other_runs(settings, device, backends)
    tallies = {method: Tally() for method in METHODS}
    seconds = {"preprocess": 0.0, "tlm": 0.0, "sslm": 0.0}
    held_out = (synth.training_sample(np.random.default_rng([seed, index]), HELD_OUT_SETTINGS) for index in range(frames))
    timed_frames = _tally_frames(predictor, held_out, thresholds, tallies, seconds, batch_size, others)
    for scan_index in range(scans):
        scan = synth.RockingScan(scan_frames, seed=seed + 1000 + scan_index, settings=HELD_OUT_SETTINGS)
        counts_and_truth = [scan.frame(i) for i in range(scan_frames)]
        predictions = list(predictor.predict_scan((c for c, _ in counts_and_truth), batch_size=batch_size))
        truth_volume = np.stack([truth for _, truth in counts_and_truth])
        runs: list[tuple[Any, dict[str, Tally], Sequence[str]]] = [(predictions, tallies, METHODS)]
        for run in others:
            other_predictions = [run.predictor.predict_batch(counts[None])[0] for counts, _ in counts_and_truth]
            for prediction, other in zip(predictions, other_predictions):
                run.agreement.add(prediction, other)
            runs.append((other_predictions, run.tallies, MODEL_METHODS))
        for run_predictions, run_tallies, methods in runs:
            for method in methods:
                masks = [
                    _instances(prediction, method, thresholds, baseline_inputs(counts)) > 0
                    for prediction, (counts, _) in zip(run_predictions, counts_and_truth)
                ]
                volume = JointPredictor.compile_volume(masks)
                matched, predicted, truths = match_instances(volume, truth_volume)
                run_tallies[method].found_3d += matched
                run_tallies[method].peaks_3d += truths
                run_tallies[method].components_3d += predicted
    backend_reports = _backend_reports(others, failed, timed_frames, real_frames, batch_size)
    return {
        "held_out": {
            "frames": frames, "seed": seed, "scans": scans, "scan_frames": scan_frames,
            "scan_seeds": [seed + 1000 + i for i in range(scans)], "settings": asdict(HELD_OUT_SETTINGS),
        },
        "baseline_thresholds": thresholds,
        "methods": {method: tally.summary() for method, tally in tallies.items()},
        "seconds_per_frame": {stage: value / max(timed_frames, 1) for stage, value in seconds.items()},
        **({"real_frames": real_frame_case(predictor, real_frames, batch_size)} if real_frames is not None else {}),
        "models": predictor.provenance(),
        **({"backends": backend_reports} if backend_reports else {}),
        "definitions": __doc__,
    }


def evaluate_labelled(settings: Any, labelled: Any, device: str = "cpu", batch_size: int = 4,
                      baseline_thresholds: dict[str, float] | None = None, real_frames: Path | None = REAL_MODULES,
                      backends: Sequence[str] | None = None) -> dict[str, Any]:
    """The same table on frames people labelled (a `pipeline.models.labels.LabelledSet`); no 3D recall
    (labelled images are single frames)."""
    predictor, thresholds = _predictor_and_thresholds(settings, device, baseline_thresholds)
    others, failed = _other_runs(settings, device, backends)
    tallies = {method: Tally() for method in METHODS}
    seconds = {"preprocess": 0.0, "tlm": 0.0, "sslm": 0.0}
    pairs = ((frame.counts, frame.labels) for frame in labelled.frames)
    timed_frames = _tally_frames(predictor, pairs, thresholds, tallies, seconds, batch_size, others)
    backend_reports = _backend_reports(others, failed, timed_frames, real_frames, batch_size)
    return {
        "labelled": {
            "csv": str(labelled.csv_path), "csv_sha256": labelled.csv_sha256, "images": labelled.images,
            "classifications": labelled.classifications, "frames": len(labelled.frames),
            "scans": sorted({frame.scan for frame in labelled.frames}), "unpaired": list(labelled.unpaired),
        },
        "baseline_thresholds": thresholds,
        "methods": {method: tally.summary() for method, tally in tallies.items()},
        "seconds_per_frame": {stage: value / max(timed_frames, 1) for stage, value in seconds.items()},
        **({"real_frames": real_frame_case(predictor, real_frames, batch_size)} if real_frames is not None else {}),
        "models": predictor.provenance(),
        **({"backends": backend_reports} if backend_reports else {}),
        "definitions": __doc__,
    }


def format_report(report: dict[str, Any]) -> str:
    """The table `pipeline evaluate` prints."""
    names = {
        "tlm": "TLM", "sslm": "SSLM", "union": "joint (TLM | SSLM)",
        "baseline": f"baseline: log counts > {report['baseline_thresholds']['baseline']:.2f}",
        "baseline_significance": f"baseline: significance > {report['baseline_thresholds']['baseline_significance']:.2f}",
    }
    any_method = report["methods"]["tlm"]
    if "labelled" in report:
        labelled = report["labelled"]
        first = (f"labelled: {labelled['frames']} frames of {len(labelled['scans'])} scans ({labelled['images']} images in "
                 f"{Path(labelled['csv']).name}, {len(labelled['unpaired'])} not paired with a scan frame)")
    else:
        held = report["held_out"]
        first = (f"held-out: {held['frames']} frames (seed {held['seed']}), {held['scans']} rocking scans x "
                 f"{held['scan_frames']} frames ({any_method['true_peaks_3d']} 3D peaks), settings differ from training")
    lines = [first, f"{'method':<30} {'mean IoU':>8} {'precision':>9} {'recall':>7} {'F1':>6} {'3D recall':>9}"]
    for method, summary in report["methods"].items():
        lines.append(
            f"{names[method]:<30} {summary['mean_iou']:>8.3f} {summary['precision']:>9.3f} "
            f"{summary['recall']:>7.3f} {summary['f1']:>6.3f} "
            + (f"{summary['recall_3d']:>9.3f}" if summary["recall_3d"] == summary["recall_3d"] else f"{'-':>9}")
        )
    timing = report["seconds_per_frame"]
    lines.append(
        "seconds per frame: " + ", ".join(f"{stage} {value * 1000:.1f} ms" for stage, value in timing.items())
    )
    if "real_frames" in report:
        lines += format_real_frames(report["real_frames"])
    for name in ("tlm", "sslm"):
        model = report["models"][name]
        if model.get("enabled"):
            lines.append(f"{name}: {model['weights']} sha256 {model['sha256'][:16]}...")
    lines.append(f"precision: {report['models'].get('precision', 'float32')}, device {report['models'].get('device')}")
    for backend, figures in report.get("backends", {}).items():
        lines += format_backend(backend, figures, names, str(report["models"].get("precision", "float32")))
    return "\n".join(lines)


def format_backend(backend: str, figures: dict[str, Any], names: dict[str, str], torch_precision: str = "float32") -> list[str]:
    """The lines of another backend (onnxruntime): its model rows on the same frames, its timing, its agreement with torch."""
    if "error" in figures:
        return [f"backend {backend}: not evaluated ({figures['error']})"]
    lines = [f"backend {backend} ({figures['models'].get('device')}, {figures['models'].get('precision')}), the same frames:"]
    for method, summary in figures["methods"].items():
        lines.append(
            f"  {names[method]:<28} {summary['mean_iou']:>8.3f} {summary['precision']:>9.3f} "
            f"{summary['recall']:>7.3f} {summary['f1']:>6.3f} "
            + (f"{summary['recall_3d']:>9.3f}" if summary["recall_3d"] == summary["recall_3d"] else f"{'-':>9}")
        )
    lines.append("  seconds per frame: " + ", ".join(f"{stage} {value * 1000:.1f} ms"
                                                    for stage, value in figures["seconds_per_frame"].items()))
    agreement = figures["agreement"]
    lines.append(f"  same masks as torch ({torch_precision}): detection count equal on {agreement['same_detection_count']}/{agreement['frames']} "
                 f"frames, TLM labels on {agreement['tlm_pixels_equal']:.4%} of pixels, SSLM clusters on "
                 f"{agreement['sslm_pixels_equal']:.4%}")
    if "real_frames" in figures:
        real = figures["real_frames"]
        lines.append(f"  real frames: TLM {real['tlm']['detections']} detections, covers {real['tlm']['spots_covered']:.1%} "
                     f"of the spots; SSLM {real['sslm']['components']} components, covers {real['sslm']['spots_covered']:.1%}")
    return lines


def format_real_frames(real: dict[str, Any]) -> list[str]:
    """The real-frame lines of the table: counts against reference spots (no outlines, so no IoU or F1)."""
    tlm, sslm = real["tlm"], real["sslm"]
    caps = "/".join(str(cap) for cap in tlm["caps"]) or "-"
    return [
        f"real frames: {real['frames']} frames of {Path(real['path']).name} without outlines: counted against "
        f"{real['reference_spots']} reference spots (a classical spot finder)",
        f"  TLM: {tlm['detections']} detections (at most {tlm['max_detections']} a frame), {tlm['frames_at_cap']} frames at "
        f"the cap ({caps}); covers {tlm['spots_covered']:.1%} of the spots, {tlm['instances_on_spots']:.1%} of its detections on one",
        f"  SSLM: {sslm['components']} components; covers {sslm['spots_covered']:.1%} of the spots, "
        f"{sslm['instances_on_spots']:.1%} of its components on one",
        "  seconds per frame: " + ", ".join(f"{stage} {value * 1000:.1f} ms" for stage, value in real["seconds_per_frame"].items()),
    ]


def write_json(report: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
