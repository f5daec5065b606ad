"""Round 2: relative external links / VDS sources that are missing beside the scan file but present in the
reader's current directory. Makes W/ (watched) and CWD/ (the daemon's working directory, outside the roots).
usage: python r2_cwd_links.py BASE   (then run the daemon from BASE/cwd; see r2_cwd_links.sh)"""
import os, sys, time, h5py, numpy as np
base = sys.argv[1]
W, C = os.path.join(base, "w"), os.path.join(base, "cwd")
os.makedirs(W, exist_ok=True); os.makedirs(C, exist_ok=True)
# the 'secret' file outside the roots, in the daemon's cwd: float32 frames with a NaN at (0,0), so bad_frames shows it was read
sec = np.full((3, 195, 487), 7.0, np.float32); sec[:, 0, 0] = np.nan
with h5py.File(os.path.join(C, "secret.h5"), "w") as f:
    f.create_dataset("data", data=sec)
    g = f.create_group("grp"); g.attrs["NX_class"] = "NXdetector"; g.create_dataset("data", data=sec)
def entry(f, n=3):
    e = f.create_group("entry1")
    e["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"
    e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S"); e["end_time"] = "2024-01-01T00:00:00"
    return e
# 1. VDS over a relative source name 'secret.h5' (not beside the scan file)
with h5py.File(os.path.join(W, "vds_rel.nxs"), "w") as f:
    e = entry(f); g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"
    lay = h5py.VirtualLayout(shape=(3, 195, 487), dtype=np.float32)
    lay[:] = h5py.VirtualSource("secret.h5", "data", shape=(3, 195, 487))
    g.create_virtual_dataset("data", lay, fillvalue=0)
# 2. the detector group itself an external link to a group in 'secret.h5' (relative, missing beside the scan)
with h5py.File(os.path.join(W, "grp_link.nxs"), "w") as f:
    e = entry(f); e["pil3_100k"] = h5py.ExternalLink("secret.h5", "/grp")
# 3. an absolute external link to a detector file of 'another visit' that does not exist here
with h5py.File(os.path.join(W, "abs_link.nxs"), "w") as f:
    e = entry(f); e["pil3_100k"] = h5py.ExternalLink("/dls/i16/data/2026/other-visit/secret.h5", "/grp")
print("made", W, C)
