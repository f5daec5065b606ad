"""The joint predictor: both models on a frame, the contract the workers and users call.

`predict_batch` is what workers run; DiPID's four user functions (predict an image, predict a
scan, compile a 3D volume, save an overlay) are kept as typed methods. Predictions do not depend
on how frames are batched (see `predict_batch`), so live and offline runs give the same store.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy import ndimage

from pipeline.common.detector import FRAME_SHAPE
from pipeline.common.devices import resolve_device, resolve_precision
from pipeline.models import preprocess_torch
from pipeline.models import sslm as sslm_module
from pipeline.models import tlm as tlm_module
from pipeline.models.batch_buckets import bucket_for
from pipeline.models.card import (
    DIPID_SSLM_PEAK_CHANNELS,
    DIPID_TLM,
    SSLM_INPUT_TRANSFORMS,
    ModelCard,
    WeightsError,
    default_weights_path,
    load_into,
    load_weights,
)
from pipeline.models.prediction import FramePrediction, as_frame_batch, empty_predictions
from pipeline.models.preprocess import fix_dead_pixels, to_model_input, to_significance

if TYPE_CHECKING:
    from pipeline.config import ModelSettings, SSLMSettings, TLMSettings

@dataclass(frozen=True)
class LoadedWeights:
    """Where a model came from and the settings it runs with."""

    path: Path
    sha256: str
    card: ModelCard


def load_tlm(settings: TLMSettings) -> tuple[torch.nn.Module, LoadedWeights]:
    """The TLM from the settings' weights (default: the shipped file), config values over the card."""
    path = Path(settings.weights) if settings.weights is not None else default_weights_path("tlm")
    state_dict, card, sha256 = load_weights(path)
    if card is None:  # a DiPID checkpoint: DiPID's settings
        card = ModelCard(architecture="tlm", notes="DiPID checkpoint without a card: DiPID's settings", **DIPID_TLM)
    if card.architecture != "tlm":
        raise WeightsError(f"{path}: holds a {card.architecture} model, not a TLM")
    card = card.replace(
        backbone=settings.backbone, min_size=settings.min_size, max_size=settings.max_size,
        score_threshold=settings.score_threshold, nms_iou=settings.nms_iou,
        proposals=settings.proposals, detections=settings.detections,
    )
    try:
        model = tlm_module.build_tlm(card)
    except ValueError as error:
        raise WeightsError(f"{path}: {error}") from None
    load_into(path, model, state_dict)
    _, proposals, detections = model.reference_caps  # what runs, recorded in the provenance even where the card is silent
    return model.eval(), LoadedWeights(path, sha256, card.replace(proposals=proposals, detections=detections))


def load_sslm(settings: SSLMSettings) -> tuple[sslm_module.SSLM, LoadedWeights]:
    """The SSLM from the settings' weights (default: the shipped file), config peak channels over the card."""
    path = Path(settings.weights) if settings.weights is not None else default_weights_path("sslm")
    state_dict, card, sha256 = load_weights(path)
    if card is None:
        card = ModelCard(
            architecture="sslm", peak_channels=list(DIPID_SSLM_PEAK_CHANNELS),
            notes="DiPID checkpoint without a card: DiPID's peak channels",
        )
    if card.architecture != "sslm":
        raise WeightsError(f"{path}: holds a {card.architecture} model, not an SSLM")
    card = card.replace(peak_channels=settings.peak_channels)
    model = sslm_module.SSLM(final_relu=card.final_relu is not False)
    load_into(path, model, state_dict)
    if (card.input_transform or "log") not in SSLM_INPUT_TRANSFORMS:
        raise WeightsError(f"{path}: unknown SSLM input_transform {card.input_transform!r} "
                           f"(known: {', '.join(SSLM_INPUT_TRANSFORMS)})")
    bad = [c for c in card.peak_channels or [] if not 0 <= c < sslm_module.CHANNELS]
    if bad:
        raise WeightsError(f"{path}: peak channel {bad[0]} outside 0..{sslm_module.CHANNELS - 1}")
    return model.eval(), LoadedWeights(path, sha256, card)


