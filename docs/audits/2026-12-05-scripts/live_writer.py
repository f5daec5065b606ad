"""A detector writing a DiPID-era NeXus scan live (SWMR, one chunk per frame).
Usage: python live_writer.py PATH N_FRAMES(-1: forever) RATE_HZ [--no-end] [--seed S]
Writes under PATH and keeps writing into the same open file whatever happens to its name."""
import sys, time, h5py, numpy as np
path, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = "--no-end" not in sys.argv
seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
rng = np.random.default_rng(seed)
points = n if n > 0 else 1000000
with h5py.File(path, "w", libver="latest") as f:
    e = f.create_group("entry1")
    e["scan_command"] = f"scan eta 10 {10 + 0.25 * (points - 1):g} 0.25 pil3_100k 1"
    e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S") + f".{time.time_ns() % 10**9:09d}"
    g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"
    ds = g.create_dataset("data", shape=(0, 195, 487), maxshape=(None, 195, 487), dtype="i4", chunks=(1, 195, 487))
    f.swmr_mode = True
    i = 0
    while n < 0 or i < n:
        ds.resize(i + 1, axis=0); ds[i] = rng.poisson(5.0, (195, 487)); ds.flush(); f.flush()
        print(f"wrote frame {i}", flush=True)
        i += 1
        time.sleep(1.0 / rate)
if end:
    try:
        with h5py.File(path, "a") as f:
            f["entry1"]["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    except Exception as error:  # the name now points at another file (renamed over): no end marker
        print(f"no end marker: {error}", flush=True)
