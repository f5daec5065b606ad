"""Milliseconds per frame of the two backends, torch and ONNX Runtime, in one run, interleaved.

Why: `models.backend: auto` picks ONNX Runtime on a CPU because it was measured faster there; this script is that
measurement, repeatable. Both backends run the shipped weights (or a config's) in float32 on the same frames, one
thread each, frame by frame, alternating which backend goes first; one warm-up frame each is not counted.
Printed per backend: median ms/frame of preprocessing, TLM, SSLM and the whole `predict_batch` call, the ratio
onnxruntime/torch, and whether the masks agreed (detections per frame, TLM label and SSLM cluster pixels). Then the
FLOP floor (`pipeline.tools.bench.flop_floor`): each model's GFLOP per frame, the CPU's float32 matrix-product rate
with the same threads, measured in the same run, and each backend's model time as a multiple of the floor.

Frames: held-out simulator frames (`pipeline evaluate`'s set, seed 12345) by default, `--real` for the shipped
real Pilatus modules (crowded thaumatin frames).

Usage: python scripts/onnx_bench.py [--frames 10] [--threads 1] [--real] [--config pipeline.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def held_out_frames(count: int, seed: int = 12345) -> np.ndarray:
    """The first `count` frames of `pipeline evaluate`'s held-out set (raw counts)."""
    from pipeline.models.evaluate import HELD_OUT_SETTINGS
    from pipeline.simulator import synth

    return np.stack([synth.training_sample(np.random.default_rng([seed, index]), HELD_OUT_SETTINGS)[0] for index in range(count)])


def bench(settings: Any, frames: np.ndarray, threads: int = 1, torch_precision: str = "float32") -> dict[str, Any]:
    """Per backend, per stage: milliseconds per frame (median over `frames`), and how far the masks agreed.

    `torch_precision`: float32 (the like-for-like comparison) or bfloat16 (what `precision: auto` picks on CPUs with
    native bfloat16), for torch only; ONNX Runtime runs float32.
    """
    import torch

    from pipeline.models import onnx_export
    from pipeline.models.joint import JointPredictor
    from pipeline.models.onnx_predictor import OnnxJointPredictor
    from pipeline.tools.bench import flop_floor

    torch.set_num_threads(threads)
    reference = JointPredictor.from_settings(settings.model_copy(update={"precision": torch_precision}), device="cpu")
    onnx = OnnxJointPredictor(settings, threads=threads, exporter=onnx_export.export_in_process)
    predictors = {"torch": reference, "onnxruntime": onnx}
    times: dict[str, dict[str, list[float]]] = {name: {"preprocess": [], "tlm": [], "sslm": [], "total": []} for name in predictors}
    agreement = {"frames": 0, "same_detection_count": 0, "tlm_pixels_equal": 0.0, "sslm_pixels_equal": 0.0}
    for predictor in predictors.values():  # warm-up: first-call allocations are not what a worker pays per frame
        predictor.predict_batch(frames[:1])
    for index, frame in enumerate(frames):
        order = list(predictors) if index % 2 == 0 else list(reversed(predictors))
        results = {}
        for name in order:
            started = time.perf_counter()
            (prediction,) = predictors[name].predict_batch(frame[None])
            times[name]["total"].append(time.perf_counter() - started)
            for stage in ("preprocess", "tlm", "sslm"):
                times[name][stage].append(prediction.timings[stage])
            results[name] = prediction
        torch_result, onnx_result = results["torch"], results["onnxruntime"]
        agreement["frames"] += 1
        agreement["same_detection_count"] += len(torch_result.detections) == len(onnx_result.detections)
        agreement["tlm_pixels_equal"] += float(np.mean(torch_result.tlm_labels == onnx_result.tlm_labels))
        agreement["sslm_pixels_equal"] += float(np.mean(torch_result.ssl_clusters == onnx_result.ssl_clusters))
    agreement["tlm_pixels_equal"] /= max(agreement["frames"], 1)
    agreement["sslm_pixels_equal"] /= max(agreement["frames"], 1)
    medians = {name: {stage: statistics.median(values) * 1000 for stage, values in stages.items()} for name, stages in times.items()}
    gflop_per_frame = flop_floor.model_gflops(reference, frames)
    gflops = flop_floor.matmul_gflops(threads)
    floor = flop_floor.floor_ms(gflop_per_frame, gflops)
    return {"ms_per_frame": medians, "agreement": agreement, "threads": threads, "frames": len(frames),
            "torch_precision": reference.precision, "shape": list(frames.shape[1:]),
            "gflop_per_frame": gflop_per_frame, "matmul_gflops": gflops, "floor_ms": floor,
            "times_floor": {name: times_floor(values, floor) for name, values in medians.items()}}


