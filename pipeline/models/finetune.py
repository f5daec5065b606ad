"""Fine-tuning both models on frames people labelled, with whole scans held out for validation.

The labelled frames come from a DiPID/Zooniverse export paired with their NeXus scans
(`pipeline.models.labels.load_labelled_frames`). DiPID split rows at random, so one image's two
classifications and neighbouring frames of one scan fell on both sides of its split; here whole
scans are held out (`split_by_scan`), never frames of one scan on both sides. Training starts from
the shipped weights or a given file (a DiPID checkpoint too), can mix in synthetic frames, and
uses the same loop as training from scratch (checkpoints, `--resume`, progress, `losses.jsonl`).
The model card records the labelled data (CSV SHA-256, scans trained on and held out, images)
and the held-out figures before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.common.devices import resolve_device
from pipeline.config import SSLMSettings, TLMSettings
from pipeline.models import sslm as sslm_module
from pipeline.models import tlm as tlm_module
from pipeline.models.card import save_weights
from pipeline.models.joint import load_sslm, load_tlm
from pipeline.models.preprocess import INPUT_TRANSFORMS
from pipeline.models.scoring import components, instance_figures
from pipeline.models.train import RunState, _command_line, cosine_lr, device_description, run_training
from pipeline.models.training_data import targets_from_labels, training_frames

if TYPE_CHECKING:
    from pipeline.models.labels import LabelledFrame, LabelledSet


@dataclass(frozen=True)
class ScanSplit:
    """Labelled frames split by whole scans."""

    train: list[LabelledFrame]
    held_out: list[LabelledFrame]
    train_scans: list[str]
    held_out_scans: list[str]


def split_by_scan(frames: list[LabelledFrame], hold_out: float = 0.25, seed: int = 0) -> ScanSplit:
    """Hold out about `hold_out` of the scans (at least one when there are two or more), chosen by `seed`."""
    scans = sorted({frame.scan for frame in frames})
    if not scans:
        raise ValueError("no labelled frames to train on (none of the labelled images could be paired with a scan)")
    order = list(np.random.default_rng(seed).permutation(len(scans)))
    count = 0 if len(scans) < 2 or hold_out <= 0 else max(1, min(len(scans) - 1, round(hold_out * len(scans))))
    held = sorted(scans[i] for i in order[:count])
    return ScanSplit([f for f in frames if f.scan not in held], [f for f in frames if f.scan in held],
                     [s for s in scans if s not in held], held)


def _batch(frames: list[LabelledFrame], step: int, batch_size: int, seed: int, input_transform: str,
           synthetic_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Step `step`'s (model inputs, instance labels): the same frames whenever the step is asked for (resume)."""
    rng = np.random.default_rng([seed, step, 7])
    synthetic = int(rng.binomial(batch_size, synthetic_fraction)) if synthetic_fraction > 0 else 0
    picked = [frames[int(i)] for i in rng.integers(0, len(frames), batch_size - synthetic)]
    transform = INPUT_TRANSFORMS[input_transform]
    inputs = [transform(frame.counts) for frame in picked]
    labels = [frame.labels.astype(np.uint16) for frame in picked]
    if synthetic:
        extra_inputs, extra_labels = training_frames(seed, step, synthetic, input_transform)
        inputs += list(extra_inputs)
        labels += list(extra_labels)
    return np.stack(inputs).astype(np.float32), np.stack(labels)


def _tlm_figures(model: torch.nn.Module, frames: list[LabelledFrame], device: torch.device) -> dict[str, float] | None:
    if not frames:
        return None
    model.eval()
    instances = []
    with torch.inference_mode():
        for frame in frames:
            inputs = torch.from_numpy(INPUT_TRANSFORMS["log"](frame.counts)[None]).to(device)
            output = model(tlm_module.to_images(inputs))[0]
            instances.append(tlm_module.paint_instances(output, frame.labels.shape)[0])
    return instance_figures(instances, [frame.labels for frame in frames])


def _sslm_clusters(model: torch.nn.Module, frames: list[LabelledFrame], device: torch.device, input_transform: str) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return np.stack([model(torch.from_numpy(INPUT_TRANSFORMS[input_transform](f.counts)[None, None]).to(device)).argmax(dim=1)[0]
                         .cpu().numpy() for f in frames])


def _sslm_figures(clusters: np.ndarray, channels: list[int], frames: list[LabelledFrame]) -> dict[str, float] | None:
    if not frames:
        return None
    masks = np.isin(clusters, np.asarray(channels, dtype=np.int64))
    return instance_figures([components(mask) for mask in masks], [frame.labels for frame in frames])


def _labelled_data(labelled: LabelledSet, split: ScanSplit, synthetic_fraction: float) -> str:
    return (f"labelled frames: {labelled.csv_path.name} sha256 {labelled.csv_sha256}, {labelled.images} images of "
            f"{labelled.classifications} classifications ({len(labelled.frames)} paired with scans); trained on scans "
            f"{', '.join(split.train_scans)} ({len(split.train)} frames), held out scans {', '.join(split.held_out_scans) or 'none'} "
            f"({len(split.held_out)} frames); synthetic fraction {synthetic_fraction:g}")


