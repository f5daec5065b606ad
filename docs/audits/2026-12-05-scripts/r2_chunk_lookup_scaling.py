"""Round 2: cost of one bounded-reader frame read (get_chunk_info_by_coord) as the scan grows, whole-frame gzip chunks,
old-style (libver earliest, v1 B-tree) and SWMR-style (libver latest) files. usage: python r2_chunk_lookup_scaling.py DIR"""
import sys, time, os, h5py, numpy as np
from pipeline.common.chunks import BoundedFrameReader
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
frame = np.ones((1, 195, 487), np.int32)
for libver in ("earliest", "latest"):
    for n in (500, 2000, 8000):
        p = f"{d}/scale_{libver}_{n}.h5"
        with h5py.File(p, "w", libver=libver) as f:
            ds = f.create_dataset("data", shape=(n, 195, 487), dtype="int32", chunks=(1, 195, 487), maxshape=(None, 195, 487), compression="gzip")
            for i in range(n): ds.id.write_direct_chunk((i, 0, 0), __import__("zlib").compress(frame.tobytes()))
        with h5py.File(p, "r") as f:
            r = BoundedFrameReader(f["data"]); t = time.monotonic()
            for i in range(n - 10, n): r.read(i)
            print(f"{libver:8s} {n:5d} frames: {(time.monotonic() - t) / 10 * 1000:.1f} ms per frame read")
