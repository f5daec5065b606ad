"""Is there an int8 ONNX variant of the TLM and SSLM whose `pipeline evaluate` figures stay within 0.01 of float32?

Why (issue 24): int8 ran ~0.45x float32's time on a CPU but changed 4-13 % of the SSLM's cluster ids; it may ship only
behind an option, and only if the figures `pipeline evaluate` prints stay within 0.01 of float32's. This script is that
measurement, repeatable on any machine (int8 speed depends on the CPU: AVX-512 VNNI / AVX-VNNI make it fast).

What it does:
1. float32 graphs: the project's own exports of the weights in use (`onnx_export.ensure_onnx`, the ONNX cache).
2. int8 graphs: ONNX Runtime quantization (`onnxruntime.quantization`) of each float32 graph, one per variant
   (`VARIANTS`: static QDQ or QOperator, per-channel or per-tensor weights, all convolutions or only some of them via
   `nodes_to_quantize`/`nodes_to_exclude`, and dynamic quantization). Static variants are calibrated on TRAINING-side
   frames (`training_data.training_frames`, seed `--calibration-seed`, steps from 3,000,000 on: neither the held-out
   set nor the steps `evaluate` tunes its baselines on), never on the held-out frames.
3. The held-out set of `pipeline evaluate` (same frames, seeds and generator settings: `evaluate.HELD_OUT_SETTINGS`,
   `--frames` frames of seed `--seed`, `--scans` rocking scans) goes through float32 and every variant, one frame at a
   time, each graph in its own one-thread ONNX Runtime session (the predictor's session options), the order of the
   graphs rotating frame by frame so that a load change hits them alike. Preprocessing and post-processing are the
   ONNX predictor's (`fix_dead_pixels`, `to_model_input`/`to_significance`, `paint_instances`, peak channels); the
   first frame's float32 masks are checked equal to `OnnxJointPredictor.predict_batch`'s.
4. Figures are `evaluate`'s own (its `Tally`, `components`, `match_instances`, `JointPredictor.compile_volume`;
   real frames: `reference_spots`, `spots_covered`, `instances_on_spots`): per model mean IoU, precision, recall, F1,
   3D recall, and on the shipped real modules the share of reference spots covered and of instances on a spot;
   the joint (TLM | SSLM) row for every pair of a TLM and an SSLM variant.

Printed: one table per model (variant, each figure, its delta to float32, median ms per frame of the model over the
held-out frames, `within`: every figure within `--tolerance` of float32), then the joint rows, then a verdict.
Progress goes to stderr. The int8 graphs are kept in `--out-dir` (default `<ONNX cache>/int8-eval`) and reused by a
later run with the same calibration unless `--requantize`.

Usage: python scripts/int8_eval.py [--frames 200 --scans 4 --scan-frames 30] [--variants sslm-all-pc,tlm-body-pc]
       [--calibration-frames 32] [--json out.json] [--config pipeline.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIGURES = ("mean_iou", "precision", "recall", "f1", "recall_3d")
REAL_FIGURES = ("spots_covered", "instances_on_spots")
QUANTIZE_TAG = 2  # bumped when this script's quantization changes (1: before pipeline.models.onnx_quantize)
QUANTIZED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "QGemm"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to make an int8 graph of one model."""

    name: str
    kind: str  # "tlm" | "sslm"
    mode: str = "static"  # "static" | "dynamic"
    quant_format: str = "qdq"  # "qdq" | "qoperator" (static only)
    per_channel: bool = True
    op_types: tuple[str, ...] = ("Conv",)
    include_prefixes: tuple[str, ...] = ()  # only nodes whose name starts with one of these (empty: every node of op_types)
    exclude_nodes: tuple[str, ...] = ()
    description: str = ""
    calibration_frames: int | None = None  # None: --calibration-frames
    slow: bool = False  # measured slower than float32: only run when named (or with --variants every)


