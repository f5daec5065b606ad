"""Compare a scan's store with the simulator's ground truth: how many true 3D peaks were found, and how well.

Read one frame at a time, so it works on scans of any length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.simulator.writers import DISTINCT_FRAMES_ATTR
from pipeline.store import open_live, schema


@dataclass(frozen=True)
class PeakMatch:
    """A true 3D peak and the store's peak that overlaps it most."""

    truth_id: int
    store_id: int
    iou: float
    truth_frames: tuple[int, int]
    store_frames: tuple[int, int]
    split: bool  # the truth peak is spread over several store ids


@dataclass(frozen=True)
class TruthComparison:
    frames: int
    truth_peaks: int
    found_peaks: int  # 3D peaks in the store
    matched: int  # truth peaks whose best store peak has 3D IoU >= threshold
    mean_frame_iou: float  # IoU of the combined per-frame masks, empty vs empty counts 1
    frame_ranges_equal: int  # matched peaks whose first..last frames equal the truth's
    one_id_per_peak: int  # matched truth peaks covered by a single store id (not split)
    matches: tuple[PeakMatch, ...] = ()  # every truth peak that overlaps any store peak

    @property
    def recall(self) -> float:
        return self.matched / self.truth_peaks if self.truth_peaks else 1.0


def compare_store_to_truth(store_path: Path, truth_path: Path, iou_threshold: float = 0.5, split_fraction: float = 0.9) -> TruthComparison:
    store = open_live(store_path)
    volume = store[schema.VOLUME_LABELS]
    with h5py.File(truth_path, "r") as truth_file:
        truth = truth_file["labels"]
        frames = min(truth.shape[0], volume.shape[0])
        distinct = int(truth_file.attrs.get(DISTINCT_FRAMES_ATTR, frames) or frames)  # a scan repeating its first frames
        pair_counts: dict[tuple[int, int], int] = {}
        truth_sizes: dict[int, int] = {}
        store_sizes: dict[int, int] = {}
        truth_ranges: dict[int, list[int]] = {}
        store_ranges: dict[int, list[int]] = {}
        ious = []
        for index in range(frames):
            t = truth[index % distinct].astype(np.int64)
            p = volume[index].astype(np.int64)
            union = np.count_nonzero((t > 0) | (p > 0))
            ious.append(1.0 if union == 0 else np.count_nonzero((t > 0) & (p > 0)) / union)
            for sizes, ranges, labels in ((truth_sizes, truth_ranges, t), (store_sizes, store_ranges, p)):
                ids, counts = np.unique(labels[labels > 0], return_counts=True)
                for peak_id, count in zip(ids.tolist(), counts.tolist()):
                    sizes[peak_id] = sizes.get(peak_id, 0) + count
                    ranges.setdefault(peak_id, [index, index])[1] = index
            both = (t > 0) & (p > 0)
            if both.any():
                pairs, counts = np.unique(np.stack([t[both], p[both]]), axis=1, return_counts=True)
                for (ti, pi), count in zip(pairs.T.tolist(), counts.tolist()):
                    pair_counts[(ti, pi)] = pair_counts.get((ti, pi), 0) + count
    matched = ranges_equal = single = 0
    matches = []
    for truth_id, truth_size in sorted(truth_sizes.items()):
        overlaps = {pi: c for (ti, pi), c in pair_counts.items() if ti == truth_id}
        if not overlaps:
            continue
        best, inter = max(overlaps.items(), key=lambda item: (item[1], -item[0]))
        iou = inter / (truth_size + store_sizes[best] - inter)
        split = inter < split_fraction * sum(overlaps.values())
        (truth_first, truth_last), (store_first, store_last) = truth_ranges[truth_id], store_ranges[best]
        matches.append(PeakMatch(truth_id, best, iou, (truth_first, truth_last), (store_first, store_last), split))
        if iou >= iou_threshold:
            matched += 1
            ranges_equal += truth_ranges[truth_id] == store_ranges[best]
            single += not split
    return TruthComparison(
        frames=frames,
        truth_peaks=len(truth_sizes),
        found_peaks=len(store_sizes),
        matched=matched,
        mean_frame_iou=float(np.mean(ious)) if ious else 1.0,
        frame_ranges_equal=ranges_equal,
        one_id_per_peak=single,
        matches=tuple(matches),
    )
