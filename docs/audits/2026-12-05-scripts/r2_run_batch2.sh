#!/bin/bash
# Round 2: batch 2 through the daemon (one worker, models off).
B=/tmp/audit-broken; N=/work/notes/audit-broken; PY=/work/main/.venv/bin/python
mkdir -p $B; chmod 700 $B; cd $B; rm -rf b2 b2src b2out
$PY $N/r2_make_batch2.py b2src b2out > /dev/null
$N/daemon.sh start $B/b2 $B/b2.log
sleep 20
cp -a b2src/. b2/
for i in $(seq 1 8); do sleep 5; /usr/bin/time -f "status took %e s" timeout 20 /work/main/.venv/bin/pipeline status --config $B/dcfg.yaml > $B/status2.$i 2>&1; tail -1 $B/status2.$i; done
grep -E "nxs" $B/status2.8
$PY - <<'EOP'
import os, zarr
for n in sorted(os.listdir("/tmp/audit-broken/b2")):
    if n.endswith(".zarr"):
        a = dict(zarr.open_group("/tmp/audit-broken/b2/" + n, mode="r", use_consolidated=False).attrs)
        print(n, a.get("status"), a.get("frames_done"), "|", a.get("end_reason"), "| bad", a.get("bad_frames"))
EOP
$N/daemon.sh stop