def _evaluation(before: dict[str, float] | None, after: dict[str, float] | None, split: ScanSplit,
                labelled: LabelledSet) -> dict[str, Any]:
    return {"labelled_held_out": {"before": before, "after": after, "held_out_scans": split.held_out_scans,
                                  "train_scans": split.train_scans, "csv_sha256": labelled.csv_sha256, "images": labelled.images}}


def finetune_tlm(run_dir: Path, labelled: LabelledSet, steps: int = 200, batch_size: int = 2, seed: int = 0, lr: float = 1e-4,
                 device: str = "auto", init: Path | None = None, synthetic_fraction: float = 0.0, hold_out: float = 0.25,
                 resume: bool = False, weights_out: Path | None = None, checkpoint_every: int = 50, progress: bool = True,
                 command: str | None = None, stop_after: int | None = None) -> Path | None:
    """Fine-tune the TLM (the shipped weights, or `init`) on labelled frames; returns the weights file (None if stopped early)."""
    torch.manual_seed(seed)
    target = resolve_device(device)
    model, loaded = load_tlm(TLMSettings(weights=init))
    model = model.to(target)
    split = split_by_scan(labelled.frames, hold_out, seed)
    before = _tlm_figures(model, split.held_out, target)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    state = RunState(model, optimizer)

    def loss_of_step(step: int) -> dict[str, torch.Tensor]:
        inputs, labels = _batch(split.train, step, batch_size, seed, "log", synthetic_fraction)
        images = tlm_module.to_images(torch.from_numpy(inputs).to(target))
        targets = [{k: v.to(target) for k, v in targets_from_labels(frame).items()} for frame in labels]
        losses: dict[str, torch.Tensor] = model(images, targets)
        return losses

    run_training(Path(run_dir), state, steps, loss_of_step, lambda s: cosine_lr(lr, s, steps, warmup=min(20, steps // 10 + 1)),
                 resume, target, checkpoint_every, "fine-tune tlm", progress, stop_after=stop_after)
    if state.step < steps:
        return None
    after = _tlm_figures(model, split.held_out, target)
    card = loaded.card.replace(
        training_command=command or _command_line(),
        data=_labelled_data(labelled, split, synthetic_fraction) + f"; started from {loaded.path.name} sha256 {loaded.sha256[:16]}",
        device=device_description(target), steps=steps,
    )
    card = card.replace(evaluation={**card.evaluation, **_evaluation(before, after, split, labelled)})
    out = Path(weights_out) if weights_out else Path(run_dir) / "tlm.safetensors"
    save_weights(out, model.state_dict(), card)
    return out


def finetune_sslm(run_dir: Path, labelled: LabelledSet, steps: int = 50, batch_size: int = 4, seed: int = 0, lr: float = 0.01,
                  device: str = "auto", init: Path | None = None, synthetic_fraction: float = 0.0, hold_out: float = 0.25,
                  resume: bool = False, weights_out: Path | None = None, checkpoint_every: int = 25, progress: bool = True,
                  command: str | None = None, stop_after: int | None = None) -> Path | None:
    """Fine-tune the SSLM (self-supervised, as DiPID) on the labelled frames' pixels; its peak channels are then
    chosen on the training scans' labels and scored on the held-out scans. Returns the weights (None if stopped early)."""
    torch.manual_seed(seed)
    target = resolve_device(device)
    model, loaded = load_sslm(SSLMSettings(weights=init))
    model = model.to(target)
    transform = loaded.card.input_transform or "log"
    split = split_by_scan(labelled.frames, hold_out, seed)
    before = _sslm_figures(_sslm_clusters(model, split.held_out, target, transform), list(loaded.card.peak_channels or []),
                           split.held_out) if split.held_out else None
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    state = RunState(model, optimizer)

    def loss_of_step(step: int) -> dict[str, torch.Tensor]:
        inputs, _ = _batch(split.train, step, batch_size, seed, transform, synthetic_fraction)
        parts = sslm_module.losses(model(torch.from_numpy(inputs)[:, None].to(target)))
        return {"similarity": parts["similarity"], "continuity": parts["continuity"]}

    run_training(Path(run_dir), state, steps, loss_of_step, lambda s: lr, resume, target, checkpoint_every, "fine-tune sslm",
                 progress, clip_grad=None, stop_after=stop_after)
    if state.step < steps:
        return None
    clusters = _sslm_clusters(model, split.train, target, transform)
    channels, train_iou = sslm_module.choose_peak_channels(clusters, np.stack([f.labels for f in split.train]))
    after = _sslm_figures(_sslm_clusters(model, split.held_out, target, transform), channels, split.held_out) if split.held_out else None
    card = loaded.card.replace(
        peak_channels=channels, training_command=command or _command_line(), device=device_description(target), steps=steps,
        data=_labelled_data(labelled, split, synthetic_fraction) + f"; started from {loaded.path.name} sha256 "
        f"{loaded.sha256[:16]}; peak channels chosen on the training scans' labels (mean IoU {train_iou:.3f})",
    )
    card = card.replace(evaluation={**card.evaluation, **_evaluation(before, after, split, labelled)})
    out = Path(weights_out) if weights_out else Path(run_dir) / "sslm.safetensors"
    save_weights(out, model.state_dict(), card)
    return out
