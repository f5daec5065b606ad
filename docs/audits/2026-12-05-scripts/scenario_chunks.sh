#!/bin/bash
# F6 repro: frames written into multi-frame chunks, the dataset grown 1.5 s before each frame is written.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w4
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
$N/daemon.sh start $W d4.log; sleep 6
/work/main/.venv/bin/python $N/live_writer_chunks.py $W/chunky.nxs 8 4 1.5 > wC.log 2>&1
/work/main/.venv/bin/python $N/live_writer_chunks.py $W/reshape.nxs 6 1 0.0 --reshape-at 3 > wR.log 2>&1
sleep 8
$N/daemon.sh stop
grep -v "quick look" d4.log | cut -c1-350
/work/main/.venv/bin/python - <<EOP
import json, zarr, numpy as np, h5py
for s in ["chunky", "reshape"]:
    try:
        a = json.load(open(f"$W/{s}.zarr/zarr.json"))["attributes"]
        g = zarr.open_group(f"$W/{s}.zarr", mode="r", use_consolidated=False)
        print(s, a.get("status"), a.get("end_reason"), "bad_frames", a.get("bad_frames"), "done", g["frames/done"][:].tolist())
    except Exception as error: print(s, "store:", error)
with h5py.File("$W/chunky.nxs", "r") as f: d = f["entry1/pil3_100k/data"]; print("file: all-zero frames", [i for i in range(d.shape[0]) if not d[i].any()])
EOP
