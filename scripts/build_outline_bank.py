"""Build ``pipeline/simulator/data/peak_outlines.npz`` from DiPID's hand-drawn peak outlines.

The simulator draws its peak shapes from real outlines so that trained models see
streaks and arcs like the real ones, not idealised spots. The CSV (Diamond Light
Source, DiPID, Apache-2.0) is converted once into plain numeric arrays so that the
package ships no CSV/JSON parsing and loads with ``allow_pickle=False``.

Usage: python scripts/build_outline_bank.py [CSV] [OUT.npz]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_CSV = Path("/work/shared/data/dipid_peak_outlines.csv")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipeline" / "simulator" / "data" / "peak_outlines.npz"
MAX_PEAKS_PER_FRAME = 8


def read_outlines(csv_path: Path) -> tuple[list[np.ndarray], list[int]]:
    """Return every polygon as an (k, 2) array of (x=column, y=row) and the polygon count of each labelled frame."""
    csv.field_size_limit(1 << 26)
    polygons: list[np.ndarray] = []
    counts_per_frame: list[int] = []
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            annotations = json.loads(row["annotations"])
            n_in_frame = 0
            for task in annotations:
                if task.get("task") != "T3":
                    continue
                for shape in task.get("value") or []:
                    points = shape.get("points") or []
                    if len(points) < 3:
                        continue
                    xy = np.array([[float(p["x"]), float(p["y"])] for p in points], dtype=np.float32)
                    if not np.all(np.isfinite(xy)):
                        continue
                    polygons.append(xy)
                    n_in_frame += 1
            counts_per_frame.append(n_in_frame)
    return polygons, counts_per_frame


def build(csv_path: Path = DEFAULT_CSV, out_path: Path = DEFAULT_OUT) -> Path:
    """Write the bank: concatenated points + offsets + peaks-per-frame histogram (plain arrays only)."""
    polygons, counts = read_outlines(csv_path)
    offsets = np.zeros(len(polygons) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in polygons])
    points = np.concatenate(polygons).astype(np.float32)
    histogram = np.bincount(np.minimum(counts, MAX_PEAKS_PER_FRAME), minlength=MAX_PEAKS_PER_FRAME + 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out_path,
        points=points,
        offsets=offsets,
        peaks_per_frame=histogram.astype(np.int64),
        frame_shape=np.array([195, 487], dtype=np.int64),
    )
    return out_path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    csv_path = Path(args[0]) if args else DEFAULT_CSV
    out_path = Path(args[1]) if len(args) > 1 else DEFAULT_OUT
    path = build(csv_path, out_path)
    with np.load(path, allow_pickle=False) as bank:
        n = len(bank["offsets"]) - 1
        print(f"{path}: {n} outlines, {len(bank['points'])} points, peaks per frame {bank['peaks_per_frame'].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
