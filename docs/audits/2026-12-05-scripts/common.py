"""Helpers shared by the audit-broken reproductions: a DiPID-era NeXus file like pipeline.testing.files.nexus_file."""
import time, h5py, numpy as np

def nexus(path, data=None, *, shape=None, dtype=None, detector="pil3_100k", scan_command=None, end=True, chunks=True):
    with h5py.File(path + ".tmp", "w") as f:
        e = f.create_group("entry1")
        n = data.shape[0] if data is not None and data.ndim >= 1 else (shape[0] if shape else 5)
        e["scan_command"] = scan_command if scan_command is not None else f"scan eta 10 {10 + 0.25 * max(n - 1, 0):g} 0.25 pil3_100k 1"
        e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if end:
            e["end_time"] = "2024-01-01T00:00:00"
        g = e.create_group(detector)
        g.attrs["NX_class"] = "NXdetector"
        if data is not None:
            ch = (1, *data.shape[1:]) if (chunks and data.ndim >= 3 and data.shape[0] > 0 and data.size) else None
            g.create_dataset("data", data=data, chunks=ch)
        else:
            g.create_dataset("data", shape=shape, dtype=dtype)
    import os; os.rename(path + ".tmp", path)
    return path
