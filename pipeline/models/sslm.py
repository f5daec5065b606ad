"""SSLM: DiPID's self-supervised segmentation network (after Kim & Kanezaki's unsupervised segmentation).

conv3x3 1->100, ReLU, BatchNorm; conv3x3 100->100, ReLU, BatchNorm; conv1x1 100->100, ReLU, BatchNorm.
The per-pixel argmax over the 100 channels is a cluster id; some clusters mean "peak". Which
ones is not learnt from labels: after training, `choose_peak_channels` looks at training frames
with known peaks and keeps the clusters that best cover them; the list travels in the model card.
State-dict keys are DiPID's: conv1, norm1, conv2.0, norm2.0, conv3, norm3.

The last ReLU holds no parameters, so a state dict fits with or without it; the card's
`final_relu` says which way the weights were trained (an early shipped SSLM had none). What the
SSLM sees (log counts as DiPID, or the background-subtracted significance) is the card's
`input_transform`; see `pipeline.models.preprocess`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 100


class SSLM(nn.Module):
    """The network; `forward` returns the (B, 100, H, W) response whose argmax is the cluster."""

    def __init__(self, in_channels: int = 1, channels: int = CHANNELS, n_conv: int = 2, final_relu: bool = True) -> None:
        super().__init__()
        # DiPID's last block is conv1x1, ReLU, BatchNorm; the shipped weights were trained without that
        # ReLU (their card says final_relu false), so the variant is part of the model's description.
        self.final_relu = final_relu
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size=3, padding=1) for _ in range(n_conv - 1))
        self.norm2 = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(n_conv - 1))
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1)
        self.norm3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(F.relu(self.conv1(x)))
        for conv, norm in zip(self.conv2, self.norm2):
            x = norm(F.relu(conv(x)))
        x = self.conv3(x)
        return self.norm3(F.relu(x) if self.final_relu else x)


class FastSSLM(nn.Module):
    """The same function as an `SSLM` in eval mode, arranged for speed; for inference only.

    Activations stay channels-last (oneDNN's fast layout on CPU, tensor cores on GPU), ReLUs run in
    place, and the BatchNorm before the 1x1 `conv3` is folded into it (an eval-mode BatchNorm is a
    per-channel affine map; folding it into a 3x3 convolution would be wrong on the frame's border,
    where the zero padding comes after the norm). One frame on one CPU thread: ~430 ms -> ~215 ms,
    with the same clusters on the frames tried (sums are rounded in another order, so a pixel whose
    two best clusters tie to float rounding could differ).
    """

    def __init__(self, model: SSLM) -> None:
        super().__init__()
        if model.training:
            raise ValueError("FastSSLM needs an SSLM in eval mode (BatchNorm running statistics)")
        self.final_relu = model.final_relu
        norms = [model.norm1, *model.norm2]  # one after each 3x3 conv; the last one feeds conv3
        self.convs = nn.ModuleList([model.conv1, *model.conv2])
        self.norms = nn.ModuleList(norms[:-1])
        self.conv3 = _fold_norm_into_1x1(norms[-1], model.conv3)
        self.norm3 = model.norm3
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x), inplace=True)
            if index < len(self.norms):
                x = self.norms[index](x)
        x = self.conv3(x)
        return self.norm3(F.relu(x, inplace=True) if self.final_relu else x)


def _fold_norm_into_1x1(norm: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """conv(scale * x + shift) as one 1x1 convolution, scale and shift being the eval-mode norm's."""
    if conv.kernel_size != (1, 1):
        raise ValueError("only a 1x1 convolution takes a BatchNorm fold exactly")
    # The SSLM's BatchNorms track running statistics (the default), so these are set.
    assert norm.running_mean is not None and norm.running_var is not None
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, 1, device=conv.weight.device, dtype=conv.weight.dtype)
    assert folded.bias is not None  # built with bias=True, the default
    with torch.no_grad():
        weight = conv.weight[:, :, 0, 0]
        folded.weight.copy_((weight * scale[None, :])[:, :, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros_like(folded.bias)
        folded.bias.copy_(bias + weight @ shift)
    return folded


def losses(response: torch.Tensor) -> dict[str, torch.Tensor]:
    """DiPID's three self-supervised losses of a (B, C, H, W) response.

    similarity: cross-entropy against the response's own argmax (pixels that look alike share a cluster);
    continuity: L1 of vertical and horizontal neighbour differences (clusters are spatially smooth);
    context: mean per-channel spatial variance (weight 0 by default, as in DiPID).
    """
    target = response.argmax(dim=1).detach()
    similarity = F.cross_entropy(response, target)
    vertical = (response[:, :, 1:, :] - response[:, :, :-1, :]).abs().mean()
    horizontal = (response[:, :, :, 1:] - response[:, :, :, :-1]).abs().mean()
    context = response.flatten(2).var(dim=2).mean()
    return {"similarity": similarity, "continuity": vertical + horizontal, "context": context}


def total_loss(
    parts: dict[str, torch.Tensor], similarity: float = 1.0, continuity: float = 1.0, context: float = 0.0
) -> torch.Tensor:
    """The weighted sum DiPID trained on."""
    return similarity * parts["similarity"] + continuity * parts["continuity"] + context * parts["context"]


def clusters_and_mask(response: torch.Tensor, peak_channels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, H, W) response -> (uint8 clusters, uint8 peak mask), each (B, H, W)."""
    clusters = response.argmax(dim=1).to(torch.uint8).cpu().numpy()
    mask = np.isin(clusters, np.asarray(list(peak_channels), dtype=np.int64)).astype(np.uint8)
    return clusters, mask


def choose_peak_channels(
    clusters: np.ndarray, truth: np.ndarray, channels: int = CHANNELS, min_purity: float = 0.0
) -> tuple[list[int], float]:
    """Peak clusters from training frames with known peaks; returns (channels, mean per-frame IoU).

    `clusters` and `truth` are (frames, H, W); an array of fewer dimensions counts as one frame. Greedy:
    start from no cluster, repeatedly add the cluster (among those whose pixels are at least
    `min_purity` peak pixels) that most improves the mean per-frame IoU of the union mask against
    the truth (a frame with empty truth and empty mask counts 1, as in the evaluation); stop when
    no cluster improves it. Per-frame, per-cluster pixel counts make each trial a few array sums.
    """
    clusters = np.asarray(clusters)
    truth = np.asarray(truth)
    if clusters.ndim < 3:
        clusters, truth = clusters.reshape(1, -1), truth.reshape(1, -1)
    frames = clusters.shape[0]
    flat = clusters.reshape(frames, -1).astype(np.int64)
    peak = (truth.reshape(frames, -1) > 0).astype(np.float64)
    offsets = (np.arange(frames) * channels)[:, None]
    pixels = np.bincount((flat + offsets).ravel(), minlength=frames * channels).reshape(frames, channels)
    hits = np.bincount((flat + offsets).ravel(), weights=peak.ravel(), minlength=frames * channels)
    hits = hits.reshape(frames, channels)
    truth_total = peak.sum(axis=1)
    totals = pixels.sum(axis=0)
    purity = np.divide(hits.sum(axis=0), totals, out=np.zeros(channels), where=totals > 0)
    candidates = [c for c in range(channels) if totals[c] > 0 and purity[c] >= min_purity]

    def mean_iou(tp: np.ndarray, predicted: np.ndarray) -> float:
        union = predicted + truth_total - tp
        return float(np.mean(np.where(union > 0, tp / np.maximum(union, 1), 1.0)))

    chosen: list[int] = []
    tp, predicted = np.zeros(frames), np.zeros(frames)
    best = mean_iou(tp, predicted)
    while True:
        step_best, step_channel = best, None
        for channel in candidates:
            if channel in chosen:
                continue
            iou = mean_iou(tp + hits[:, channel], predicted + pixels[:, channel])
            if iou > step_best + 1e-9:
                step_best, step_channel = iou, channel
        if step_channel is None:
            return chosen, best
        chosen.append(step_channel)
        best, tp, predicted = step_best, tp + hits[:, step_channel], predicted + pixels[:, step_channel]
