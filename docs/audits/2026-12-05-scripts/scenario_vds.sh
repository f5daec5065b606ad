#!/bin/bash
# F9: an Odin/Eiger-style scan: the .nxs holds a virtual dataset made at scan start; its source file is written 4 s later.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w8
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
$N/daemon.sh start $W d8.log; sleep 7
/work/main/.venv/bin/python - <<EOP
import time, h5py, numpy as np
W = "$W"
layout = h5py.VirtualLayout(shape=(4, 195, 487), dtype="i4")
layout[:] = h5py.VirtualSource("vds_data_000001.h5", "data", shape=(4, 195, 487))
with h5py.File(f"{W}/vds.nxs.part", "w", libver="latest") as f:
    e = f.create_group("entry1")
    e["scan_command"] = "scan eta 10 10.75 0.25 pil3_100k 1"
    e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    e.create_dataset("end_time", data=np.bytes_(b""), dtype="S32")
    g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"
    g.create_virtual_dataset("data", layout, fillvalue=0)
import os; os.replace(f"{W}/vds.nxs.part", f"{W}/vds.nxs"); print("vds.nxs appeared", time.strftime("%T"), flush=True)
time.sleep(4)
with h5py.File(f"{W}/vds_data_000001.h5", "w") as f:
    f["data"] = np.random.default_rng(0).poisson(5.0, (4, 195, 487)).astype("i4") + 1
print("source written", time.strftime("%T"), flush=True)
with h5py.File(f"{W}/vds.nxs", "a") as f: f["entry1/end_time"][()] = np.bytes_(time.strftime("%Y-%m-%dT%H:%M:%S").encode())
print("end_time set", time.strftime("%T"), flush=True)
EOP
sleep 8
$N/daemon.sh stop
grep -v "quick look" d8.log | grep vds | cut -c1-300
/work/main/.venv/bin/python -c "
import json; a=json.load(open('$W/vds.zarr/zarr.json'))['attributes']; print(a.get('status'), a.get('end_reason'), a.get('bad_frames'))"
