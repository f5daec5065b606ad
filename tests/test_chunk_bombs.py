"""Compressed chunks cannot make a frame read cost more than the frame: bombs and oversized chunks are refused.

HDF5's deflate filter inflates a chunk until its stream ends, whatever size the chunk declares: a
frame whose 400 KB chunk held zlib-compressed zeros of 512 MiB was read "fine" at a cost of more
than 512 MiB. A chunk that spans 200 frames made every frame read decompress all 200 (74 MiB).
Now the first is refused at its declared size (`pipeline.common.chunks`) and the second when the scan is
opened, each with one line naming the file, dataset and chunk; ordinary compressed frames (gzip,
shuffle, several frames or tiles per chunk) read exactly as HDF5 reads them.
"""

from __future__ import annotations

import functools
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.common.chunks import BoundedFrameReader, ChunkCorrupt, ChunkRefused, chunk_problem, fletcher32
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


# -- a deflate stage next to filters the reader does not decode (audit R3) ----------------------------------------------
# HDF5 inflated a 1 GiB bomb chunk from a 1.2 MB file as soon as the chunk also carried fletcher32, scaleoffset or nbit
# (the reader handed every pipeline other than shuffle + deflate to HDF5). Now every deflate stage is bounded: fletcher32
# is checked and stripped here, and a deflate stage in front of a filter HDF5 must decode is inflated here first, to a
# bound, without keeping the output.

SMALL_BOMB_MIB = 256  # zeros: 1,032:1 with zlib, so about 250 KB stored
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1] * 4  # 379,860: one int32 frame, what each chunk below declares


