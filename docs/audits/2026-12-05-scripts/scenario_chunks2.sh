#!/bin/bash
# F6 variants: (a) 4-frame chunks, no gap; (b) 1-frame chunks, 1.5 s gap between grow and write; (c) plain writer, end_time added after closing
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w5
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
$N/daemon.sh start $W d5.log; sleep 6
/work/main/.venv/bin/python $N/live_writer_chunks.py $W/chunk4_gap0.nxs 8 4 0.0 > /dev/null 2>&1 &
/work/main/.venv/bin/python $N/live_writer_chunks.py $W/chunk1_gap15.nxs 6 1 1.5 > /dev/null 2>&1 &
/work/main/.venv/bin/python $N/live_writer.py $W/plain_end.nxs 5 2 > /dev/null 2>&1 &
wait
sleep 8
$N/daemon.sh stop
grep -v "quick look\|nexus layout" d5.log | grep -E "chunk|plain" | cut -c1-300
/work/main/.venv/bin/python - <<EOP
import json, zarr
for s in ["chunk4_gap0", "chunk1_gap15", "plain_end"]:
    a = json.load(open(f"$W/{s}.zarr/zarr.json"))["attributes"]
    print(s, a.get("status"), a.get("end_reason"), "bad_frames", a.get("bad_frames"))
EOP
