"""int8 ONNX graphs made from the float32 graphs `onnx_export` caches: a faster CPU backend, where it keeps the figures.

Why: int8 convolutions take a fraction of float32's time on CPUs with VNNI (AVX-512 VNNI, AVX-VNNI), but quantizing
every convolution moved `pipeline evaluate`'s figures by more than the 0.01 issue 24 allows. `RECIPES` say which
convolutions of each model may become int8: only those whose int8 version kept every figure `pipeline evaluate`
prints (held-out mean IoU, precision, recall, F1, 3D recall; real-frame spot coverage and instances on spots) within
0.01 of float32. `scripts/int8_eval.py` is that measurement; change a recipe only with a new run of it.

How: ONNX Runtime's static quantization (`quantize_static`): QDQ format, int8 weights (per output channel by
default), uint8 activations with MinMax ranges from calibration frames, after ONNX Runtime's pre-processing
(`quant_pre_process`: shape inference, graph optimisations). Calibration frames must come from the training side
(`calibration_inputs`), never from frames a figure is computed on.

torch-free except `calibration_inputs` (training frames are made by `pipeline.models.training_data`). The graph is
written to a temporary file beside `target` and renamed: a reader sees no file or the whole graph. Where the graph
goes (the cache key) is the caller's: `recipe_key` is what must be part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import one_line
from pipeline.models.onnx_export import Kind, _write_atomically

QUANTIZE_FORMAT = 1
"""Bumped whenever `quantize_graph` makes another graph from the same inputs: part of `recipe_key`."""
CALIBRATION_FRAMES = 32
CALIBRATION_SEED = 0
CALIBRATION_STEP0 = 3_000_000
"""Training-side steps no other part of the project draws frames from (training starts at 0, `evaluate`'s baseline
tuning at 2,000,000): calibration never sees a frame a figure is computed on."""
QUANTIZED_OPS = frozenset({"QuantizeLinear", "QLinearConv", "QGemm"})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Which nodes become int8: those of `op_types` whose name starts with one of `include_prefixes` (empty: every
    one), minus `exclude_nodes`; weights per output channel or per tensor; QDQ or QOperator graph format."""

    include_prefixes: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ("Conv",)
    per_channel: bool = True
    quant_format: Literal["qdq", "qoperator"] = "qdq"


RECIPES: dict[Kind, Recipe | None] = {
    # 2026-12-04, scripts/int8_eval.py: 200 held-out frames, 4 rocking scans, 8 real modules; AMD EPYC (AVX-512 VNNI),
    # one thread. SSLM with its 100->100 3x3 and its 1x1 convolution in int8, the first one (1->100, on the input
    # itself) in float32: every figure within 0.006 of float32 (joint row too), 0.38x the time, 83 % of the cluster ids
    # unchanged. All three in int8 (0.41x): recall -0.015, the input is too coarse in 8 bits. Named one by one, so
    # that an SSLM with more layers keeps its unmeasured ones in float32.
    "sslm": Recipe(include_prefixes=("/fast/convs.1/", "/fast/conv3/")),
    # No TLM recipe kept every figure: every Conv and Gemm (0.41-0.46x) stayed within 0.01 on the held-out 2D figures
    # but moved 3D recall (+0.105 with 128 calibration frames: 2 of 19 peaks) or the real frames' spot coverage
    # (-0.021 / +0.033); the ResNet alone (0.73x) moved the spot coverage by -0.021.
    "tlm": None,
}


def int8_recipe(kind: Kind) -> Recipe:
    """The measured recipe of `kind`; one-line ValueError for a model that has none (the TLM)."""
    recipe = RECIPES[kind]
    if recipe is None:
        raise ValueError(f"no int8 recipe for the {kind.upper()}: none kept pipeline evaluate's figures within 0.01")
    return recipe


@dataclasses.dataclass(frozen=True)
class QuantizedGraph:
    """An int8 graph written by `quantize_graph`: where, which nodes became int8, from how many calibration frames."""

    path: Path
    nodes_quantized: tuple[str, ...]
    calibration_frames: int
    seconds: float