def _reference_fletcher32(data: bytes) -> int:
    """HDF5's H5_checksum_fletcher32 word by word, as H5checksum.c writes it: the oracle the reader's numpy version is held to."""
    words = np.frombuffer(data[: len(data) // 2 * 2], dtype=">u2").tolist()
    sum1 = sum2 = 0
    for start in range(0, len(words), 360):
        for word in words[start:start + 360]:
            sum1 += word
            sum2 += sum1
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[-1] << 8
        sum2 += sum1
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


def _trailer(data: bytes) -> bytes:
    """The 4 bytes HDF5's fletcher32 filter appends (little-endian)."""
    return struct.pack("<I", _reference_fletcher32(data))


@functools.lru_cache(maxsize=1)
def _zeros_deflated(mib: int) -> bytes:
    """zlib-compressed zeros of `mib` MiB, made 1 MiB at a time (the test process never holds them inflated)."""
    deflater = zlib.compressobj(9)
    zeros = bytes(2**20)
    return b"".join([*(deflater.compress(zeros) for _ in range(mib)), deflater.flush()])


_STEPS = {"shuffle": lambda dcpl: dcpl.set_shuffle(), "gzip": lambda dcpl: dcpl.set_deflate(4),
          "fletcher32": lambda dcpl: dcpl.set_fletcher32(), "scaleoffset": lambda dcpl: dcpl.set_scaleoffset(h5py.h5z.SO_INT, 0),
          "nbit": lambda dcpl: dcpl.set_filter(h5py.h5z.FILTER_NBIT, h5py.h5z.FLAG_OPTIONAL),
          "lzf": lambda dcpl: dcpl.set_filter(h5py.h5z.FILTER_LZF, h5py.h5z.FLAG_OPTIONAL)}


def _pipeline_dataset(handle: h5py.File, pipeline: str, frames: np.ndarray, frames_per_chunk: int = 1) -> h5py.Dataset:
    """Dataset "data" with the filters of `pipeline` ("scaleoffset+gzip": write order) in any order HDF5 accepts, which
    h5py's create_dataset does not always (fletcher32 with scaleoffset; deflate before another filter). With nbit the
    counts are stored in 16 of the 32 bits."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((frames_per_chunk, *frames.shape[1:]))
    for step in pipeline.split("+"):
        _STEPS[step](dcpl)
    stored = h5py.h5t.py_create(frames.dtype).copy()
    if "nbit" in pipeline:
        stored.set_precision(16)
    space = h5py.h5s.create_simple(frames.shape, (h5py.h5s.UNLIMITED, *frames.shape[1:]))
    h5py.h5d.create(handle.id, b"data", stored, space, dcpl=dcpl)
    handle["data"][...] = frames
    return handle["data"]


def _bomb_chunk(pipeline: str) -> bytes:
    """A chunk for `pipeline` whose deflate stage inflates to SMALL_BOMB_MIB MiB of zeros (frame 2 declares 379,860 bytes),
    with a valid fletcher32 trailer where fletcher32 is the last stage written, so that HDF5 would inflate it."""
    steps = pipeline.split("+")
    chunk = _zeros_deflated(SMALL_BOMB_MIB)
    if steps.count("gzip") == 2:  # the inner stage is the bomb: the outer one inflates to its 250 KB
        chunk = zlib.compress(chunk, 9)
    return chunk + _trailer(chunk) if steps[-1] == "fletcher32" else chunk


BOMB_PROBE = textwrap.dedent("""
    import json, sys
    import h5py, numpy as np
    from pipeline.common.chunks import BoundedFrameReader, ChunkRefused

    def peak_kb() -> int:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

    def attempt(read):
        try:
            read()
        except ChunkRefused as error:
            return str(error)
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return "read"

    expected = np.load(sys.argv[2])
    with h5py.File(sys.argv[1], "r") as handle:
        reader = BoundedFrameReader(handle["data"])
        reader.read(0)
        before = peak_kb()
        result = {"decodes_itself": reader.decodes_itself,
                  "equal_before": [bool(np.array_equal(reader.read(index), expected[index])) for index in (0, 1, 3)],
                  "bomb": attempt(lambda: reader.read(2)),
                  "block": attempt(lambda: reader.read_block(0, 4)),
                  "equal_after": [bool(np.array_equal(reader.read(index), expected[index])) for index in (0, 1, 3)],
                  "equal_block": bool(np.array_equal(reader.read_block(0, 2), expected[:2])),
                  "growth_kb": peak_kb() - before}
    print(json.dumps(result))
""")

BOMB_PIPELINES = ["gzip+fletcher32", "shuffle+gzip+fletcher32", "fletcher32+gzip", "gzip+gzip",  # decoded here
                  "scaleoffset+gzip", "nbit+gzip", "scaleoffset+gzip+fletcher32", "nbit+shuffle+gzip"]  # HDF5 decodes past the deflate


@pytest.mark.parametrize("pipeline", BOMB_PIPELINES)
def test_a_deflate_bomb_next_to_another_filter_is_refused_without_being_inflated(tmp_path: Path, pipeline: str) -> None:
    frames = _frames(4)
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as handle:
        data = _pipeline_dataset(handle, pipeline, frames)
        data.id.write_direct_chunk((2, 0, 0), _bomb_chunk(pipeline))
    assert path.stat().st_size < 2 * 2**20
    np.save(tmp_path / "expected.npy", frames)
    result = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(path), str(tmp_path / "expected.npy")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    refused = f"chunk at (2, 0, 0) inflates past its declared {FRAME_BYTES:,} bytes"
    assert found["bomb"].startswith(refused) and "\n" not in found["bomb"], found
    assert found["block"].startswith(refused), found  # a block read too: the follower then reads frame by frame
    assert found["equal_before"] == found["equal_after"] == [True, True, True] and found["equal_block"], found
    assert found["growth_kb"] < 48 * 1024, found  # the bomb inflated is 256 MiB
    assert found["decodes_itself"] == all(step in {"shuffle", "gzip", "fletcher32"} for step in pipeline.split("+")), found


@pytest.mark.parametrize("pipeline, frames_per_chunk", [
    ("gzip+fletcher32", 1), ("shuffle+gzip+fletcher32", 3), ("fletcher32+gzip", 2), ("gzip+gzip", 1), ("gzip+shuffle", 1),
    ("scaleoffset+gzip", 3), ("nbit+gzip", 1), ("scaleoffset+gzip+fletcher32", 2), ("scaleoffset+shuffle+gzip+fletcher32", 1),
    ("fletcher32", 1), ("scaleoffset", 1),
])
def test_frames_behind_every_bounded_pipeline_read_exactly_as_written(tmp_path: Path, pipeline: str, frames_per_chunk: int) -> None:
    frames = _frames(7)
    with h5py.File(tmp_path / "f.h5", "w") as handle:
        data = _pipeline_dataset(handle, pipeline, frames, frames_per_chunk)
        data.resize(9, axis=0)  # rows 7 and 8 never written: the fill value, as HDF5 gives it
        assert chunk_problem(data, 32 * 2**20) is None
        reader = BoundedFrameReader(data)
        for index in range(9):
            np.testing.assert_array_equal(reader.read(index), data[index], err_msg=f"frame {index}")
            if index < 7:
                np.testing.assert_array_equal(reader.read(index), frames[index], err_msg=f"frame {index}")
        np.testing.assert_array_equal(reader.read_block(2, 9), data[2:9])


def test_the_fletcher32_checksum_is_hdf5s_on_any_bytes() -> None:
    rng = np.random.default_rng(9)
    samples = [b"", b"\x01", b"\xff" * 719, b"\xff" * 720, b"\xff" * 721, bytes(1001), b"\xff" * 300_001]
    samples += [rng.integers(0, 256, int(size), dtype=np.uint8).tobytes() for size in rng.integers(0, 5000, 40)]
    samples += [rng.choice(np.array([0, 1, 254, 255], dtype=np.uint8), 400_003).tobytes()]
    for sample in samples:
        assert fletcher32(sample) == _reference_fletcher32(sample), len(sample)


def test_a_chunk_failing_its_fletcher32_checksum_is_an_error_naming_the_chunk(tmp_path: Path) -> None:
    """As HDF5 does it: an OSError, so that the follower tells a truncation's hole from a damaged frame."""
    frames = _frames(3)
    with h5py.File(tmp_path / "f.h5", "w") as handle:
        data = handle.create_dataset("data", data=frames, chunks=(1, *FRAME_SHAPE), compression="gzip", fletcher32=True)
        mask, raw = data.id.read_direct_chunk((1, 0, 0))
        data.id.write_direct_chunk((1, 0, 0), raw[:-4] + bytes(4), mask)
        with pytest.raises(ChunkCorrupt, match=r"^chunk at \(1, 0, 0\) fails its fletcher32 checksum") as error:
            BoundedFrameReader(data).read(1)
        assert isinstance(error.value, OSError) and "\n" not in str(error.value)
        with pytest.raises(OSError):
            data[1]  # noqa: B018 - HDF5 refuses it too
        # files written before HDF5 1.6.3 swapped the checksum's 16-bit halves within each: HDF5 takes both
        stored = raw[:-4] + bytes(raw[-4:][i] for i in (1, 0, 3, 2))
        data.id.write_direct_chunk((1, 0, 0), stored, mask)
        np.testing.assert_array_equal(BoundedFrameReader(data).read(1), data[1])


def test_a_chunk_that_skipped_a_filter_is_read_without_it(tmp_path: Path) -> None:
    """A writer may store a chunk that a filter did not shrink without that filter (its bit set in the chunk's mask)."""
    frames = _frames(3)
    raw = frames[1].tobytes()
    for pipeline, chunk, mask in [("gzip+fletcher32", raw + _trailer(raw), 0b01), ("scaleoffset+gzip", raw, 0b11)]:
        with h5py.File(tmp_path / f"{pipeline}.h5", "w") as handle:
            _pipeline_dataset(handle, pipeline, frames).id.write_direct_chunk((1, 0, 0), chunk, filter_mask=mask)
        with h5py.File(tmp_path / f"{pipeline}.h5", "r") as handle:  # HDF5 2.0 sees the mask only once the file is reopened
            np.testing.assert_array_equal(BoundedFrameReader(handle["data"]).read(1), frames[1], err_msg=pipeline)
            np.testing.assert_array_equal(handle["data"][1], frames[1], err_msg=pipeline)


@pytest.mark.parametrize("pipeline", ["gzip+scaleoffset", "gzip+lzf", "gzip+fletcher32+scaleoffset", "gzip+scaleoffset+gzip"])
def test_a_deflate_stage_hdf5_would_decode_further_is_refused_at_open(tmp_path: Path, pipeline: str) -> None:
    """Its inflated size cannot be bounded without decoding what comes after it, which only HDF5 does."""
    with h5py.File(tmp_path / "f.h5", "w") as handle:
        data = _pipeline_dataset(handle, pipeline, _frames(2))
        problem = chunk_problem(data, 32 * 2**20)
        assert problem is not None and "\n" not in problem
        assert problem.startswith(f"filter pipeline {pipeline.replace('+', ', ').replace('gzip', 'deflate')} (as written): "), problem
        with pytest.raises(ChunkRefused, match="filter pipeline"):
            BoundedFrameReader(data).read(0)


@pytest.mark.parametrize("pipeline", ["gzip", "gzip+fletcher32", "scaleoffset+gzip"])
def test_a_chunk_whose_deflate_stream_is_broken_is_an_error_naming_the_chunk(tmp_path: Path, pipeline: str) -> None:
    """Not zlib's own exception, which no reader expects: an OSError, as HDF5 raises for it."""
    with h5py.File(tmp_path / "f.h5", "w") as handle:
        data = _pipeline_dataset(handle, pipeline, _frames(2))
        broken = b"not a deflate stream" * 100
        data.id.write_direct_chunk((1, 0, 0), broken + _trailer(broken) if pipeline.endswith("fletcher32") else broken)
        with pytest.raises(ChunkCorrupt, match=r"^chunk at \(1, 0, 0\): its deflate stream is broken \("):
            BoundedFrameReader(data).read(1)
        np.testing.assert_array_equal(BoundedFrameReader(data).read(0), _frames(2)[0])


def test_a_scaleoffset_element_count_patched_in_the_file_is_refused_at_open(tmp_path: Path) -> None:
    """HDF5's scaleoffset (and nbit) decoder takes a chunk's element count from the filter's stored parameters: patched
    to 64 Mi in a 1 MB file, it crashed the reading process (a segfault). It must equal the chunk's, or the dataset is
    refused before a frame is read."""
    path = tmp_path / "patched.h5"
    frames = np.random.default_rng(5).poisson(3.0, (2, *FRAME_SHAPE)).astype("int32")
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", data=frames, chunks=(1, *FRAME_SHAPE), scaleoffset=0)
        values = handle["data"].id.get_create_plist().get_filter(0)[2]
    with h5py.File(path, "r") as handle:
        assert chunk_problem(handle["data"], 32 * 2**20) is None  # as written: fine
    raw = bytearray(path.read_bytes())
    where = raw.find(struct.pack("<3I", *values[:3]))
    assert where > 0 and raw.count(struct.pack("<3I", *values[:3])) == 1
    raw[where + 8:where + 12] = struct.pack("<I", 64 * 2**20)
    path.write_bytes(bytes(raw))
    with h5py.File(path, "r") as handle:
        problem = chunk_problem(handle["data"], 32 * 2**20)
    assert problem == (f"scaleoffset filter claims {64 * 2**20} elements a chunk, its chunks hold 94,965: refused (HDF5's "
                       "decoder trusts the count: a crafted one crashed the reader)"), problem


@pytest.mark.parametrize("claimed", [2**30, 0])
def test_a_bitshuffle_chunk_whose_header_lies_about_its_size_is_refused_not_a_crash(tmp_path: Path, claimed: int) -> None:
    """hdf5plugin's filters are there in a reader once hdfmap has imported it (for the scan axis). Its bitshuffle filter
    allocates and decodes what a chunk's header says: a header claiming 1 GiB over a 2 KB chunk made the reading
    process die of a segfault. The header is checked against the chunk's size before HDF5 reads it."""
    path = tmp_path / "bitshuffled.h5"
    probe = textwrap.dedent(f"""
        import struct
        import h5py, hdf5plugin, numpy as np
        from pipeline.common.chunks import BoundedFrameReader, ChunkRefused
        frames = np.arange(3 * 195 * 487, dtype=np.int32).reshape(3, 195, 487) % 50
        with h5py.File({str(path)!r}, "w") as handle:
            data = handle.create_dataset("data", data=frames, chunks=(1, 195, 487), **hdf5plugin.Bitshuffle(cname="lz4"))
            _, raw = data.id.read_direct_chunk((1, 0, 0))
            data.id.write_direct_chunk((1, 0, 0), struct.pack(">Q", {claimed}) + raw[8:])
        with h5py.File({str(path)!r}, "r") as handle:
            reader = BoundedFrameReader(handle["data"])
            print("FRAME0", bool(np.array_equal(reader.read(0), frames[0])), bool(np.array_equal(reader.read(2), frames[2])))
            try:
                reader.read(1)
                print("READ1")
            except ChunkRefused as error:
                print("REFUSED", error)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # was -11: a segfault
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["FRAME0"] == "True True", result.stdout
    assert lines["REFUSED"] == (f"chunk at (1, 0, 0): its bitshuffle header claims {claimed:,} bytes in blocks of 8,192, the "
                                "chunk holds 379,860: refused (the plugin trusts it: a crafted one crashed the reader)"), result.stdout
