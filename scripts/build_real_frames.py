"""Rebuild tests/data/real_frames/ from a checkout of the public dials/data-files repository.

Why: the TLM's detection cap and frames of other shapes must be tested on real, crowded
Pilatus frames, and the repository is too big to ship. This cuts a few small crops out of the
thaumatin grid scan (Diamond I24, PILATUS3 6M, CC-BY 4.0 per dials/data's definition
`thaumatin_grid_scan.yml`) and writes them as compressed .npz files.

A Pilatus 6M frame is 2527 x 2463 pixels: 12 x 5 modules of 195 x 487 (exactly a Pilatus 100K),
with gaps of 17 rows and 7 columns that read -1. Crops:
- single modules (the shape of I16's 100K frames), the most crowded ones;
- a 3-module column, 619 x 487, the shape of a Pilatus 300K (gaps included);
- a 1065 x 1030 window, the shape of an Eiger 1M, over the gaps of 4 x 3 modules.

Usage: python scripts/build_real_frames.py GIT_DIR
GIT_DIR is the data-files repository's git directory (a bare clone is enough: files are read
with `git show`). The modules go to pipeline/models/data/ (`pipeline evaluate` reads them, so
they ship with the package), the larger crops to tests/data/real_frames/. The CBF byte-offset decoder below is ~30 lines of NumPy, so nothing beyond the
project's own dependencies is needed; it checks each file's Content-MD5.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

MODULE = (195, 487)
GAP = (17, 7)  # rows, columns between modules of a Pilatus 6M
PITCH = (MODULE[0] + GAP[0], MODULE[1] + GAP[1])  # 212, 494
FRAMES = tuple(f"thaumatin_grid/thau_3_2_{number:04d}.cbf.bz2" for number in (2, 3, 6, 10, 14, 16))
# (index into FRAMES, module row, module column), near the beam (Beam_xy 1262, 1307: module row 6, column 2). Spots per
# module (components of >= 3 pixels at > 6 sigma above the local background, the selection's own measure): 80, 72, 67,
# 58, 25, 62, 22 and 0 (a frame past the crystal: background only, the control)
MODULES = ((0, 6, 3), (0, 5, 3), (0, 5, 1), (1, 5, 1), (1, 5, 2), (3, 6, 1), (4, 5, 1), (5, 6, 2))
PILATUS_300K = (1, 4, 1)  # module rows 4..6 of column 1: 3 x 195 + 2 x 17 = 619 rows
EIGER_1M = (2, 4 * PITCH[0], 1 * PITCH[1], 1065, 1030)  # index into FRAMES, first row, first column, rows, columns


def decode_byte_offset(data: bytes, count: int) -> np.ndarray:
    """CBF "x-CBF_BYTE_OFFSET" -> int32 values: each a delta from the previous, as int8, or after 0x80 an int16,
    or after 0x8000 an int32 (after 0x80000000 an int64)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    escapes = np.flatnonzero(raw == 0x80)
    deltas = np.empty(count, dtype=np.int64)
    pos = done = 0
    while done < count:
        index = int(np.searchsorted(escapes, pos))
        stop = int(escapes[index]) if index < len(escapes) else len(raw)
        run = min(stop - pos, count - done)
        deltas[done:done + run] = raw[pos:pos + run].view(np.int8)
        done += run
        pos += run
        if done == count:
            break
        value = int.from_bytes(raw[pos + 1:pos + 3].tobytes(), "little", signed=True)
        pos += 3
        if value == -0x8000:
            value = int.from_bytes(raw[pos:pos + 4].tobytes(), "little", signed=True)
            pos += 4
            if value == -0x80000000:
                value = int.from_bytes(raw[pos:pos + 8].tobytes(), "little", signed=True)
                pos += 8
        deltas[done] = value
        done += 1
    return np.cumsum(deltas).astype(np.int32)