VARIANTS: tuple[Variant, ...] = (
    Variant("tlm-all-pc", "tlm", op_types=("Conv", "Gemm"), description="every Conv and Gemm, per-channel"),
    Variant("tlm-all-pt", "tlm", op_types=("Conv", "Gemm"), per_channel=False, description="every Conv and Gemm, per-tensor"),
    Variant("tlm-backbone-pc", "tlm", include_prefixes=("/backbone/",), description="ResNet + FPN convolutions, per-channel"),
    Variant("tlm-body-pc", "tlm", include_prefixes=("/backbone/body/",), description="ResNet convolutions only, per-channel"),
    Variant("tlm-backbone-rpn-pc", "tlm", include_prefixes=("/backbone/", "/rpn/"),
            description="ResNet + FPN + RPN head convolutions, per-channel"),
    Variant("tlm-body-pc-qop", "tlm", include_prefixes=("/backbone/body/",), quant_format="qoperator",
            description="ResNet convolutions only, per-channel, QOperator format"),
    Variant("tlm-early-pc", "tlm", include_prefixes=("/backbone/body/conv1/", "/backbone/body/layer1/", "/backbone/body/layer2/"),
            description="ResNet stem, layer1 and layer2 convolutions only, per-channel"),
    Variant("tlm-body-pc-c128", "tlm", include_prefixes=("/backbone/body/",), calibration_frames=128,
            description="ResNet convolutions only, per-channel, 128 calibration frames"),
    Variant("tlm-all-pc-c128", "tlm", op_types=("Conv", "Gemm"), calibration_frames=128,
            description="every Conv and Gemm, per-channel, 128 calibration frames"),
    Variant("tlm-dynamic", "tlm", mode="dynamic", op_types=("Gemm", "MatMul"),
            description="dynamic: box head fully connected layers"),
    Variant("sslm-all-pc", "sslm", description="all three convolutions, per-channel"),
    Variant("sslm-all-pt", "sslm", per_channel=False, description="all three convolutions, per-tensor"),
    Variant("sslm-all-pc-qop", "sslm", quant_format="qoperator", description="all three, per-channel, QOperator format"),
    Variant("sslm-no-last-pc", "sslm", exclude_nodes=("/fast/conv3/Conv",), description="conv3 (1x1, last) kept float32"),
    Variant("sslm-middle-pc", "sslm", include_prefixes=("/fast/convs.1/",),
            description="only the 100->100 3x3 conv (most of the work)"),
    # the recipe pipeline.models.onnx_quantize ships (RECIPES["sslm"]): within 0.006 on every figure, 0.38x (2026-12-04)
    Variant("sslm-no-first-pc", "sslm", exclude_nodes=("/fast/convs.0/Conv",),
            description="conv1 (1->100 3x3, on the input itself) kept float32"),
    Variant("sslm-middle-pt", "sslm", include_prefixes=("/fast/convs.1/",), per_channel=False,
            description="only the 100->100 3x3 conv, per-tensor"),
    Variant("sslm-middle-pc-c128", "sslm", include_prefixes=("/fast/convs.1/",), calibration_frames=128,
            description="only the 100->100 3x3 conv, per-channel, 128 calibration frames"),
    Variant("sslm-no-first-pc-c128", "sslm", exclude_nodes=("/fast/convs.0/Conv",), calibration_frames=128,
            description="conv1 kept float32, 128 calibration frames"),
    Variant("sslm-dynamic", "sslm", mode="dynamic", description="dynamic: all convolutions (ConvInteger)", slow=True),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- quantization ------------------------------------------------------------------------------------------------


def recipe_of(variant: Variant) -> Any:
    """A static variant as an `onnx_quantize.Recipe` (the module the pipeline would use)."""
    from pipeline.models.onnx_quantize import Recipe

    return Recipe(include_prefixes=variant.include_prefixes, exclude_nodes=variant.exclude_nodes, op_types=variant.op_types,
                  per_channel=variant.per_channel, quant_format="qdq" if variant.quant_format == "qdq" else "qoperator")


def quantize(source: Path, target: Path, variant: Variant, calibration: Sequence[np.ndarray]) -> dict[str, Any]:
    """Write `variant`'s int8 graph of `source` to `target` (temporary file, then renamed); returns what was done.

    Static variants: `onnx_quantize.quantize_graph`, what the pipeline would run. Dynamic ones (not in the module: slower
    than float32 for convolutions, and ORT's dynamic quantizer has no Gemm): `quantize_dynamic` here.
    """
    from pipeline.models import onnx_quantize

    if variant.mode == "static":
        graph = onnx_quantize.quantize_graph(source, target, calibration, recipe_of(variant))
        return {"nodes_quantized": len(graph.nodes_quantized), "seconds": graph.seconds}
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=target.parent) as work:
        prepared, output = Path(work) / "prepared.onnx", Path(work) / "int8.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=variant.kind == "tlm")
        graph_nodes = [(node.name, node.op_type) for node in onnx.load(str(prepared)).graph.node]
        nodes = list(onnx_quantize.select_nodes(graph_nodes, recipe_of(variant)))
        quantize_dynamic(str(prepared), str(output), op_types_to_quantize=list(variant.op_types),
                         nodes_to_quantize=nodes, per_channel=variant.per_channel, weight_type=QuantType.QInt8)
        quantized_ops = sum(node.op_type in QUANTIZED_OPS for node in onnx.load(str(output)).graph.node)
        if quantized_ops == 0:  # ORT's dynamic quantizer has no Gemm: the "int8" graph would be float32
            raise ValueError(f"nothing was quantized ({len(nodes)} {'/'.join(variant.op_types)} nodes selected)")
        os.replace(output, target)
    return {"nodes_quantized": len(nodes), "seconds": round(time.perf_counter() - started, 1)}


