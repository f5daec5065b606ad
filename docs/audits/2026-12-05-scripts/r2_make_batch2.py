"""Round 2, batch 2. usage: python r2_make_batch2.py WATCHED OUTSIDE"""
import os, sys, time, h5py, numpy as np
D, OUT = sys.argv[1], os.path.abspath(sys.argv[2]); os.makedirs(D, exist_ok=True); os.makedirs(OUT, exist_ok=True)
rng = np.random.default_rng(2)
def frames(n, shape=(195, 487)): return (rng.poisson(3.0, size=(n, *shape)) + 1).astype("int32")
# a file outside the roots ("another visit"): float32 frames with NaN at (0, 0), so bad_frames shows it was read
sec = np.full((3, 195, 487), 7.0, np.float32); sec[:, 0, 0] = np.nan
with h5py.File(os.path.join(OUT, "other_visit.h5"), "w") as f: f["data"] = sec

def gda9(name, n=3, det_writer=None, keys=None, scan_shape=None, data=None):
    stem = name[:-4]; ddir = os.path.join(D, f"{stem}-pilatus3_100k-files"); os.makedirs(ddir, exist_ok=True)
    with h5py.File(os.path.join(ddir, f"{stem}.hdf"), "w") as f:
        if det_writer: det_writer(f)
        else:
            d = frames(n) if data is None else data
            f.create_dataset("entry/instrument/detector/data", data=d, chunks=(1, *d.shape[-2:]) if d.ndim == 3 else None)
    p = os.path.join(D, name)
    with h5py.File(p + ".tmp", "w") as f:
        e = f.create_group("entry"); e.attrs["NX_class"] = "NXentry"
        det = e.create_group("instrument/pil3_100k"); det.attrs["NX_class"] = "NXdetector"
        det["data"] = h5py.ExternalLink(f"{stem}-pilatus3_100k-files/{stem}.hdf", "/entry/instrument/detector/data")
        ds = e.create_group("diamond_scan")
        ds.create_dataset("keys/uniqueKeys", data=keys if keys is not None else np.arange(1, n + 1, dtype=np.int32))
        ds["scan_finished"] = np.array([1], np.int32)
        ds["scan_shape"] = scan_shape if scan_shape is not None else np.array([n], np.int32)
        ds["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"
        e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.rename(p + ".tmp", p)

# 1. the detector file (inside the roots) links its data onward to a file outside the roots (absolute path)
gda9("det_ext_out.nxs", det_writer=lambda f: f.__setitem__("entry/instrument/detector/data",
                                                          h5py.ExternalLink(os.path.join(OUT, "other_visit.h5"), "/data")))
# 2. ... or is a VDS whose source is outside the roots
def det_vds(f):
    lay = h5py.VirtualLayout(shape=(3, 195, 487), dtype=np.float32)
    lay[:] = h5py.VirtualSource(os.path.join(OUT, "other_visit.h5"), "data", shape=(3, 195, 487))
    f.create_virtual_dataset("entry/instrument/detector/data", lay, fillvalue=0)
gda9("det_vds_out.nxs", det_writer=det_vds)
# 3. every key set for 5 points, scan_shape 5, but the detector wrote 3 frames; scan_finished 1
gda9("keys_more.nxs", n=3, keys=np.arange(1, 6, dtype=np.int32), scan_shape=np.array([5], np.int32))
# 4. a GDA 9 grid scan (scan_shape [2, 3]): frames (2, 3, 195, 487), keys (2, 3)
gda9("grid_2x3.nxs", n=6, keys=np.arange(1, 7, dtype=np.int32).reshape(2, 3), scan_shape=np.array([2, 3], np.int32),
     data=frames(6).reshape(2, 3, 195, 487))
# 5. a scan file that is a symlink to /dev/zero
os.symlink("/dev/zero", os.path.join(D, "devzero.nxs"))
# 6. gzip frames in tiny tiles (1 x 1 pixel chunks): the bounded reader inflates 95,000 chunks per frame in Python
p = os.path.join(D, "tiles_1x1.nxs")
with h5py.File(p + ".tmp", "w") as f:
    e = f.create_group("entry1"); e["scan_command"] = "scan eta 10 10.25 0.25 pil3_100k 1"; e["start_time"] = "x"; e["end_time"] = "y"
    g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"
    g.create_dataset("data", data=frames(2), chunks=(1, 1, 1), compression="gzip")
os.rename(p + ".tmp", p)
print("ok")
