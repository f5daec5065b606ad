"""Round 2: time one frame read by the bounded reader (gzip tiles) against HDF5's own read. usage: python r2_tiles_timing.py DIR"""
import sys, time, os, h5py, numpy as np
from pipeline.common.chunks import BoundedFrameReader
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
data = (np.random.default_rng(0).poisson(3.0, size=(2, 195, 487)) + 1).astype("int32")
for tile in (64, 16, 8, 4, 2):
    p = f"{d}/tiles_{tile}.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=data, chunks=(1, tile, tile), compression="gzip")
    with h5py.File(p, "r") as f:
        ds = f["data"]; t = time.monotonic(); ds[1]; h = time.monotonic() - t
        r = BoundedFrameReader(ds); t = time.monotonic(); r.read(1); b = time.monotonic() - t
    n = -(-195 // tile) * -(-487 // tile)
    print(f"tiles {tile}x{tile}: {n} chunks/frame, HDF5 read {h:.3f} s, bounded reader {b:.2f} s")
