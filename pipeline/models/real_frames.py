"""Real detector frames shipped with the package, and the reference spots found on them.

Why: the synthetic frames hold 1-8 peaks; real Pilatus frames of a protein crystal hold tens of Bragg
spots per 195 x 487 module, and that is where a model's caps show. `data/pilatus_modules.npz` holds 8
modules of a thaumatin grid scan (Diamond I24, PILATUS3 6M; dials/data-files, CC-BY 4.0; see
`data/README.md`, rebuilt by `scripts/build_real_frames.py`). Real frames have no outlines, so what they
measure is counted against `reference_spots`, a classical spot finder, never called the truth.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.models.preprocess import fix_dead_pixels, local_background

REAL_MODULES = Path(__file__).resolve().parent / "data" / "pilatus_modules.npz"
SPOT_SIGMA = 6.0
"""A reference spot's pixels stand this many Poisson sigmas above the local background (DIALS' spot finder uses a
similar dispersion cut); high enough that background noise on a 95,000-pixel module gives no spot."""
SPOT_MIN_PIXELS = 3
"""...and are at least this many, 8-connected: single hot pixels are not spots."""


def load_frames(path: Path) -> tuple[np.ndarray, list[str]]:
    """(frames (N, H, W) int32 counts, one source line per frame) from an .npz with arrays `frames` and `sources`.

    Raises ValueError naming the file and the field for anything else; never unpickles.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "frames" not in data.files:
                raise ValueError(f"{path}: no 'frames' array (found: {', '.join(data.files) or 'none'})")
            frames = data["frames"]
            sources = [str(s) for s in data["sources"]] if "sources" in data.files else []
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({type(error).__name__})") from None
    except ValueError as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: 'frames' cannot be read without pickle (an object array?)") from None
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or 0 in frames.shape or not (np.issubdtype(frames.dtype, np.integer) or np.issubdtype(frames.dtype, np.floating)):
        raise ValueError(f"{path}: 'frames' must be numeric (N, H, W) counts, got {frames.dtype} {frames.shape}")
    if sources and len(sources) != len(frames):
        raise ValueError(f"{path}: 'sources' has {len(sources)} entries for {len(frames)} frames")
    return frames, sources or [f"{path.name}[{i}]" for i in range(len(frames))]


def reference_spots(counts: np.ndarray, sigma: float = SPOT_SIGMA, min_pixels: int = SPOT_MIN_PIXELS) -> np.ndarray:
    """A classical spot finder's labels for one raw frame (0 background): 8-connected components of at least
    `min_pixels` pixels more than `sigma` Poisson sigmas above the local background (`local_background`)."""
    fixed = fix_dead_pixels(counts)
    background = np.maximum(local_background(fixed), 0.0)
    strong = (fixed - background) / np.sqrt(background + 1.0) > sigma
    labels, count = ndimage.label(strong, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1)
    return relabel[labels]


def spots_covered(spots: np.ndarray, mask: np.ndarray) -> int:
    """How many reference spots have at least one pixel inside `mask`."""
    hit = np.unique(spots[(np.asarray(mask) > 0) & (spots > 0)])
    return int(len(hit))


def instances_on_spots(instances: np.ndarray, spots: np.ndarray) -> int:
    """How many instances (label image) have at least one pixel on a reference spot."""
    hit = np.unique(instances[(spots > 0) & (np.asarray(instances) > 0)])
    return int(len(hit))
