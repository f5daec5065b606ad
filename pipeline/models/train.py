"""Training both models on synthetic frames, resumable step for step.

Data for step `s` comes from `np.random.default_rng([seed, s])`, so a resumed run sees exactly the
frames an uninterrupted run would. A checkpoint holds the model, the optimizer, the step and
torch's RNG states as tensors and plain containers (loaded with `weights_only=True`), so losses
after `--resume` equal those of an uninterrupted run. The run directory gets `losses.jsonl`
(one JSON object per step), `checkpoint.pt` (latest) and, at the end, the safetensors weights
with their model card.

Generator settings are randomised per frame (background, diffuse scatter, streaks, dead pixels)
so that the models do not learn one background level; the held-out evaluation uses other levels.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from tqdm import tqdm

from pipeline.common.devices import resolve_device
from pipeline.models import sslm as sslm_module
from pipeline.models import tlm as tlm_module
from pipeline.models.card import ModelCard, save_weights
from pipeline.models.scoring import instance_figures
from pipeline.models.training_data import TRAINING_DATA, targets_from_labels, training_frames

if TYPE_CHECKING:
    from torchvision.models.detection import MaskRCNN

CHECKPOINT_NAME = "checkpoint.pt"
LOSS_LOG_NAME = "losses.jsonl"
# Score thresholds `calibrate_tlm_threshold` tries: 0.3, 0.35, ..., 0.95.
TLM_THRESHOLD_CANDIDATES: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))


def device_description(device: torch.device) -> str:
    """What trained the weights, for the model card."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def cosine_lr(base: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5 % of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class RunState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # tensors and plain values kept with the checkpoint


