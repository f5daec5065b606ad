#!/bin/bash
# A symlink and a hard link inside the watched directory pointing at a scan also inside it.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w10
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W/sub
$N/daemon.sh start $W d10.log; sleep 7
/work/main/.venv/bin/python -c "
import sys; sys.path.insert(0,'$N'); from common import nexus; import numpy as np
nexus('$W/a.nxs', np.random.default_rng(2).poisson(5.0,(3,195,487)).astype(np.int32))"
ln -s ../a.nxs $W/sub/alias.nxs; ln $W/a.nxs $W/hard.nxs
sleep 8
$N/daemon.sh stop
grep -v "quick look\|nexus layout" d10.log | grep -E "a.nxs|alias|hard" | cut -c1-300; ls $W $W/sub
