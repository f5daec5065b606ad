"""Frames of unusual dtypes / values / shapes. Usage: python make_dtypes.py DIR"""
import sys, os, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import nexus
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
base = rng.poisson(5.0, (3, 195, 487))
for dt in ["float64", "float16", "int8", "uint8", "uint16", "uint32", "int64", "uint64", "bool", "complex64"]:
    nexus(f"{d}/dt_{dt}.nxs", base.astype(dt))
# limits
nexus(f"{d}/lim_uint32max.nxs", np.full((3, 195, 487), np.iinfo(np.uint32).max, np.uint32))
nexus(f"{d}/lim_int32min.nxs", np.full((3, 195, 487), np.iinfo(np.int32).min, np.int32))
nexus(f"{d}/lim_uint64max.nxs", np.full((3, 195, 487), np.iinfo(np.uint64).max, np.uint64))
f = base.astype(np.float32); f[0] = np.inf; f[1, :10, :10] = -np.inf; f[2, 5, 5] = np.finfo(np.float32).max
nexus(f"{d}/lim_inf.nxs", f)
g = base.astype(np.float64); g[:] = 1e308
nexus(f"{d}/lim_f64huge.nxs", g)
# shapes
nexus(f"{d}/shape_1xN.nxs", rng.poisson(5.0, (3, 1, 487)).astype(np.int32))
nexus(f"{d}/shape_Nx1.nxs", rng.poisson(5.0, (3, 487, 1)).astype(np.int32))
nexus(f"{d}/shape_2x2.nxs", rng.poisson(5.0, (3, 2, 2)).astype(np.int32))
nexus(f"{d}/shape_1x1.nxs", rng.poisson(5.0, (3, 1, 1)).astype(np.int32))
nexus(f"{d}/shape_0xN.nxs", np.zeros((3, 0, 487), np.int32))
nexus(f"{d}/shape_4d.nxs", rng.poisson(5.0, (2, 3, 195, 487)).astype(np.int32))
nexus(f"{d}/shape_1d.nxs", rng.poisson(5.0, (3,)).astype(np.int32))
nexus(f"{d}/shape_scalar.nxs", np.array(5, np.int32))
nexus(f"{d}/frames_0.nxs", np.zeros((0, 195, 487), np.int32))
nexus(f"{d}/frames_1.nxs", rng.poisson(5.0, (1, 195, 487)).astype(np.int32))