def save_checkpoint(path: Path, state: RunState) -> None:
    """Model, optimizer, step and RNG states; written to a temporary file then renamed (never half)."""
    payload: dict[str, Any] = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "torch_rng": torch.get_rng_state(),
        "extra": state.extra,
    }
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, state: RunState, device: torch.device) -> None:
    payload = torch.load(path, weights_only=True, map_location=device)
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step = int(payload["step"])
    state.extra = payload.get("extra", {})
    torch.set_rng_state(payload["torch_rng"].cpu())
    if "cuda_rng" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the loss lines of steps before `step` (a resumed run rewrites the ones after its checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    path.write_text("".join(line + "\n" for line in kept))


def run_training(
    run_dir: Path,
    state: RunState,
    steps: int,
    loss_of_step: Callable[[int], dict[str, torch.Tensor]],
    lr_of_step: Callable[[int], float],
    resume: bool,
    device: torch.device,
    checkpoint_every: int,
    description: str,
    progress: bool = True,
    clip_grad: float | None = 10.0,
    stop_after: int | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """The loop both models share; returns the loss records of the steps run now.

    `stop_after` ends the run early at that step with a checkpoint, as an interruption would
    (the schedule still follows `steps`), so that resuming can be tested and time-boxed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT_NAME
    log_path = run_dir / LOSS_LOG_NAME
    if resume:
        if not checkpoint.exists():
            raise FileNotFoundError(f"{checkpoint}: no checkpoint to resume from")
        load_checkpoint(checkpoint, state, device)
        _truncate_log(log_path, state.step)
    elif log_path.exists():
        log_path.unlink()
    records: list[dict[str, float]] = []
    state.model.train()
    bar = tqdm(total=steps, initial=state.step, desc=description, disable=not progress, dynamic_ncols=True)
    with open(log_path, "a") as log:
        while state.step < min(steps, stop_after if stop_after is not None else steps):
            started = time.perf_counter()
            lr = lr_of_step(state.step)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            parts = loss_of_step(state.step)
            loss = cast(torch.Tensor, sum(parts.values()))  # both models' losses are non-empty dicts of tensors
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip_grad)
            state.optimizer.step()
            record = {"step": state.step, "loss": float(loss.detach()), "lr": lr, "seconds": time.perf_counter() - started}
            record.update({name: float(value.detach()) for name, value in parts.items()})
            log.write(json.dumps(record) + "\n")
            log.flush()
            records.append(record)
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if after_step is not None:
                after_step(state.step)
                state.model.train()
            if state.step % checkpoint_every == 0 or state.step in (steps, stop_after):
                save_checkpoint(checkpoint, state)
    bar.close()
    return records


def _command_line() -> str:
    return " ".join(shlex.quote(arg) for arg in sys.argv)


def train_tlm(
    run_dir: Path,
    steps: int = 3000,
    batch_size: int = 2,
    seed: int = 0,
    lr: float = 5e-4,
    device: str = "auto",
    backbone: str = "resnet18_fpn",
    resume: bool = False,
    weights_out: Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    command: str | None = None,
    stop_after: int | None = None,
    calibration_frames: int = 48,
) -> Path | None:
    """Train a TLM from scratch at native size (AdamW, warm-up + cosine); returns the weights file.

    Returns None when `stop_after` ended the run before `steps` (resume it to finish).
    At the end the score threshold is calibrated on unseen training frames (`calibrate_tlm_threshold`).
    """
    torch.manual_seed(seed)
    target_device = resolve_device(device)
    card = tlm_module.light_card(backbone=backbone)
    if backbone == "resnet50_fpn":  # DiPID's layout at native size, trained from scratch
        card = card.replace(min_size=195, max_size=487)
    model = tlm_module.build_tlm(card).to(target_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    state = RunState(model, optimizer)

    def loss_of_step(step: int) -> dict[str, torch.Tensor]:
        inputs, labels = training_frames(seed, step, batch_size)
        images = tlm_module.to_images(torch.from_numpy(inputs).to(target_device))
        targets = [{k: v.to(target_device) for k, v in targets_from_labels(frame_labels).items()} for frame_labels in labels]
        return model(images, targets)

    run_training(
        Path(run_dir), state, steps, loss_of_step, lambda s: cosine_lr(lr, s, steps, warmup=min(200, steps // 10 + 1)),
        resume, target_device, checkpoint_every, "train tlm", progress, stop_after=stop_after,
    )
    if state.step < steps:
        return None  # stopped early: the checkpoint holds the state, no final weights yet
    threshold, figures = calibrate_tlm_threshold(model, card, seed, calibration_frames, target_device)
    card = card.replace(
        training_command=command or _command_line(), data=TRAINING_DATA + f"; seed {seed}; batch {batch_size}",
        device=device_description(target_device), steps=steps, score_threshold=threshold,
        notes=f"score threshold {threshold:.2f} calibrated on {calibration_frames} unseen training frames "
        f"(mean IoU {figures['mean_iou']:.3f}, F1 {figures['f1']:.3f} there)",
    )
    out = Path(weights_out) if weights_out else Path(run_dir) / "tlm.safetensors"
    save_weights(out, model.state_dict(), card)
    return out


def calibrate_tlm_threshold(
    model: MaskRCNN, card: ModelCard, seed: int, frames: int, device: torch.device,
    candidates: tuple[float, ...] = TLM_THRESHOLD_CANDIDATES,
) -> tuple[float, dict[str, float]]:
    """The score threshold with the best mean IoU + instance F1 on `frames` unseen training frames.

    Training-distribution frames only (steps >= 3e6 of the training seed), never the held-out set.
    """
    model.eval()
    saved = model.roi_heads.score_thresh
    model.roi_heads.score_thresh = min(candidates)
    outputs, truths = [], []
    with torch.inference_mode():
        for index in range(frames):
            inputs, labels = training_frames(seed, 3 * 10**6 + index, 1)
            outputs.append(model(tlm_module.to_images(torch.from_numpy(inputs).to(device)))[0])
            truths.append(labels[0])
    model.roi_heads.score_thresh = saved
    best: tuple[float, float, dict[str, float]] = (-1.0, card.score_threshold or 0.5, {})
    for threshold in candidates:
        instances = [tlm_module.paint_instances({k: v[output["scores"] >= threshold] for k, v in output.items()}, truth.shape)[0]
                     for output, truth in zip(outputs, truths)]
        figures = instance_figures(instances, truths)
        score = figures["mean_iou"] + figures["f1"]
        if score > best[0]:
            best = (score, threshold, {"mean_iou": figures["mean_iou"], "f1": figures["f1"]})
    return best[1], best[2]


def _crop(inputs: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random `size` x `size` crops (the SSLM's receptive field is 5x5; crops make steps cheap)."""
    if size <= 0:
        return inputs, labels
    height, width = inputs.shape[1:]
    out_inputs, out_labels = [], []
    for frame, label in zip(inputs, labels):
        row, col = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        out_inputs.append(frame[row:row + size, col:col + size])
        out_labels.append(label[row:row + size, col:col + size])
    return np.stack(out_inputs), np.stack(out_labels)


def train_sslm(
    run_dir: Path,
    steps: int = 300,
    batch_size: int = 8,
    seed: int = 0,
    lr: float = 0.1,
    device: str = "auto",
    resume: bool = False,
    weights_out: Path | None = None,
    checkpoint_every: int = 50,
    crop: int = 96,
    channel_frames: int = 64,
    select_every: int = 10,
    select_frames: int = 16,
    progress: bool = True,
    command: str | None = None,
    stop_after: int | None = None,
    similarity_weight: float = 1.0,
    continuity_weight: float = 1.0,
    context_weight: float = 0.0,
    input_transform: str = "significance",
) -> Path | None:
    """Train the SSLM without labels (SGD, momentum 0.9, as DiPID), then pick its peak channels.

    `input_transform` "significance" (default) trains on background-subtracted frames
    (`pipeline.models.preprocess.to_significance`), "log" on DiPID's log counts; the card records which.

    Labels are used only to read the clusters, never by the optimiser: every `select_every` steps
    the snapshot is scored by the mean per-frame IoU of its best peak channels on `select_frames`
    training-distribution frames, the best snapshot is kept, and its peak channels are chosen on
    `channel_frames` further frames. Nothing of the held-out set is used.
    """
    torch.manual_seed(seed)
    target_device = resolve_device(device)
    model = sslm_module.SSLM().to(target_device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    state = RunState(model, optimizer)

    def loss_of_step(step: int) -> dict[str, torch.Tensor]:
        inputs, labels = training_frames(seed, step, batch_size, input_transform)
        inputs, _ = _crop(inputs, labels, crop, np.random.default_rng([seed, step, 1]))
        response = model(torch.from_numpy(inputs)[:, None].to(target_device))
        parts = sslm_module.losses(response)
        return {
            "similarity": similarity_weight * parts["similarity"],
            "continuity": continuity_weight * parts["continuity"],
            "context": context_weight * parts["context"],
        }

    def keep_best(step: int) -> None:
        # Kanezaki-style training merges and splits clusters as it goes, and how well the clusters
        # cover peaks swings from step to step: keep the snapshot whose clusters cover them best.
        if step % select_every and step != steps:
            return
        _, iou = sslm_peak_channels(model, seed, select_frames, target_device, first=2 * 10**6,
                                    input_transform=input_transform)
        if iou > state.extra.get("best_iou", -1.0):
            state.extra.update(best_iou=iou, best_step=step, best_model=copy_state(model))

    run_training(
        Path(run_dir), state, steps, loss_of_step, lambda s: lr, resume, target_device, checkpoint_every,
        "train sslm", progress, clip_grad=None, stop_after=stop_after, after_step=keep_best,
    )
    if state.step < steps:
        return None
    model.load_state_dict(state.extra["best_model"])
    peak_channels, channel_iou = sslm_peak_channels(model, seed, channel_frames, target_device,
                                                    input_transform=input_transform)
    card = ModelCard(
        architecture="sslm", peak_channels=peak_channels, final_relu=model.final_relu,
        input_transform=input_transform,
        training_command=command or _command_line(),
        data=TRAINING_DATA + f"; seed {seed}; batch {batch_size} crops of {crop} px; peak channels from "
        f"{channel_frames} unseen training frames, mean IoU {channel_iou:.3f}",
        device=device_description(target_device), steps=steps,
        notes=f"losses: similarity x{similarity_weight}, continuity x{continuity_weight}, context x{context_weight}; "
        f"snapshot of step {state.extra['best_step']} (best of every {select_every} steps)",
    )
    out = Path(weights_out) if weights_out else Path(run_dir) / "sslm.safetensors"
    save_weights(out, model.state_dict(), card)
    return out


def copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def sslm_peak_channels(
    model: torch.nn.Module, seed: int, frames: int, device: torch.device, first: int = 10**6,
    input_transform: str = "log",
) -> tuple[list[int], float]:
    """The SSLM's peak clusters, chosen on training-distribution frames the optimiser never saw (steps >= `first`)."""
    model.eval()
    clusters, truth = [], []
    with torch.inference_mode():
        for index in range(frames):
            inputs, labels = training_frames(seed, first + index, 1, input_transform)
            response = model(torch.from_numpy(inputs)[:, None].to(device))
            clusters.append(response.argmax(dim=1).cpu().numpy())
            truth.append(labels)
    return sslm_module.choose_peak_channels(np.concatenate(clusters), np.concatenate(truth))
