"""The joint predictor on ONNX Runtime: the same FramePrediction as `JointPredictor`, without torch.

Why: on a CPU, ONNX Runtime runs the exported graphs (`pipeline.models.onnx_export`) in ~0.6x (SSLM) and ~0.8x (TLM)
of torch's time with the same masks, and a worker that imports neither torch nor torchvision is ready in a second
or two with far less memory. This module, and everything it imports, must never import torch: a graph missing
from the cache is exported by a child process (`python -m pipeline.models.onnx_export`, see `export_in_child`),
never here. `tests/test_onnx_backend.py` checks it.

What stays in NumPy: preprocessing (`pipeline.models.preprocess`, the reference torch's CPU path uses too), painting
the TLM's mask patches into instance labels (`paint_instances`, a port of `pipeline.models.tlm.paint_instances`),
the SSLM's peak mask from its cluster ids, and the TLM's per-area caps (`onnx_export.caps_for_shape`).
Frames of any shape: a graph has dynamic height and width; frames larger than 195 x 487 get the TLM graph of
their caps, exported on first use of that size.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pipeline.errors import one_line
from pipeline.models import onnx_export
from pipeline.models.card import DIPID_SSLM_PEAK_CHANNELS, WeightsError, sha256_of
from pipeline.models.onnx_export import Caps, Graph, Kind
from pipeline.models.prediction import Detection, FramePrediction, as_frame_batch, empty_predictions
from pipeline.models.preprocess import fix_dead_pixels, to_model_input, to_significance

if TYPE_CHECKING:
    import onnxruntime

    from pipeline.config import ModelSettings

MASK_THRESHOLD = 0.5  # as pipeline.models.tlm.MASK_THRESHOLD: a mask probability above it is the instance's pixel
MASK_PADDING = 1  # torchvision pads the mask patches by one pixel before pasting them into their boxes
SSLM_CHANNELS = 100  # pipeline.models.sslm.CHANNELS (that module imports torch)
EXPORT_TIMEOUT_S = 900.0
Exporter = Callable[["ModelSettings", Kind, "Caps | None"], None]


def export_in_child(settings: ModelSettings, kind: Kind, caps: Caps | None = None) -> None:
    """Export one graph into the cache by `python -m pipeline.models.onnx_export` in a child process.

    Why a child: the export needs torch, and the process that runs the graphs must never import it. A failure
    raises one line (a WeightsError for what the child reported about the weights, else RuntimeError).
    """
    command = [sys.executable, "-m", "pipeline.models.onnx_export", "--settings-json", settings.model_dump_json(),
               "--kind", kind]
    if caps is not None:
        command += ["--caps", ",".join(str(cap) for cap in caps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"exporting the {kind.upper()} to ONNX took more than {EXPORT_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        message = lines[-1].removeprefix("pipeline onnx export: ") if lines else f"exit code {done.returncode}"
        raise WeightsError(f"ONNX export of the {kind.upper()} failed: {message}")


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """One InferenceSession on the CPU: `threads` intra-op threads (0: ONNX Runtime's default), one graph at a time."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle threads sleep instead of spinning: a CPU machine runs several workers and the daemon on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types; the user needs one line
        raise WeightsError(f"{path}: cannot load the ONNX graph ({type(error).__name__}: {one_line(error)})") from None


class OnnxJointPredictor:
    """TLM and SSLM on ONNX Runtime (CPU), the same contract and outputs as `JointPredictor`; either may be disabled."""

    def __init__(self, settings: ModelSettings, threads: int = 0, exporter: Exporter | None = None) -> None:
        """Graphs from the cache, made first (by `exporter`, default a child process) when missing.

        `threads`: intra-op threads per session (0: ONNX Runtime's default, all cores). A bad weights file or
        peak channel raises a one-line WeightsError.
        """
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.settings = settings
        self.threads = threads
        self.exporter: Exporter = exporter or export_in_child
        self.tlm_path = onnx_export.weights_path(settings, "tlm") if settings.tlm.enabled else None
        self.sslm_path = onnx_export.weights_path(settings, "sslm") if settings.sslm.enabled else None
        self.tlm_sha256 = sha256_of(self.tlm_path) if self.tlm_path else None
        self.sslm_sha256 = sha256_of(self.sslm_path) if self.sslm_path else None
        self.tlm_sessions: dict[Caps, onnxruntime.InferenceSession] = {}
        self.tlm_card: dict[str, Any] = {}
        self.reference_caps: Caps = (0, 0, 0)
        if self.tlm_path is not None:
            graph = self._graph("tlm", None)
            self.reference_caps = cast(Caps, tuple(int(cap) for cap in graph.manifest["reference_caps"]))
            self.tlm_card = dict(graph.manifest["card"])
            self.tlm_sessions[self.reference_caps] = _session(graph.path, threads)
        self.sslm_session: onnxruntime.InferenceSession | None = None
        self.sslm_card: dict[str, Any] = {}
        self.peak_channels: list[int] = []
        self.sslm_input = "log"
        if self.sslm_path is not None:
            graph = self._graph("sslm", None)
            card = dict(graph.manifest["card"])
            if settings.sslm.peak_channels is not None:  # config over card, as load_sslm
                card["peak_channels"] = list(settings.sslm.peak_channels)
            elif card.get("peak_channels") is None:
                card["peak_channels"] = list(DIPID_SSLM_PEAK_CHANNELS)
            bad = [c for c in card["peak_channels"] if not 0 <= c < SSLM_CHANNELS]
            if bad:
                raise WeightsError(f"{self.sslm_path}: peak channel {bad[0]} outside 0..{SSLM_CHANNELS - 1}")
            self.sslm_card = card
            self.peak_channels = list(card["peak_channels"])
            self.sslm_input = card.get("input_transform") or "log"
            self.sslm_session = _session(graph.path, threads)
        self._peak_channels = np.asarray(self.peak_channels, dtype=np.int64)

    def _graph(self, kind: Kind, caps: Caps | None) -> Graph:
        """The cached graph, exported first when missing."""
        sha256 = self.tlm_sha256 if kind == "tlm" else self.sslm_sha256
        found = onnx_export.find(self.settings, kind, sha256, caps)
        if found is None:
            self.exporter(self.settings, kind, caps)
            found = onnx_export.find(self.settings, kind, sha256, caps)
        if found is None:
            raise WeightsError(f"{onnx_export.cache_dir(self.settings)}: the {kind.upper()} graph is not in the ONNX "
                               "cache after its export")
        return found

    def _tlm_session(self, caps: Caps) -> onnxruntime.InferenceSession:
        """The TLM session for frames with these caps (a larger frame's graph is exported on its first frame)."""
        if caps not in self.tlm_sessions:
            self.tlm_sessions[caps] = _session(self._graph("tlm", caps).path, self.threads)
        return self.tlm_sessions[caps]

    def detection_cap(self, shape: tuple[int, ...]) -> int:
        """At most this many detections come back for a frame of `shape` (0 without a TLM)."""
        return onnx_export.caps_for_shape(self.reference_caps, shape)[2] if self.tlm_path else 0

    def provenance(self) -> dict[str, Any]:
        """Per model: enabled, weights path, SHA-256 and effective settings, as `JointPredictor.provenance`, plus the backend."""

        def describe(path: Path | None, sha256: str | None, card: dict[str, Any]) -> dict[str, Any]:
            if path is None:
                return {"enabled": False}
            return {"enabled": True, "weights": str(path), "sha256": sha256, "settings": dict(card)}

        sslm = describe(self.sslm_path, self.sslm_sha256, self.sslm_card)
        if self.sslm_path is not None and self.settings.sslm.int8:
            sslm["precision"] = "int8"  # its two inner convolutions (pipeline.models.onnx_quantize)
        return {"tlm": describe(self.tlm_path, self.tlm_sha256, self.tlm_card), "sslm": sslm,
                "device": "cpu", "precision": "float32", "backend": "onnxruntime"}

    def predict_batch(self, frames: np.ndarray) -> list[FramePrediction]:
        """Raw (B, H, W) counts (any frame shape) -> one prediction per frame, with per-frame timings.

        Dead pixels are fixed and frames normalised with NumPy, then each frame runs through each graph on its own
        (one frame per call: a frame's masks never depend on the frames beside it).
        """
        frames = as_frame_batch(frames)
        count, shape = frames.shape[0], tuple(frames.shape[1:])
        if count == 0:
            return []
        if self.tlm_path is None and self.sslm_path is None:
            return empty_predictions(count, shape)
        started = time.perf_counter()
        fixed = [fix_dead_pixels(frame) for frame in frames]
        inputs = [to_model_input(frame) for frame in fixed]
        significance = self.sslm_path is not None and self.sslm_input == "significance"
        sslm_inputs = [to_significance(frame) for frame in fixed] if significance else inputs
        preprocess_s = (time.perf_counter() - started) / count

        started = time.perf_counter()
        tlm_results = [self._run_tlm(image) for image in inputs]
        tlm_s = (time.perf_counter() - started) / count

        started = time.perf_counter()
        sslm_results = [self._run_sslm(image) for image in sslm_inputs]
        sslm_s = (time.perf_counter() - started) / count

        timings = {"preprocess": preprocess_s, "tlm": tlm_s, "sslm": sslm_s}
        cap = self.detection_cap(shape)
        return [
            FramePrediction(tlm_labels=labels, detections=detections, ssl_clusters=clusters, ssl_mask=mask,
                            timings=dict(timings), detections_capped=self.tlm_path is not None and len(detections) >= cap,
                            detection_cap=cap)
            for (labels, detections), (clusters, mask) in zip(tlm_results, sslm_results)
        ]

    def _run_tlm(self, image: np.ndarray) -> tuple[np.ndarray, list[Detection]]:
        if self.tlm_path is None:
            return np.zeros(image.shape, dtype=np.uint16), []
        session = self._tlm_session(onnx_export.caps_for_shape(self.reference_caps, image.shape))
        boxes, scores, patches = session.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})
        return paint_instances(boxes, scores, patches, image.shape)

    def _run_sslm(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.sslm_session is None:
            zeros = np.zeros(image.shape, dtype=np.uint8)
            return zeros, zeros.copy()
        (clusters,) = self.sslm_session.run(None, {"image": np.ascontiguousarray(image, dtype=np.float32)})
        return clusters, np.isin(clusters, self._peak_channels).astype(np.uint8)

    def predict_image(self, frame: np.ndarray) -> FramePrediction:
        """Both models on one raw frame."""
        return self.predict_batch(np.asarray(frame)[None])[0]


def paint_instances(boxes: np.ndarray, scores: np.ndarray, patches: np.ndarray,
                    shape: tuple[int, ...]) -> tuple[np.ndarray, list[Detection]]:
    """One frame's TLM graph output -> (uint16 instance labels, detections): `pipeline.models.tlm.paint_instances` in NumPy.

    Instance ids follow the score order (1 = best); instances are painted from the lowest to the highest score so
    that where masks overlap the best one wins. Each (M, M) mask patch is padded by one pixel and resized
    bilinearly into its expanded box, as torchvision's `paste_masks_in_image` does.
    """
    scores = np.asarray(scores, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    order = np.argsort(-scores, kind="stable")
    labels = np.zeros(shape, dtype=np.uint16)
    detections = [Detection(box=cast(tuple[float, float, float, float], tuple(float(v) for v in boxes[index])),
                            score=float(scores[index]), instance_id=rank)
                  for rank, index in enumerate(order, start=1)]
    if len(scores):
        paint_patches(labels, np.asarray(patches, dtype=np.float32), boxes, order)
    return labels, detections


def paint_patches(labels: np.ndarray, patches: np.ndarray, boxes: np.ndarray, order: np.ndarray) -> None:
    """Paint (N, M, M) mask probabilities into `labels` by box, lowest score first; ids = rank in `order`.

    `pipeline.models.tlm._paint_patches` without torch: torchvision's `expand_masks`/`expand_boxes` (float32, boxes
    truncated to integers) and a bilinear resize computed as torch's CPU kernel does (`resize_bilinear`).
    """
    size = patches.shape[-1]
    padded = np.pad(patches, ((0, 0), (MASK_PADDING, MASK_PADDING), (MASK_PADDING, MASK_PADDING)))
    pixel_boxes = expand_boxes(boxes, float(size + 2 * MASK_PADDING) / size).astype(np.int64)  # truncation, as .to(int64)
    height, width = labels.shape
    for rank in range(len(order), 0, -1):
        index = int(order[rank - 1])
        x0, y0, x1, y1 = (int(v) for v in pixel_boxes[index])
        box_width, box_height = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        top, bottom, left, right = max(y0, 0), min(y1 + 1, height), max(x0, 0), min(x1 + 1, width)
        if top >= bottom or left >= right:
            continue
        mask = resize_bilinear(padded[index], box_height, box_width)
        inside = mask[top - y0:bottom - y0, left - x0:right - x0] > MASK_THRESHOLD
        labels[top:bottom, left:right][inside] = rank


def expand_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """torchvision's `expand_boxes` in float32: each (x0, y0, x1, y1) box scaled by `scale` about its centre."""
    boxes = np.asarray(boxes, dtype=np.float32)
    factor = np.float32(scale)
    half_width = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * factor
    half_height = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * factor
    centre_x = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    centre_y = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    return np.stack([centre_x - half_width, centre_y - half_height, centre_x + half_width, centre_y + half_height], axis=1)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to float32, as the fused multiply-adds of torch's vectorised CPU kernels."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _linear_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a linear resize along one axis (align_corners=False), torch's float32 arithmetic."""
    scale = np.float32(size_in) / np.float32(size_out)
    source = _fma(np.full(size_out, scale), np.arange(size_out, dtype=np.float32) + np.float32(0.5),
                  np.full(size_out, -0.5, dtype=np.float32))
    source = np.maximum(source, np.float32(0.0))
    first = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    weight1 = np.clip(source - first.astype(np.float32), np.float32(0.0), np.float32(1.0))
    return first, first + (first < size_in - 1), np.float32(1.0) - weight1, weight1


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D float32 image resized bilinearly (align_corners=False), as `F.interpolate` on torch's CPU.

    Same weights and the same order of float32 operations as torch's kernel as far as they could be matched: on
    random images 99 % of the values are bit-identical, the rest 1 ulp apart (a mask pixel could flip only where its
    probability is within ~1e-7 of the threshold).
    """
    row0, row1, row_weight0, row_weight1 = _linear_weights(image.shape[0], height)
    col0, col1, col_weight0, col_weight1 = _linear_weights(image.shape[1], width)
    top, bottom = image[row0], image[row1]
    top = _fma(top[:, col0], col_weight0, top[:, col1] * col_weight1)
    bottom = _fma(bottom[:, col0], col_weight0, bottom[:, col1] * col_weight1)
    return _fma(top, row_weight0[:, None], bottom * row_weight1[:, None])

