"""A 6 kB scan file whose NXdata axis `eta` declares N float32 values that were never written (HDF5 fill value).
Usage: python make_axis_fill.py OUT.nxs N   (the reader materialises N*4 bytes, then N*8 as float64)"""
import sys, os, h5py, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import nexus
out, n = sys.argv[1], int(sys.argv[2])
p = nexus(out, np.random.default_rng(1).poisson(5.0, (3, 195, 487)).astype(np.int32))
with h5py.File(p, "a") as f:
    e = f["entry1"]; g = e.create_group("plot"); g.attrs["NX_class"] = "NXdata"
    g.create_dataset("eta", shape=(n,), dtype="f4", chunks=(1 << 20,))  # nothing written
    g["data"] = h5py.SoftLink("/entry1/pil3_100k/data")
    g.attrs["signal"] = "data"; g.attrs["axes"] = ["eta", ".", "."]; e.attrs["default"] = "plot"
