#!/bin/bash
# F10: the detector pre-allocates the whole scan (5 frames) as a contiguous dataset, then fills one frame a second.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w9
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
$N/daemon.sh start $W d9.log; sleep 7
/work/main/.venv/bin/python - <<EOP
import time, h5py, numpy as np
W = "$W"
with h5py.File(f"{W}/prealloc.nxs", "w", libver="latest") as f:
    e = f.create_group("entry1")
    e["scan_command"] = "scan eta 10 11 0.25 pil3_100k 1"
    e["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    end = e.create_dataset("end_time", data=np.bytes_(b""), dtype="S32")
    g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"
    ds = g.create_dataset("data", shape=(5, 195, 487), dtype="i4")  # contiguous, allocated
    f.swmr_mode = True
    for i in range(5):
        time.sleep(1.0); ds[i] = np.random.default_rng(i).poisson(5.0, (195, 487)) + 1; ds.flush(); f.flush()
    end[()] = np.bytes_(time.strftime("%Y-%m-%dT%H:%M:%S").encode()); end.flush()
print("written", time.strftime("%T"))
EOP
sleep 6
$N/daemon.sh stop
grep -v "quick look" d9.log | grep prealloc | cut -c1-300
/work/main/.venv/bin/python -c "
import json; a=json.load(open('$W/prealloc.zarr/zarr.json'))['attributes']; print(a.get('status'), a.get('end_reason'), a.get('bad_frames'))"