def read_cbf(blob: bytes) -> tuple[np.ndarray, str]:
    """(image as int32 rows x columns, the header text) of a miniCBF file's bytes, MD5 checked."""
    start = blob.index(b"\x0c\x1a\x04\xd5") + 4
    header = blob[:start].decode("latin-1")
    size = int(re.search(r"X-Binary-Size:\s*(\d+)", header).group(1))  # type: ignore[union-attr]
    fast = int(re.search(r"X-Binary-Size-Fastest-Dimension:\s*(\d+)", header).group(1))  # type: ignore[union-attr]
    slow = int(re.search(r"X-Binary-Size-Second-Dimension:\s*(\d+)", header).group(1))  # type: ignore[union-attr]
    md5 = re.search(r"Content-MD5:\s*(\S+)", header)
    data = blob[start:start + size]
    if md5 and base64.b64encode(hashlib.md5(data).digest()).decode() != md5.group(1):
        raise ValueError("CBF binary section does not match its Content-MD5")
    return decode_byte_offset(data, fast * slow).reshape(slow, fast), header


def git_file(git_dir: Path, path: str) -> bytes:
    blob = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"], check=True, capture_output=True).stdout
    if path.endswith(".bz2"):
        return bz2.decompress(blob)
    if path.endswith(".gz"):
        return gzip.decompress(blob)
    return blob


def module(image: np.ndarray, row: int, column: int, rows: int = 1) -> np.ndarray:
    """`rows` modules stacked from module (row, column), with the gaps between them."""
    top, left = row * PITCH[0], column * PITCH[1]
    return image[top:top + rows * MODULE[0] + (rows - 1) * GAP[0], left:left + MODULE[1]].copy()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/build_real_frames.py GIT_DIR (a checkout of dials/data-files)", file=sys.stderr)
        return 2
    git_dir = Path(argv[0])
    root = Path(__file__).resolve().parents[1]
    package_data, test_data = root / "pipeline" / "models" / "data", root / "tests" / "data" / "real_frames"
    images = []
    for path in FRAMES:
        image, header = read_cbf(git_file(git_dir, path))
        if image.shape != (12 * MODULE[0] + 11 * GAP[0], 5 * MODULE[1] + 4 * GAP[1]):
            raise ValueError(f"{path}: unexpected shape {image.shape}")
        gap_rows = image[MODULE[0]:PITCH[0], :]
        gap_cols = image[:, MODULE[1]:PITCH[1]]
        if not ((gap_rows == -1).all() and (gap_cols == -1).all()):
            raise ValueError(f"{path}: the module gaps do not read -1 where expected")
        images.append((path, image))
    written = {}

    def save(name: str, frames: np.ndarray, sources: list[str]) -> None:
        target = (package_data if name == "pilatus_modules" else test_data) / f"{name}.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(target, frames=frames, sources=np.array(sources))
        written[str(target.relative_to(root))] = {"shape": list(frames.shape), "bytes": target.stat().st_size, "sources": sources}

    crops, sources = [], []
    for file_index, row, column in MODULES:
        path, image = images[file_index]
        crops.append(module(image, row, column))
        sources.append(f"{path} module row {row} column {column} (pixels {row * PITCH[0]}:{row * PITCH[0] + MODULE[0]}, "
                       f"{column * PITCH[1]}:{column * PITCH[1] + MODULE[1]})")
    save("pilatus_modules", np.stack(crops), sources)
    file_index, row, column = PILATUS_300K
    path, image = images[file_index]
    save("pilatus_300k", module(image, row, column, rows=3)[None],
         [f"{path} module rows {row}-{row + 2} column {column} with the gaps"])
    file_index, top, left, rows, columns = EIGER_1M
    path, image = images[file_index]
    save("eiger_1m_shape", image[top:top + rows, left:left + columns].copy()[None],
         [f"{path} pixels {top}:{top + rows}, {left}:{left + columns} (gaps read -1)"])
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
