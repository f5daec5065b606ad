"""Compressed chunks cannot make a frame read cost more than the frame: bombs and oversized chunks are refused.

HDF5's deflate filter inflates a chunk until its stream ends, whatever size the chunk declares: a
frame whose 400 KB chunk held zlib-compressed zeros of 512 MiB was read "fine" at a cost of more
than 512 MiB. A chunk that spans 200 frames made every frame read decompress all 200 (74 MiB).
Now the first is refused at its declared size (`pipeline.common.chunks`) and the second when the scan is
opened, each with one line naming the file, dataset and chunk; ordinary compressed frames (gzip,
shuffle, several frames or tiles per chunk) read exactly as HDF5 reads them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.common.chunks import BoundedFrameReader
from pipeline.common.detector import FRAME_SHAPE
from pipeline.store import StoreReader, schema
from pipeline.store.reader import read_attributes
from pipeline.store.schema import Attr
from pipeline.testing.configs import MODELS_OFF, write_config
from pipeline.testing.files import nexus_file

BOMB_MIB = 512


def _frames(n: int, dtype: str = "int32") -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.poisson(3.0, size=(n, *FRAME_SHAPE)).astype(dtype)


def _bomb_scan(path: Path) -> Path:
    """Four gzip frames; frame 2's chunk is replaced by zlib-compressed zeros of BOMB_MIB MiB (under 1 MB stored)."""
    frames = _frames(4)
    nexus_file(path, frames)
    with h5py.File(path, "r+") as handle:
        del handle["entry1/pil3_100k/data"]
        data = handle.create_dataset("entry1/pil3_100k/data", data=frames, chunks=(1, *FRAME_SHAPE), compression="gzip")
        data.id.write_direct_chunk((2, 0, 0), zlib.compress(bytes(BOMB_MIB * 2**20), 1))
    assert path.stat().st_size < 4 * 2**20
    return path


@pytest.mark.parametrize("chunks, filters", [
    ((1, *FRAME_SHAPE), {"compression": "gzip"}),
    ((3, *FRAME_SHAPE), {"compression": "gzip", "shuffle": True}),  # several frames per chunk, the last chunk partly filled
    ((1, 100, 128), {"compression": "gzip", "compression_opts": 9}),  # tiles that do not divide the frame
    ((2, 195, 487), {"compression": "gzip", "shuffle": True, "dtype": ">u2"}),  # big-endian 16 bit
    ((1, *FRAME_SHAPE), {"compression": "lzf"}),  # not decoded here: HDF5 reads it
])
def test_compressed_frames_read_exactly_as_hdf5_reads_them(tmp_path: Path, chunks, filters) -> None:
    filters = dict(filters)
    frames = _frames(7, filters.pop("dtype", "int32"))
    with h5py.File(tmp_path / "f.h5", "w") as handle:
        data = handle.create_dataset("d", data=frames, chunks=chunks, maxshape=(None, *FRAME_SHAPE), **filters)
        data.resize(9, axis=0)  # rows 7 and 8 never written: the fill value, as HDF5 gives it
        reader = BoundedFrameReader(data)
        assert reader.decodes_itself == (filters["compression"] == "gzip")
        for index in range(9):
            np.testing.assert_array_equal(reader.read(index), data[index], err_msg=f"frame {index}")
            assert reader.read(index).dtype == data.dtype


def test_a_deflate_bomb_is_refused_at_its_declared_size(tmp_path: Path) -> None:
    scan = _bomb_scan(tmp_path / "bomb.nxs")
    probe = textwrap.dedent(f"""
        from pathlib import Path
        from pipeline.config import FollowSettings
        from pipeline.live.follow import ScanError, ScanFollower
        read = []
        try:
            with ScanFollower(Path({str(scan)!r}), FollowSettings(settle_s=0.0)) as follower:
                for frame in follower.frames():
                    read.append(frame.index)
        except ScanError as error:
            print("ERROR", error)
        print("READ", read)
        print("PEAK_KB", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert "frame 2: chunk at (2, 0, 0) inflates past its declared 379,860 bytes" in lines.get("ERROR", ""), result.stdout + result.stderr
    assert str(scan) in lines["ERROR"] and "\n" not in lines["ERROR"]
    assert lines["READ"] == "[0, 1]"  # the frames before it were read
    assert int(lines["PEAK_KB"]) < 250 * 1024  # was more than 512 MiB


@pytest.mark.daemon
def test_the_daemon_fails_bombs_and_oversized_chunks_and_processes_good_gzip(tmp_path: Path, untrained_weights) -> None:
    bomb = _bomb_scan(tmp_path / "bomb.nxs")
    wide = nexus_file(tmp_path / "wide.nxs", _frames(3))
    with h5py.File(wide, "r+") as handle:  # one chunk spans 200 frames: 74 MiB decompressed for each frame read
        del handle["entry1/pil3_100k/data"]
        handle.create_dataset("entry1/pil3_100k/data", data=_frames(3), chunks=(200, *FRAME_SHAPE), maxshape=(None, *FRAME_SHAPE),
                              compression="gzip")
    good = nexus_file(tmp_path / "good.nxs", _frames(5))
    with h5py.File(good, "r+") as handle:
        del handle["entry1/pil3_100k/data"]
        handle.create_dataset("entry1/pil3_100k/data", data=_frames(5), chunks=(4, *FRAME_SHAPE), compression="gzip", shuffle=True)
    config = write_config(tmp_path / "config.yaml", untrained_weights, models=MODELS_OFF)
    result = subprocess.run([sys.executable, "-m", "pipeline", "process", "--config", str(config), "--no-progress",
                             str(bomb), str(wide), str(good)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0  # not every scan completed
    statuses = {path.stem: read_attributes(path.with_suffix(".zarr")) or {} for path in (bomb, wide, good)}  # a failed store may hold no arrays
    assert statuses["bomb"][Attr.STATUS] == schema.STATUS_FAILED
    assert "inflates past its declared" in statuses["bomb"][Attr.END_REASON]
    assert statuses["wide"][Attr.STATUS] == schema.STATUS_FAILED
    assert "chunks of 200 x 195 x 487 (200 frame(s), 72 MiB decompressed) exceed follow.max_chunk_mib 32" in statuses["wide"][Attr.END_REASON]
    assert statuses["good"][Attr.STATUS] == schema.STATUS_COMPLETE
    assert StoreReader(good.with_suffix(".zarr")).done_frames().tolist() == [0, 1, 2, 3, 4]
    assert int(statuses["bomb"].get(Attr.FRAMES_DONE, 0)) <= 2  # never the bomb frame or any after it
