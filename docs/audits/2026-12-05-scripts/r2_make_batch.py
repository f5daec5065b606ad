"""Round 2 batch of odd scan files, written into DIR (the watched directory). usage: python r2_make_batch.py DIR"""
import os, sys, time, h5py, numpy as np
D = sys.argv[1]; os.makedirs(D, exist_ok=True)
rng = np.random.default_rng(1)
def frames(n, shape=(195, 487), dtype="int32"):
    return (rng.poisson(3.0, size=(n, *shape)) + 1).astype(dtype)

def nexus(name, data=None, *, extra=None, end=True, det="pil3_100k", **dskw):
    p = os.path.join(D, name)
    with h5py.File(p + ".tmp", "w") as f:
        e = f.create_group("entry1")
        n = 3 if data is None else len(data)
        e["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"
        e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if end: e["end_time"] = "2026-12-05T00:01:00"
        g = e.create_group(det); g.attrs["NX_class"] = "NXdetector"
        if data is not None:
            dskw.setdefault("chunks", (1, *data.shape[1:]))
            g.create_dataset("data", data=data, **dskw)
        if extra: extra(f, e, g)
    os.rename(p + ".tmp", p)

def gda9(name, n=3, finished=np.array([1], np.int32), keys=None, shape_ds=None):
    """GDA 9 layout: scan file + <name>-pilatus3_100k-files/<name>.hdf detector file."""
    stem = name[:-4]
    ddir = os.path.join(D, f"{stem}-pilatus3_100k-files"); os.makedirs(ddir, exist_ok=True)
    with h5py.File(os.path.join(ddir, f"{stem}.hdf"), "w") as f:
        f.create_dataset("entry/instrument/detector/data", data=frames(n), chunks=(1, 195, 487))
    p = os.path.join(D, name)
    with h5py.File(p + ".tmp", "w") as f:
        e = f.create_group("entry"); e.attrs["NX_class"] = "NXentry"
        ins = e.create_group("instrument"); det = ins.create_group("pil3_100k"); det.attrs["NX_class"] = "NXdetector"
        det["data"] = h5py.ExternalLink(f"{stem}-pilatus3_100k-files/{stem}.hdf", "/entry/instrument/detector/data")
        ds = e.create_group("diamond_scan")
        ds.create_dataset("keys/uniqueKeys", data=keys if keys is not None else np.arange(1, n + 1, dtype=np.int32))
        if finished is not None: ds["scan_finished"] = finished
        ds["scan_shape"] = shape_ds if shape_ds is not None else np.array([n], np.int32)
        ds["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"
        e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.rename(p + ".tmp", p)

# A. malformed GDA 9 end markers (the frames are good)
gda9("fin_empty.nxs", finished=np.zeros(0, np.int32))
gda9("fin_string.nxs", finished=np.array([b"true"]))
gda9("fin_nan.nxs", finished=np.array([np.nan]))
gda9("fin_half.nxs", finished=np.array([0.5]))
gda9("fin_good.nxs")                                   # control
# B. an unknown filter (id 32008, bitshuffle, not installed); C. szip
def unknown(f, e, g):
    del g["data"]
    ds = g.create_dataset("data", shape=(3, 195, 487), dtype="int32", chunks=(1, 195, 487), compression=32008,
                          compression_opts=(0, 2), allow_unknown_filter=True)
    for i in range(3): ds.id.write_direct_chunk((i, 0, 0), frames(1).tobytes())
nexus("filter_unknown.nxs", frames(3), extra=unknown)
nexus("filter_szip.nxs", frames(3), compression="szip")
nexus("filter_lzf_shuffle_f32.nxs", frames(3), compression="lzf", shuffle=True, fletcher32=True)
# D. the detector data an external link to itself; E. a VDS over itself; F. a soft-link loop; G. a hard-link cycle
def self_ext(f, e, g): g["data"] = h5py.ExternalLink("link_self.nxs", "/entry1/pil3_100k/data")
nexus("link_self.nxs", None, extra=self_ext)
def vds_self(f, e, g):
    lay = h5py.VirtualLayout(shape=(3, 195, 487), dtype="int32")
    lay[:] = h5py.VirtualSource(".", "/entry1/pil3_100k/data", shape=(3, 195, 487))
    g.create_virtual_dataset("data", lay, fillvalue=0)
nexus("vds_self.nxs", None, extra=vds_self)
def soft_loop(f, e, g):
    g["data"] = h5py.SoftLink("/entry1/pil3_100k/data2"); g["data2"] = h5py.SoftLink("/entry1/pil3_100k/data")
nexus("soft_loop.nxs", None, extra=soft_loop)
def hard_cycle(f, e, g):
    for i in range(5): e[f"loop{i}"] = e      # the entry holds itself 5 times
    m = e.create_group("measurement"); m.attrs["NX_class"] = "NXdata"; m["self"] = e; m["eta"] = np.arange(3.0)
    m.attrs["signal"] = "eta"; e.attrs["default"] = "measurement"
nexus("hard_cycle.nxs", frames(3), extra=hard_cycle)
# I. NXdata naming datasets that are not there
def bad_nxdata(f, e, g):
    m = e.create_group("plot"); m.attrs["NX_class"] = "NXdata"; e.attrs["default"] = "plot"
    m.attrs["signal"] = "missing_signal"; m.attrs["axes"] = ["missing_axis", ".", "."]; m.attrs["missing_axis_indices"] = 7
    m["eta"] = np.arange(3.0)
nexus("nxdata_missing.nxs", frames(3), extra=bad_nxdata)
# huge attribute strings (64 KiB+ forces dense attribute storage): @NX_class, @default, @axes of 8 MB
def huge_attrs(f, e, g):
    m = e.create_group("plot"); m.attrs["NX_class"] = "NXdata"; m["eta"] = np.arange(3.0)
    e.attrs["default"] = "plot" + "x" * 8_000_000; m.attrs["axes"] = "eta" + " " * 8_000_000; m.attrs["signal"] = "s" * 8_000_000
    g.attrs["note"] = "n" * 8_000_000
nexus("attrs_huge.nxs", frames(3), extra=huge_attrs)
# K. a non-UTF-8 group name for the detector (found by its NXdetector class)
def nonutf_group(f, e, g):
    ins = e.create_group("instrument"); grp = ins.create_group(b"det\xff\xfe"); grp.attrs["NX_class"] = "NXdetector"
    grp.create_dataset("data", data=frames(3), chunks=(1, 195, 487))
    del e["pil3_100k"]
nexus("nonutf_group.nxs", frames(3), extra=nonutf_group)
# odd shapes at the pixel limit: 1 x 8,388,608 and Pilatus 6M float16
nexus("row_8M.nxs", np.ones((2, 1, 8388608), np.int32), compression="gzip")
nexus("p6m_f16.nxs", np.full((2, 2527, 2463), 65504, np.float16), compression="gzip")
nexus("int8_limits.nxs", np.stack([np.full((195, 487), -128, np.int8), np.full((195, 487), 127, np.int8)]))
nexus("zero_frames.nxs", np.zeros((0, 195, 487), np.int32), chunks=None, maxshape=(None, 195, 487))
nexus("good_last.nxs", frames(3))
print("written", sorted(os.listdir(D)))