class JointPredictor:
    """TLM and SSLM together on raw frames; either may be disabled (its outputs are then zeros)."""

    def __init__(
        self,
        tlm: torch.nn.Module | None = None,
        tlm_weights: LoadedWeights | None = None,
        sslm: sslm_module.SSLM | None = None,
        sslm_weights: LoadedWeights | None = None,
        device: str = "cpu",
        precision: Literal["auto", "float32", "bfloat16"] = "float32",
        model_batch: int = 1,
        preprocess_on_device: bool | None = None,
        batch_padding: Literal["fixed", "bucket"] = "fixed",
    ) -> None:
        if model_batch < 1:
            raise ValueError(f"model_batch must be >= 1, got {model_batch}")
        if batch_padding not in ("fixed", "bucket"):
            raise ValueError(f"batch_padding must be fixed or bucket, got {batch_padding!r}")
        self.model_batch = model_batch  # frames per model call, padded with blank frames (see predict_batch)
        self.batch_padding = batch_padding
        self._pinned: torch.Tensor | None = None  # CUDA: the reusable page-locked staging buffer of raw frames
        self._pinned_free: torch.cuda.Event | None = None  # recorded after its last copy to the GPU was queued
        self.device = resolve_device(device)
        # dead pixels, log scale and significance where the models run (pipeline.models.preprocess_torch): on a GPU the
        # worker's CPU no longer holds each frame back; on a CPU NumPy's version, the reference, is as fast
        self.preprocess_on_device = self.device.type != "cpu" if preprocess_on_device is None else preprocess_on_device
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cuda":  # no autotuned kernel choice: the same frame gives the same masks
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.tlm = None if tlm is None else tlm.to(self.device).eval()
        if self.tlm is not None:  # channels-last convolutions: ~10 % faster on CPU, same detections
            self.tlm.backbone.to(memory_format=torch.channels_last)
        self.sslm = None if sslm is None else sslm_module.FastSSLM(sslm.to(self.device).eval())
        self.tlm_weights = tlm_weights
        self.sslm_weights = sslm_weights
        self.peak_channels = list(sslm_weights.card.peak_channels or []) if sslm_weights else []
        self.sslm_input = (sslm_weights.card.input_transform if sslm_weights else None) or "log"

    @classmethod
    def from_settings(cls, settings: ModelSettings, device: str = "cpu") -> JointPredictor:
        """Both models from the config's `models` section; a bad weights file raises one-line WeightsError."""
        tlm, tlm_weights = load_tlm(settings.tlm) if settings.tlm.enabled else (None, None)
        sslm, sslm_weights = load_sslm(settings.sslm) if settings.sslm.enabled else (None, None)
        return cls(tlm, tlm_weights, sslm, sslm_weights, device=device, precision=settings.precision,
                   model_batch=settings.model_batch, batch_padding=settings.batch_padding)

    def provenance(self) -> dict[str, Any]:
        """Per model: enabled, weights path, SHA-256 and effective settings; JSON-serialisable."""

        def describe(weights: LoadedWeights | None) -> dict[str, Any]:
            if weights is None:
                return {"enabled": False}
            return {
                "enabled": True, "weights": str(weights.path), "sha256": weights.sha256,
                "settings": dataclasses.asdict(weights.card),
            }

        return {"tlm": describe(self.tlm_weights), "sslm": describe(self.sslm_weights), "device": str(self.device),
                "precision": self.precision}

    def _autocast(self) -> Any:
        """bfloat16 autocast when asked for, else nothing (float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")

    def predict_batch(self, frames: np.ndarray) -> list[FramePrediction]:
        """Raw (B, H, W) counts (any frame shape: see `pipeline.models.tlm`) -> one prediction per frame, with per-frame timings.

        Dead pixels are fixed and frames normalised here; both models run under inference_mode.
        The models see `model_batch` frames per call, always that many: the frames given, then
        blank frames up to it. Convolution libraries pick their algorithm by batch size (oneDNN on
        CPU gave TLM features differing by ~6e-6 between a batch of 4 and a single frame, enough to
        move boxes and, near a threshold, flip a pixel or a detection), and live and offline runs
        must give the same store; with one fixed shape a frame's masks do not depend on its batch.
        On CPU frame by frame (1, the default) costs nothing measurable (the backbone ran at
        ~40 ms/frame alone vs ~47 ms/frame in a batch of 4); a GPU needs batches to be busy.
        With `batch_padding="bucket"` a call is padded only to its bucket (1, 2, 4, ... model_batch,
        `pipeline.live.batching`): a lone frame costs a one-frame call, and a frame's masks are the
        same in any batch of the same bucket, not across buckets.
        """
        frames = as_frame_batch(frames)
        count, shape = frames.shape[0], tuple(frames.shape[1:])
        if count == 0:
            return []
        started = time.perf_counter()
        if self.tlm is None and self.sslm is None:  # nothing to feed (`pipeline bench --models none`)
            return empty_predictions(count, shape)
        inputs, sslm_inputs = self._prepared(frames)
        preprocess_s = (time.perf_counter() - started) / count

        started = time.perf_counter()
        tlm_results = self._run_tlm(inputs, shape)
        tlm_s = (time.perf_counter() - started) / count

        started = time.perf_counter()
        clusters, mask = self._run_sslm(sslm_inputs, shape)
        sslm_s = (time.perf_counter() - started) / count

        timings = {"preprocess": preprocess_s, "tlm": tlm_s, "sslm": sslm_s}
        cap = 0 if self.tlm is None else tlm_module.detection_cap(self.tlm, shape)
        return [
            FramePrediction(
                tlm_labels=labels, detections=detections, ssl_clusters=clusters[i], ssl_mask=mask[i],
                timings=dict(timings), detections_capped=self.tlm is not None and len(detections) >= cap, detection_cap=cap,
            )
            for i, (labels, detections) in enumerate(tlm_results)
        ]

    def _prepared(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(TLM input, SSLM input) of raw (B, H, W) counts, on the models' device."""
        significance = self.sslm is not None and self.sslm_input == "significance"
        if self.preprocess_on_device:
            host = torch.from_numpy(frames if frames.dtype.name in ("int16", "int32", "float32", "float64") else frames.astype(np.float64))
            if self.device.type == "cuda":
                host = self._staged(host)
            fixed = preprocess_torch.fix_dead_pixels(host.to(self.device, non_blocking=True))
            inputs = preprocess_torch.to_model_input(fixed)
            return inputs, preprocess_torch.to_significance(fixed) if significance else inputs
        fixed_frames = [fix_dead_pixels(frame) for frame in frames]
        inputs = torch.from_numpy(np.stack([to_model_input(frame) for frame in fixed_frames])).to(self.device)
        if not significance:
            return inputs, inputs
        return inputs, torch.from_numpy(np.stack([to_significance(frame) for frame in fixed_frames])).to(self.device)

    def _staged(self, host: torch.Tensor) -> torch.Tensor:
        """CUDA only: the frames copied into a page-locked buffer kept between calls, whose copy to the GPU needs
        no staging copy and runs with non_blocking=True; pinning afresh each call cost an allocation per batch.

        The buffer is rewritten only once the previous call's copy out of it has finished (a CUDA event).
        """
        if (self._pinned is None or self._pinned.dtype != host.dtype or self._pinned.shape[1:] != host.shape[1:]
                or self._pinned.shape[0] < host.shape[0]):
            if self._pinned_free is not None:
                self._pinned_free.synchronize()
            rows = max(host.shape[0], self.model_batch)
            self._pinned = torch.empty((rows, *host.shape[1:]), dtype=host.dtype, pin_memory=True)
            self._pinned_free = None
        elif self._pinned_free is not None:
            self._pinned_free.synchronize()
        staged = self._pinned[:host.shape[0]]
        staged.copy_(host)
        on_device = staged.to(self.device, non_blocking=True)
        self._pinned_free = torch.cuda.Event()
        self._pinned_free.record(torch.cuda.current_stream(self.device))  # the stream the copy was queued on
        return on_device

    def _call_size(self, real: int) -> int:
        """How many frames a model call of `real` frames holds once padded (see predict_batch)."""
        return self.model_batch if self.batch_padding == "fixed" else bucket_for(real, self.model_batch)

    def _padded_batches(self, inputs: torch.Tensor) -> Iterator[tuple[torch.Tensor, int]]:
        """(a padded batch of `_call_size` frames, how many of them are real) over `inputs`, at most `model_batch` real."""
        for first in range(0, inputs.shape[0], self.model_batch):
            batch = inputs[first:first + self.model_batch]
            real = batch.shape[0]
            size = self._call_size(real)
            if real < size:
                batch = torch.cat([batch, batch.new_zeros((size - real, *batch.shape[1:]))])
            yield batch, real

    def _run_tlm(self, inputs: torch.Tensor, shape: tuple[int, ...]) -> list[tuple[np.ndarray, list]]:
        if self.tlm is None:
            return [(np.zeros(shape, dtype=np.uint16), []) for _ in range(inputs.shape[0])]
        outputs = []
        with torch.inference_mode(), self._autocast():  # one fixed batch shape: see predict_batch
            for batch, real in self._padded_batches(inputs):
                outputs += self.tlm(tlm_module.to_images(batch))[:real]
        outputs = [{key: value.float() if value.is_floating_point() else value for key, value in output.items()}
                   for output in outputs]
        return [tlm_module.paint_instances(output, shape) for output in outputs]

    def _run_sslm(self, inputs: torch.Tensor, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if self.sslm is None:
            zeros = np.zeros((inputs.shape[0], *shape), dtype=np.uint8)
            return zeros, zeros.copy()
        results = []
        with torch.inference_mode(), self._autocast():  # one fixed batch shape: see predict_batch
            for batch, real in self._padded_batches(inputs):
                clusters, mask = sslm_module.clusters_and_mask(self.sslm(batch[:, None]), self.peak_channels)
                results.append((clusters[:real], mask[:real]))
        return np.concatenate([c for c, _ in results]), np.concatenate([m for _, m in results])

    # DiPID's user functions -------------------------------------------------------------------

    def predict_image(self, frame: np.ndarray) -> FramePrediction:
        """Both models on one raw frame."""
        return self.predict_batch(np.asarray(frame)[None])[0]

    def predict_scan(self, frames: Iterable[np.ndarray], batch_size: int = 4) -> Iterator[FramePrediction]:
        """Predictions for a scan's frames in order, computed `batch_size` at a time."""
        pending: list[np.ndarray] = []
        for frame in frames:
            pending.append(np.asarray(frame))
            if len(pending) == batch_size:
                yield from self.predict_batch(np.stack(pending))
                pending = []
        if pending:
            yield from self.predict_batch(np.stack(pending))

    @staticmethod
    def compile_volume(masks: Sequence[np.ndarray]) -> np.ndarray:
        """Per-frame binary masks of a scan -> uint32 3D peak labels (0 background).

        Full 3D connectivity (26 neighbours): a peak that drifts by a pixel diagonally between
        consecutive frames stays one peak.
        """
        if len(masks) == 0:
            return np.zeros((0, *FRAME_SHAPE), dtype=np.uint32)
        stack = np.stack([np.asarray(mask) > 0 for mask in masks])
        labels, _ = ndimage.label(stack, structure=np.ones((3, 3, 3), dtype=bool))
        return labels.astype(np.uint32)

    def save_overlay(
        self, frame: np.ndarray, prediction: FramePrediction, path: Path, scale: Literal["linear", "log"] = "log"
    ) -> Path:
        """A PNG of the frame with TLM instances (filled, boxes, scores) and the SSLM mask (outline)."""
        from pipeline.pictures.overlay import render_overlay  # matplotlib only when a picture is asked for

        return render_overlay(frame, prediction, Path(path), scale=scale)