def times_floor(ms_per_frame: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """Each model's time as a multiple of its floor, and both together ("models": the frame's model time)."""
    ratios = {kind: ms_per_frame[kind] / floor[kind] for kind in floor}
    ratios["models"] = sum(ms_per_frame[kind] for kind in floor) / sum(floor.values())
    return ratios


def format_bench(result: dict[str, Any]) -> str:
    """The table the script prints."""
    stages = ("preprocess", "tlm", "sslm", "total")
    medians = result["ms_per_frame"]
    lines = [f"{result['frames']} frames of {result['shape'][0]} x {result['shape'][1]}, {result['threads']} thread(s), "
             "median ms/frame, interleaved",
             f"{'backend':<12}" + "".join(f"{stage:>11}" for stage in stages)]
    for name, values in medians.items():
        lines.append(f"{name:<12}" + "".join(f"{values[stage]:>11.1f}" for stage in stages))
    lines.append(f"{'ratio':<12}" + "".join(f"{medians['onnxruntime'][s] / medians['torch'][s]:>11.2f}" for s in stages))
    agreement = result["agreement"]
    lines.append(f"agreement: same detection count on {agreement['same_detection_count']}/{agreement['frames']} frames, "
                 f"TLM labels {agreement['tlm_pixels_equal']:.6%} of pixels equal, "
                 f"SSLM clusters {agreement['sslm_pixels_equal']:.6%}")
    floor = result["floor_ms"]
    lines.append(f"FLOP floor at this CPU's float32 matrix product ({result['matmul_gflops']:.1f} GFLOP/s, "
                 f"{result['threads']} thread(s)): "
                 + ", ".join(f"{kind.upper()} {result['gflop_per_frame'][kind]:.2f} GFLOP -> {floor[kind]:.1f} ms" for kind in floor))
    for name, ratios in result["times_floor"].items():
        label = f"torch {result['torch_precision']}" if name == "torch" else f"{name} float32"
        lines.append(f"{label:<20}" + ", ".join(f"{'both models' if kind == 'models' else kind.upper()} {ratio:.2f}x"
                                                 for kind, ratio in ratios.items()) + " the floor")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10, help="frames per backend (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per backend (default 1)")
    parser.add_argument("--real", action="store_true", help="the shipped real Pilatus modules instead of simulated frames")
    parser.add_argument("--torch-precision", choices=["float32", "bfloat16"], default="float32",
                        help="torch's precision (default float32, like for like)")
    parser.add_argument("--config", type=Path, default=None, help="pipeline config whose models section is used")
    args = parser.parse_args()
    from pipeline.config import ModelSettings, load_config

    settings = load_config(args.config).models if args.config else ModelSettings()
    if args.real:
        from pipeline.models.real_frames import REAL_MODULES, load_frames

        frames = load_frames(REAL_MODULES)[0]
        frames = np.concatenate([frames] * (args.frames // len(frames) + 1))[:args.frames]
    else:
        frames = held_out_frames(args.frames)
    print(format_bench(bench(settings, frames, args.threads, args.torch_precision)))


if __name__ == "__main__":
    main()