# --- evaluation ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelRun:
    """One graph of one model (float32 or a variant) and its running figures."""

    name: str
    kind: str
    session: Any
    tally: Any
    milliseconds: list[float] = dataclasses.field(default_factory=list)
    real: dict[str, int] = dataclasses.field(default_factory=lambda: {"spots": 0, "covered": 0, "instances": 0, "on_spots": 0})
    agreement: dict[str, int] = dataclasses.field(default_factory=lambda: {"frames": 0, "same": 0, "pixels": 0, "equal": 0})
    quantized: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        figures = self.tally.summary()
        out = {name: figures[name] for name in FIGURES}
        out["spots_covered"] = self.real["covered"] / self.real["spots"] if self.real["spots"] else float("nan")
        out["instances_on_spots"] = self.real["on_spots"] / self.real["instances"] if self.real["instances"] else float("nan")
        out["ms_per_frame"] = statistics.median(self.milliseconds) if self.milliseconds else float("nan")
        out["predicted_instances"] = figures["predicted_instances"]
        seen = self.agreement
        # against float32 on the held-out frames: TLM frames with the same instance count, pixels with the same
        # TLM label / SSLM cluster id (the raw cluster id, before the peak channels make the mask)
        out["same_count_frames"] = seen["same"] / seen["frames"] if seen["frames"] else float("nan")
        out["pixels_equal"] = seen["equal"] / seen["pixels"] if seen["pixels"] else float("nan")
        return out


def run_model(run: ModelRun, image: np.ndarray, predictor: Any) -> np.ndarray:
    """One frame's model input through one graph -> TLM instance labels or SSLM cluster ids, timed as evaluate does
    (graph plus the predictor's post-processing)."""
    from pipeline.models.onnx_predictor import paint_instances

    started = time.perf_counter()
    if run.kind == "tlm":
        boxes, scores, patches = run.session.run(None, {"image": image})
        result, _ = paint_instances(boxes, scores, patches, image.shape)
    else:
        (result,) = run.session.run(None, {"image": image})
    run.milliseconds.append((time.perf_counter() - started) * 1000)
    return np.asarray(result)


