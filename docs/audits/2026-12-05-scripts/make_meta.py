"""Hostile metadata around otherwise good frames. Usage: python make_meta.py DIR"""
import sys, os, h5py, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import nexus
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(1)
fr = lambda n=3: rng.poisson(5.0, (n, 195, 487)).astype(np.int32)

def with_nxdata(name, tweak, n=3):
    p = nexus(f"{d}/{name}.nxs", fr(n))
    with h5py.File(p, "a") as f:
        e = f["entry1"]
        g = e.create_group("plot"); g.attrs["NX_class"] = "NXdata"
        g["eta"] = np.linspace(10, 10.5, n)
        g["data"] = h5py.SoftLink("/entry1/pil3_100k/data")
        g.attrs["signal"] = "data"; g.attrs["axes"] = ["eta", ".", "."]
        e.attrs["default"] = "plot"; e.attrs["NX_class"] = "NXentry"
        tweak(e, g)

def t_signal_missing(e, g): g.attrs["signal"] = "nope"
def t_signal_int(e, g): g.attrs["signal"] = np.int64(5)
def t_signal_array(e, g): g.attrs["signal"] = np.arange(1000)
def t_default_array(e, g): e.attrs["default"] = np.array([1, 2, 3])
def t_default_missing(e, g): e.attrs["default"] = "nowhere"
def t_axes_int(e, g): g.attrs["axes"] = np.array([1, 2, 3])
def t_axes_binary(e, g): g.attrs["axes"] = np.void(b"\x00\xff\xfe" * 10)
def t_axis_strings(e, g):
    del g["eta"]; g["eta"] = np.array([b"a", b"b", b"c"])
def t_axis_bomb(e, g):  # 150M float32 axis, compresses to ~150 kB
    del g["eta"]
    ds = g.create_dataset("eta", shape=(150_000_000,), dtype="f4", chunks=(4_000_000,), compression="gzip")
    ds[:] = 0  # writes zero chunks, tiny on disk
for t in [t_signal_missing, t_signal_int, t_signal_array, t_default_array, t_default_missing, t_axes_int, t_axes_binary, t_axis_strings, t_axis_bomb]:
    with_nxdata("m_" + t.__name__[2:], t)

nexus(f"{d}/m_sc_newline.nxs", fr(), scan_command="scan eta 10 10.5 0.25 pil3_100k 1\nERROR pipeline.live.session: /etc/passwd: forged line \x1b[31mred\x1b[0m")
nexus(f"{d}/m_sc_huge.nxs", fr(), scan_command="scan eta 10 10.5 0.25 pil3_100k 1 " + "x" * 20_000_000)
nexus(f"{d}/m_sc_binary.nxs", fr(), scan_command=np.void(bytes(range(256)) * 4))
nexus(f"{d}/m_sc_int.nxs", fr(), scan_command=np.int64(7))
nexus(f"{d}/m_sc_points_huge.nxs", fr(), scan_command="scan eta 0 1e12 1e-9 pil3_100k 1")
p = nexus(f"{d}/m_sc_bigarray.nxs", fr(), scan_command="placeholder")
with h5py.File(p, "a") as f:
    del f["entry1/scan_command"]
    f["entry1"].create_dataset("scan_command", shape=(400_000_000,), dtype="u1", chunks=(8_000_000,), compression="gzip")
p = nexus(f"{d}/m_start_time_huge.nxs", fr())
with h5py.File(p, "a") as f:
    del f["entry1/start_time"]; f["entry1/start_time"] = "2024-01-01T00:00:00" + "y" * 5_000_000