def recipe_key(recipe: Recipe, calibration_frames: int = CALIBRATION_FRAMES, seed: int = CALIBRATION_SEED) -> str:
    """12 hex digits that change with whatever changes the int8 graph made from one float32 graph: the recipe, the
    calibration frames, QUANTIZE_FORMAT and the onnxruntime version (its quantizer and its pre-processing)."""
    described = {"recipe": dataclasses.asdict(recipe), "calibration": [calibration_frames, seed, CALIBRATION_STEP0],
                 "format": QUANTIZE_FORMAT, "onnxruntime": metadata.version("onnxruntime")}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def calibration_inputs(kind: Kind, input_transform: str = "log", count: int = CALIBRATION_FRAMES,
                       seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """`count` training-side model inputs (H, W) float32: the TLM's log input, or the SSLM's card `input_transform`.

    Imports torch (through `training_data`): call it where the float32 export runs, not in a torch-free worker.
    """
    from pipeline.models.training_data import training_frames

    if count < 1:
        raise ValueError(f"calibration frames: expected at least 1, got {count}")
    transform = "log" if kind == "tlm" else input_transform
    return [training_frames(seed, CALIBRATION_STEP0 + index, 1, transform)[0][0] for index in range(count)]


def select_nodes(graph_nodes: Sequence[tuple[str, str]], recipe: Recipe) -> tuple[str, ...]:
    """The names of the (name, op type) nodes `recipe` makes int8."""
    return tuple(name for name, op_type in graph_nodes if op_type in recipe.op_types
                 and (not recipe.include_prefixes or name.startswith(recipe.include_prefixes))
                 and name not in recipe.exclude_nodes)


def quantize_graph(source: Path, target: Path, calibration: Sequence[np.ndarray], recipe: Recipe) -> QuantizedGraph:
    """Write the int8 graph of the float32 graph `source` to `target` (atomically), calibrated on `calibration`.

    One-line ValueError for a missing source, no or malformed calibration frames, a graph ONNX Runtime cannot
    prepare, or a recipe that selects no node (a renamed graph must not silently stay float32).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ValueError(f"{source}: float32 ONNX graph not found")
    if len(calibration) == 0:
        raise ValueError(f"{source}: no calibration frames given")
    for index, frame in enumerate(calibration):
        if np.ndim(frame) != 2 or not np.all(np.isfinite(frame)):
            raise ValueError(f"calibration frame {index}: expected a finite (H, W) model input, got shape {np.shape(frame)}")

    class Frames(CalibrationDataReader):
        """The calibration frames, one at a time, as the graph's `image` input."""

        def __init__(self) -> None:
            self.frames = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            frame = next(self.frames, None)
            return None if frame is None else {"image": np.ascontiguousarray(frame, dtype=np.float32)}

    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            # ONNX's shape inference only: the symbolic one takes minutes on the TLM and gives the SSLM the same int8 graph
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception as error:  # onnxruntime and onnx raise many kinds; the caller needs one line
            raise ValueError(f"{source}: cannot prepare the graph for quantization ({type(error).__name__}: "
                             f"{one_line(error)})") from None
        nodes = select_nodes([(node.name, node.op_type) for node in onnx.load(str(prepared)).graph.node], recipe)
        if not nodes:
            raise ValueError(f"{source}: the recipe selects no {'/'.join(recipe.op_types)} node (prefixes "
                             f"{list(recipe.include_prefixes)}): not the graph it was written for")

        def write(temporary: Path) -> None:
            # no CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops what was collected instead of merging ranges
            quantize_static(str(prepared), str(temporary), Frames(),
                            quant_format=QuantFormat.QDQ if recipe.quant_format == "qdq" else QuantFormat.QOperator,
                            op_types_to_quantize=list(recipe.op_types), nodes_to_quantize=list(nodes),
                            per_channel=recipe.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            if not any(node.op_type in QUANTIZED_OPS for node in onnx.load(str(temporary)).graph.node):
                raise ValueError(f"{source}: nothing was quantized ({len(nodes)} nodes selected)")

        _write_atomically(target, write)
    return QuantizedGraph(target, nodes, len(calibration), round(time.perf_counter() - started, 1))
