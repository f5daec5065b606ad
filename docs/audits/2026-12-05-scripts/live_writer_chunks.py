"""A detector whose chunks hold several frames (NDFileHDF5 NumFramesChunks > 1), growing the dataset GAP seconds
before writing each frame into it. Every frame written is non-zero (poisson 5 + 1).
Usage: python live_writer_chunks.py PATH N CHUNK_FRAMES GAP_S [--reshape-at K]"""
import sys, time, h5py, numpy as np
path, n, cf, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
reshape_at = int(sys.argv[sys.argv.index("--reshape-at") + 1]) if "--reshape-at" in sys.argv else None
rng = np.random.default_rng(5)
with h5py.File(path, "w", libver="latest") as f:
    e = f.create_group("entry1")
    e["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"
    e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S") + f".{time.time_ns() % 10**9:09d}"
    g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"
    ds = g.create_dataset("data", shape=(0, 195, 487), maxshape=(None, None, None), dtype="i4", chunks=(cf, 195, 487))
    f.swmr_mode = True
    for i in range(n):
        if reshape_at is not None and i == reshape_at:
            ds.resize((i, 200, 487)); ds.flush(); print("frames now 200 x 487", flush=True)
        ds.resize(i + 1, axis=0); ds.flush(); f.flush()
        time.sleep(gap)
        ds[i] = rng.poisson(5.0, ds.shape[1:]) + 1; ds.flush(); f.flush()
        print(f"wrote frame {i}", flush=True)
        time.sleep(0.3)
with h5py.File(path, "a") as f:
    f["entry1"]["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
