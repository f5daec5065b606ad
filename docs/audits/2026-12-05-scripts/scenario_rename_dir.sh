#!/bin/bash
# F4/F5 repro: a directory named like a scan file, and a live scan renamed over by a different finished scan.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w1
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
$N/daemon.sh start $W d1.log; sleep 6
mkdir -p $W/dirscan.nxs $W/empty.nxs
/work/main/.venv/bin/python -c "
import sys; sys.path.insert(0,'$N'); from common import nexus; import numpy as np
nexus('$W/dirscan.nxs/inner.nxs', np.random.default_rng(2).poisson(5.0,(3,195,487)).astype(np.int32))
nexus('$D/other.nxs', np.random.default_rng(3).poisson(5.0,(5,195,487)).astype(np.int32))"
/work/main/.venv/bin/python $N/live_writer.py $W/r.nxs 10 1 --seed 1 > wA.log 2>&1 &
sleep 4.5; mv $D/other.nxs $W/r.nxs; echo "renamed over at $(date +%T)"
sleep 14
/work/main/.venv/bin/pipeline status --endpoint ipc://$D/control 2>&1 | head -30
$N/daemon.sh stop
grep -v "quick look" d1.log | cut -c1-400; tail -2 wA.log
for s in $W/r.zarr $W/dirscan.nxs/inner.zarr; do /work/main/.venv/bin/python -c "
import json; a=json.load(open('$s/zarr.json'))['attributes']; print('$s', a.get('status'), a.get('end_reason'), a.get('frames_done'), a.get('frames_expected'), a.get('source_start_time'))"; done
ls $W
