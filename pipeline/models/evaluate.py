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
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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
                  tallies: dict[str, Tally], seconds: dict[str, float], batch_size: int) -> int:
    """Every method on (raw counts, true instance labels) pairs, `batch_size` frames per prediction; returns the frames seen."""
    timed = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal timed
        predictions = predictor.predict_batch(np.stack([counts for counts, _ in pending]))
        for (counts, truth), prediction in zip(pending, predictions):
            inputs = baseline_inputs(counts)
            for method in METHODS:
                tallies[method].add_frame(_instances(prediction, method, thresholds, inputs), truth)
            for stage in seconds:
                seconds[stage] += prediction.timings.get(stage, 0.0)
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
    real_frames: Path | None = REAL_MODULES,
) -> dict[str, Any]:
    """Figures for every method on the held-out set (and on `real_frames`, unless None); see the module docstring."""
    predictor, thresholds = _predictor_and_thresholds(settings, device, baseline_thresholds)
    tallies = {method: Tally() for method in METHODS}
    seconds = {"preprocess": 0.0, "tlm": 0.0, "sslm": 0.0}
    held_out = (synth.training_sample(np.random.default_rng([seed, index]), HELD_OUT_SETTINGS) for index in range(frames))
    timed_frames = _tally_frames(predictor, held_out, thresholds, tallies, seconds, batch_size)
    for scan_index in range(scans):
        scan = synth.RockingScan(scan_frames, seed=seed + 1000 + scan_index, settings=HELD_OUT_SETTINGS)
        counts_and_truth = [scan.frame(i) for i in range(scan_frames)]
        predictions = list(predictor.predict_scan((c for c, _ in counts_and_truth), batch_size=batch_size))
        truth_volume = np.stack([truth for _, truth in counts_and_truth])
        for method in METHODS:
            masks = [
                _instances(prediction, method, thresholds, baseline_inputs(counts)) > 0
                for prediction, (counts, _) in zip(predictions, counts_and_truth)
            ]
            volume = JointPredictor.compile_volume(masks)
            matched, predicted, truths = match_instances(volume, truth_volume)
            tallies[method].found_3d += matched
            tallies[method].peaks_3d += truths
            tallies[method].components_3d += predicted
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
        "definitions": __doc__,
    }


def evaluate_labelled(settings: Any, labelled: Any, device: str = "cpu", batch_size: int = 4,
                      baseline_thresholds: dict[str, float] | None = None, real_frames: Path | None = REAL_MODULES) -> dict[str, Any]:
    """The same table on frames people labelled (a `pipeline.models.labels.LabelledSet`); no 3D recall
    (labelled images are single frames)."""
    predictor, thresholds = _predictor_and_thresholds(settings, device, baseline_thresholds)
    tallies = {method: Tally() for method in METHODS}
    seconds = {"preprocess": 0.0, "tlm": 0.0, "sslm": 0.0}
    pairs = ((frame.counts, frame.labels) for frame in labelled.frames)
    timed_frames = _tally_frames(predictor, pairs, thresholds, tallies, seconds, batch_size)
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
    return "\n".join(lines)


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
