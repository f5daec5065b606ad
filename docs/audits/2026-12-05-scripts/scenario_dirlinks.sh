#!/bin/bash
# Directory symlinks inside a watched directory: a loop (-> .), the parent (-> ..), the root (-> /); then a good scan.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w7
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W $D/outside; mkdir -p $W/sub $D/outside
/work/main/.venv/bin/python -c "
import sys; sys.path.insert(0,'$N'); from common import nexus; import numpy as np
nexus('$D/outside/secret.nxs', np.random.default_rng(1).poisson(5.0,(2,195,487)).astype(np.int32))"
ln -s . $W/loop; ln -s .. $W/sub/up; ln -s / $W/root; ln -s $D/outside $W/out.nxs
$N/daemon.sh start $W d7.log; sleep 8
/work/main/.venv/bin/python -c "
import sys; sys.path.insert(0,'$N'); from common import nexus; import numpy as np
nexus('$W/sub/good.nxs', np.random.default_rng(2).poisson(5.0,(3,195,487)).astype(np.int32))"
sleep 8; ps -o pid,pcpu,rss,args --ppid $(pgrep -P $(cat $D/daemon.pid) | head -1) 2>/dev/null | head -5
timeout 10 /work/main/.venv/bin/pipeline status --endpoint ipc://$D/control 2>&1 | head -12
$N/daemon.sh stop
grep -v "quick look\|nexus layout" d7.log | cut -c1-300; ls $D/outside
