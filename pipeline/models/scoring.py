"""How well a mask or a set of instances matches the truth: the figures training and evaluation share.

Instances are label images (0 background); a binary mask becomes instances as the live 3D
linking sees them: 8-connected components of at least `MIN_COMPONENT_PX` pixels.
"""

from __future__ import annotations

import numpy as np

from pipeline.common.volume import MIN_PEAK_PIXELS, volume_components

MATCH_IOU = 0.5
MIN_COMPONENT_PX = MIN_PEAK_PIXELS  # instances are counted as the live 3D linking sees them


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two binary masks; 1.0 when both are empty."""
    union = np.logical_or(predicted, truth).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(predicted, truth).sum() / union)


def components(mask: np.ndarray, min_pixels: int = MIN_COMPONENT_PX) -> np.ndarray:
    """8-connected components of a binary mask as instance labels, dropping those under `min_pixels`."""
    return volume_components(np.asarray(mask) > 0, min_pixels)[0]


def pairwise_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IoU matrix [truth x predicted], truth ids, predicted ids) of two label images or volumes."""
    truth_ids = np.unique(truth)
    truth_ids = truth_ids[truth_ids > 0]
    predicted_ids = np.unique(predicted)
    predicted_ids = predicted_ids[predicted_ids > 0]
    if len(truth_ids) == 0 or len(predicted_ids) == 0:
        return np.zeros((len(truth_ids), len(predicted_ids))), truth_ids, predicted_ids
    t_index = np.searchsorted(truth_ids, truth.ravel())
    p_index = np.searchsorted(predicted_ids, predicted.ravel())
    t_valid = truth.ravel() > 0
    p_valid = predicted.ravel() > 0
    both = t_valid & p_valid
    overlap = np.zeros((len(truth_ids), len(predicted_ids)))
    np.add.at(overlap, (t_index[both], p_index[both]), 1)
    t_area = np.bincount(t_index[t_valid], minlength=len(truth_ids))
    p_area = np.bincount(p_index[p_valid], minlength=len(predicted_ids))
    union = t_area[:, None] + p_area[None, :] - overlap
    return overlap / np.maximum(union, 1), truth_ids, predicted_ids


def match_instances(predicted: np.ndarray, truth: np.ndarray, threshold: float = MATCH_IOU) -> tuple[int, int, int]:
    """(matched, predicted count, truth count): greedy one-to-one matching by decreasing IoU >= threshold."""
    ious, truth_ids, predicted_ids = pairwise_iou(predicted, truth)
    matched = 0
    if ious.size:
        used_t, used_p = set(), set()
        order = np.argsort(-ious, axis=None, kind="stable")
        for flat in order:
            t, p = divmod(int(flat), ious.shape[1])
            if ious[t, p] < threshold:
                break
            if t in used_t or p in used_p:
                continue
            used_t.add(t)
            used_p.add(p)
            matched += 1
    return matched, len(predicted_ids), len(truth_ids)


def instance_figures(instances: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    """Mean per-frame IoU of the masks and instance precision, recall and F1 (IoU >= 0.5) over frames."""
    ious, matched, predicted, true = [], 0, 0, 0
    for labels, truth in zip(instances, truths):
        ious.append(mask_iou(labels > 0, truth > 0))
        m, p, t = match_instances(labels, truth)
        matched, predicted, true = matched + m, predicted + p, true + t
    precision = matched / predicted if predicted else 1.0
    recall = matched / true if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"frames": len(truths), "mean_iou": float(np.mean(ious)) if ious else float("nan"), "f1": f1,
            "precision": precision, "recall": recall}