def evaluate_variants(args: argparse.Namespace, variants: Sequence[Variant]) -> dict[str, Any]:
    """Quantize, then run float32 and every variant on the held-out set and the real frames; figures per graph."""
    import onnxruntime

    from pipeline.config import ModelSettings, load_config
    from pipeline.models import onnx_export, onnx_quantize
    from pipeline.models.evaluate import HELD_OUT_SETTINGS, Tally
    from pipeline.models.joint import JointPredictor
    from pipeline.models.onnx_predictor import OnnxJointPredictor, _session
    from pipeline.models.preprocess import fix_dead_pixels, to_model_input, to_significance
    from pipeline.models.real_frames import REAL_MODULES, instances_on_spots, load_frames, reference_spots, spots_covered
    from pipeline.models.scoring import components, match_instances
    from pipeline.simulator import synth

    settings = load_config(args.config).models if args.config is not None else ModelSettings()
    settings = settings.model_copy(update={"onnx_cache": args.onnx_cache}) if args.onnx_cache else settings
    log("float32 graphs (exported into the ONNX cache when missing)")
    predictor = OnnxJointPredictor(settings, threads=args.threads, exporter=onnx_export.export_in_process)
    sources = {kind: onnx_export.ensure_onnx(settings, kind) for kind in ("tlm", "sslm")}
    out_dir = Path(args.out_dir) if args.out_dir else onnx_export.cache_dir(settings) / "int8-eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[ModelRun]] = {"tlm": [], "sslm": []}
    for kind in ("tlm", "sslm"):
        runs[kind].append(ModelRun(f"{kind}-float32", kind, _session(sources[kind], args.threads), Tally()))
    calibration: dict[tuple[str, int], list[np.ndarray]] = {}
    for variant in variants:
        count = variant.calibration_frames or args.calibration_frames
        # the graph's name changes with the variant's definition, the calibration and the onnxruntime version
        tag = hashlib.sha256(f"{dataclasses.asdict(variant)}-{count}-{args.calibration_seed}-{QUANTIZE_TAG}-"
                             f"{onnxruntime.__version__}".encode()).hexdigest()[:8]
        target = out_dir / f"{sources[variant.kind].stem}-{variant.name}-{tag}.onnx"
        info: dict[str, Any] = {"path": str(target), "calibration_frames": count if variant.mode == "static" else 0}
        if args.requantize or not target.is_file():
            if variant.mode == "static" and (variant.kind, count) not in calibration:
                log(f"{variant.kind}: {count} training-side calibration frames (seed {args.calibration_seed})")
                calibration[(variant.kind, count)] = onnx_quantize.calibration_inputs(
                    "tlm" if variant.kind == "tlm" else "sslm", predictor.sslm_input, count, args.calibration_seed)
            log(f"{variant.name}: quantizing ({variant.description})")
            try:
                info |= quantize(sources[variant.kind], target, variant, calibration.get((variant.kind, count), []))
            except Exception as error:  # a variant ORT cannot make is reported, the others still run
                log(f"{variant.name}: quantization failed: {type(error).__name__}: {str(error)[:300]}")
                runs.setdefault("failed", []).append(ModelRun(variant.name, f"{type(error).__name__}: {str(error)[:200]}", None, None))
                continue
            log(f"{variant.name}: {info}")
        else:
            info["reused"] = True
        try:
            session = _session(target, args.threads)
        except Exception as error:
            log(f"{variant.name}: session failed: {str(error)[:300]}")
            runs.setdefault("failed", []).append(ModelRun(variant.name, f"session: {str(error)[:200]}", None, None))
            continue
        runs[variant.kind].append(ModelRun(variant.name, variant.kind, session, Tally(), quantized=info))
    peak_channels = np.asarray(predictor.peak_channels, dtype=np.int64)
    significance = predictor.sslm_input == "significance"

    def inputs_of(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fixed = fix_dead_pixels(counts)
        image = np.ascontiguousarray(to_model_input(fixed), dtype=np.float32)
        return image, (np.ascontiguousarray(to_significance(fixed), dtype=np.float32) if significance else image)

    def all_outputs(counts: np.ndarray, index: int) -> dict[str, dict[str, np.ndarray]]:
        """{kind: {run name: TLM labels or SSLM peak mask}} for one frame, graphs in rotating order."""
        tlm_image, sslm_image = inputs_of(counts)
        order = [(kind, run) for kind in ("tlm", "sslm") for run in runs[kind]]
        shift = index % len(order)
        outputs: dict[str, dict[str, np.ndarray]] = {"tlm": {}, "sslm": {}}
        raw: dict[str, np.ndarray] = {}
        for kind, run in order[shift:] + order[:shift]:
            raw[run.name] = result = run_model(run, tlm_image if kind == "tlm" else sslm_image, predictor)
            outputs[kind][run.name] = result if kind == "tlm" else np.isin(result, peak_channels).astype(np.uint8)
        for kind in ("tlm", "sslm"):
            reference = raw[runs[kind][0].name]
            for run in runs[kind]:
                run.agreement["frames"] += 1
                run.agreement["same"] += int(reference.max()) == int(raw[run.name].max())
                run.agreement["pixels"] += reference.size
                run.agreement["equal"] += int(np.count_nonzero(reference == raw[run.name]))
        return outputs

    pairs = [(t.name, s.name) for t in runs["tlm"] for s in runs["sslm"]]
    joint = {pair: Tally() for pair in pairs}
    frames_seen = 0
    started = time.perf_counter()

    def progress(label: str) -> None:
        reference = {kind: runs[kind][0].tally.summary() for kind in ("tlm", "sslm")}
        worst = {run.name: max(abs(run.tally.summary()[f] - reference[kind][f]) for f in ("mean_iou", "precision", "recall", "f1"))
                 for kind in ("tlm", "sslm") for run in runs[kind][1:]}
        log(f"{label}: {time.perf_counter() - started:.0f} s; largest 2D delta so far: "
            + ", ".join(f"{name} {value:.4f}" for name, value in worst.items()))

    for index in range(args.frames):
        counts, truth = synth.training_sample(np.random.default_rng([args.seed, index]), HELD_OUT_SETTINGS)
        outputs = all_outputs(counts, index)
        if index == 0:  # this path must be the ONNX predictor's: same masks as its predict_batch on this frame
            reference = predictor.predict_batch(counts[None])[0]
            if not (np.array_equal(reference.tlm_labels, outputs["tlm"]["tlm-float32"])
                    and np.array_equal(reference.ssl_mask, outputs["sslm"]["sslm-float32"])):
                raise RuntimeError("float32 masks differ from OnnxJointPredictor.predict_batch on frame 0: script out of date")
        for kind in ("tlm", "sslm"):
            for run in runs[kind]:
                mask = outputs[kind][run.name]
                run.tally.add_frame(mask if kind == "tlm" else components(mask), truth)
        for (tlm_name, sslm_name), tally in joint.items():
            tally.add_frame(components((outputs["tlm"][tlm_name] > 0) | (outputs["sslm"][sslm_name] > 0)), truth)
        frames_seen += 1
        if frames_seen % args.progress_every == 0 or frames_seen == args.frames:
            progress(f"held-out frame {frames_seen}/{args.frames}")

    for scan_index in range(args.scans):
        scan = synth.RockingScan(args.scan_frames, seed=args.seed + 1000 + scan_index, settings=HELD_OUT_SETTINGS)
        masks: dict[Any, list[np.ndarray]] = {}
        truths = []
        for frame_index in range(args.scan_frames):
            counts, truth = scan.frame(frame_index)
            truths.append(truth)
            outputs = all_outputs(counts, frame_index)
            for kind in ("tlm", "sslm"):
                for run in runs[kind]:
                    masks.setdefault(run.name, []).append(outputs[kind][run.name] > 0)
            for pair in pairs:
                masks.setdefault(pair, []).append((outputs["tlm"][pair[0]] > 0) | (outputs["sslm"][pair[1]] > 0))
        truth_volume = np.stack(truths)
        tallies = {run.name: run.tally for kind in ("tlm", "sslm") for run in runs[kind]} | joint
        for key, tally in tallies.items():
            # evaluate's 3D recall: SSLM and union masks go through components() first, as _instances does
            frame_masks = masks[key] if key in masks and isinstance(key, str) and key.startswith("tlm") else \
                [components(mask) > 0 for mask in masks[key]]
            matched, predicted, true_peaks = match_instances(JointPredictor.compile_volume(frame_masks), truth_volume)
            tally.found_3d += matched
            tally.peaks_3d += true_peaks
            tally.components_3d += predicted
        progress(f"rocking scan {scan_index + 1}/{args.scans}")

    if not args.no_real:
        real, _ = load_frames(REAL_MODULES)
        for index, counts in enumerate(real):
            spots = reference_spots(counts)
            outputs = all_outputs(counts, index)
            for kind in ("tlm", "sslm"):
                for run in runs[kind]:
                    mask = outputs[kind][run.name]
                    instances = mask if kind == "tlm" else components(mask)
                    run.real["spots"] += int(spots.max())
                    run.real["covered"] += spots_covered(spots, mask)
                    run.real["instances"] += int(len(np.unique(instances[instances > 0])))
                    run.real["on_spots"] += instances_on_spots(instances, spots)
        log(f"real frames: {len(real)} done")

    return {
        "held_out": {"frames": args.frames, "seed": args.seed, "scans": args.scans, "scan_frames": args.scan_frames},
        "calibration": {"frames": args.calibration_frames, "seed": args.calibration_seed,
                        "first_step": onnx_quantize.CALIBRATION_STEP0},
        "threads": args.threads, "onnxruntime": onnxruntime.__version__, "tolerance": args.tolerance,
        "models": {kind: [{"name": run.name, **run.summary(), "quantized": run.quantized} for run in runs[kind]]
                   for kind in ("tlm", "sslm")},
        "joint": [{"tlm": t, "sslm": s, **{f: joint[(t, s)].summary()[f] for f in FIGURES}} for t, s in pairs],
        "failed": [{"name": run.name, "error": run.kind} for run in runs.get("failed", [])],
        "variants": {variant.name: dataclasses.asdict(variant) for variant in variants},
    }


# --- report --------------------------------------------------------------------------------------------------------


def deltas(row: dict[str, Any], reference: dict[str, Any], names: Sequence[str]) -> dict[str, float]:
    return {name: row[name] - reference[name] for name in names if row[name] == row[name] and reference[name] == reference[name]}


def format_report(report: dict[str, Any]) -> str:
    """The tables: per model, per variant, figures, deltas, ms/frame, within tolerance; then joint rows; verdict."""
    tolerance = report["tolerance"]
    held = report["held_out"]
    lines = [f"held-out: {held['frames']} frames (seed {held['seed']}), {held['scans']} rocking scans x {held['scan_frames']} "
             f"frames; calibration: {report['calibration']['frames']} training-side frames; onnxruntime "
             f"{report['onnxruntime']}, {report['threads']} thread(s); tolerance {tolerance}"]
    names = (*FIGURES, *REAL_FIGURES)
    short = {"mean_iou": "IoU", "precision": "prec", "recall": "recall", "f1": "F1", "recall_3d": "3D rec",
             "spots_covered": "spots", "instances_on_spots": "on-spot"}
    within: dict[str, bool] = {}
    for kind in ("tlm", "sslm"):
        rows = report["models"][kind]
        reference = rows[0]
        lines.append("")
        lines.append(f"{kind.upper():<18}" + "".join(f"{short[n]:>8} {'d':>7}" for n in names)
                     + f"{'ms/frame':>10} {'x f32':>6} {'same n':>7} {'px eq':>7}  within")
        for row in rows:
            d = deltas(row, reference, names)
            ok = all(abs(value) <= tolerance + 1e-12 for value in d.values())
            within[row["name"]] = ok
            lines.append(f"{row['name']:<18}" + "".join(f"{row[n]:>8.3f} {d.get(n, float('nan')):>+7.3f}" for n in names)
                         + f"{row['ms_per_frame']:>10.1f} {row['ms_per_frame'] / reference['ms_per_frame']:>6.2f} "
                         + (f"{row['same_count_frames']:>7.3f}" if kind == "tlm" else f"{'-':>7}") + f" {row['pixels_equal']:>7.4f}  "
                         + ("yes" if ok else "no"))
    lines.append("")
    lines.append(f"{'joint (TLM | SSLM)':<36}" + "".join(f"{short[n]:>8} {'d':>7}" for n in FIGURES) + "  within")
    reference_joint = next(r for r in report["joint"] if r["tlm"] == "tlm-float32" and r["sslm"] == "sslm-float32")
    passing = []
    for row in report["joint"]:
        d = deltas(row, reference_joint, FIGURES)
        ok = all(abs(value) <= tolerance + 1e-12 for value in d.values())
        all_ok = ok and within[row["tlm"]] and within[row["sslm"]]
        if all_ok and (row["tlm"], row["sslm"]) != ("tlm-float32", "sslm-float32"):
            passing.append(f"{row['tlm']} + {row['sslm']}")
        lines.append(f"{row['tlm'] + ' + ' + row['sslm']:<36}" + "".join(f"{row[n]:>8.3f} {d.get(n, float('nan')):>+7.3f}" for n in FIGURES)
                     + "  " + ("yes" if ok else "no"))
    for failed in report["failed"]:
        lines.append(f"not evaluated: {failed['name']}: {failed['error']}")
    both = [p for p in passing if "float32" not in p]
    lines.append("")
    lines.append("verdict: int8 for both models within tolerance on every figure: " + (", ".join(both) if both else "none"))
    lines.append("verdict: pairs within tolerance with one model kept float32: "
                 + (", ".join(p for p in passing if "float32" in p) or "none"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Variants: " + "; ".join(f"{v.name}: {v.description}" for v in VARIANTS))
    parser.add_argument("--frames", type=int, default=200, help="held-out frames (evaluate's default 200)")
    parser.add_argument("--scans", type=int, default=4, help="rocking scans for 3D recall (evaluate's default 4)")
    parser.add_argument("--scan-frames", type=int, default=30, help="frames per rocking scan (evaluate's default 30)")
    parser.add_argument("--seed", type=int, default=12345, help="held-out seed (evaluate's default 12345)")
    parser.add_argument("--calibration-frames", type=int, default=32, help="training-side frames for static calibration")
    parser.add_argument("--calibration-seed", type=int, default=0, help="training seed of the calibration frames")
    parser.add_argument("--variants", default="all", help="comma-separated variant names, 'all' (all but the slow ones) or 'every'")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per ONNX Runtime session")
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest allowed |int8 - float32| of a figure")
    parser.add_argument("--config", type=Path, default=None, help="pipeline config whose models section is used")
    parser.add_argument("--onnx-cache", type=Path, default=None, help="ONNX cache directory (default: the config's)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where int8 graphs go (default <ONNX cache>/int8-eval)")
    parser.add_argument("--requantize", action="store_true", help="make the int8 graphs again even when present")
    parser.add_argument("--no-real", action="store_true", help="skip the shipped real frames")
    parser.add_argument("--progress-every", type=int, default=10, help="held-out frames between progress lines")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    for name in ("frames", "calibration_frames", "progress_every", "threads"):
        if getattr(args, name) < (0 if name == "frames" else 1):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if args.scans < 0 or args.scan_frames < 1:
        parser.error(f"--scans {args.scans} / --scan-frames {args.scan_frames}: must be >= 0 / >= 1")
    return args


def select(names: str, variants: Sequence[Variant] = VARIANTS) -> list[Variant]:
    """The variants named (comma-separated), or all of them."""
    if names in ("all", "every"):
        return [variant for variant in variants if names == "every" or not variant.slow]
    known = {variant.name: variant for variant in variants}
    chosen = []
    for name in (part.strip() for part in names.split(",") if part.strip()):
        if name not in known:
            raise SystemExit(f"--variants: unknown variant {name!r} (known: {', '.join(known)})")
        chosen.append(known[name])
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = select(args.variants)
    report = evaluate_variants(args, variants)
    print(format_report(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
