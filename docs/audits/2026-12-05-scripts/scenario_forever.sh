#!/bin/bash
# F5 repro: scans that grow forever, slowly (a frame every 2 s, idle_timeout_s 5) hold every scan slot; a finished scan waits.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w2
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
MAX_ACTIVE=2 $N/daemon.sh start $W d2.log; sleep 6
for k in 1 2; do /work/main/.venv/bin/python $N/live_writer.py $W/forever$k.nxs -1 0.5 --no-end --seed $k > wF$k.log 2>&1 & echo $! >> $D/writers.pid; done
sleep 4
/work/main/.venv/bin/python -c "
import sys; sys.path.insert(0,'$N'); from common import nexus; import numpy as np
nexus('$W/good.nxs', np.random.default_rng(9).poisson(5.0,(3,195,487)).astype(np.int32))"
echo "good.nxs dropped at $(date +%T)"
for t in 10 30 50; do sleep 20; echo "== +$t s"; timeout 10 /work/main/.venv/bin/pipeline status --endpoint ipc://$D/control 2>&1 | head -12; done
kill $(cat $D/writers.pid); rm -f $D/writers.pid
sleep 8; echo "== after writers stopped"; timeout 10 /work/main/.venv/bin/pipeline status --endpoint ipc://$D/control 2>&1 | head -12
$N/daemon.sh stop
grep -v "quick look" d2.log | grep -v "^.*nexus layout" | cut -c1-300
