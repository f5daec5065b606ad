#!/bin/bash
# F5 threshold (gap 0.4 s vs settle_s 0.3) and F8: scan file names holding a newline / terminal escapes.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w6
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
$N/daemon.sh start $W d6.log; sleep 6
/work/main/.venv/bin/python $N/live_writer_chunks.py $W/chunky04.nxs 8 4 0.4 > /dev/null 2>&1 &
/work/main/.venv/bin/python - <<EOP
import sys; sys.path.insert(0, '$N'); from common import nexus; import numpy as np
nexus('$W/evil\nERROR   MainProcess pipeline.live.session: other.nxs is FORGED.nxs', np.full((2, 195, 487), True))
nexus('$W/esc\x1b[2J\x1b[31mred.nxs', np.full((2, 195, 487), True))
EOP
wait; sleep 8
timeout 10 /work/main/.venv/bin/pipeline status --endpoint ipc://$D/control 2>&1 | cat -A | cut -c1-200 | head -12
$N/daemon.sh stop
grep -v "quick look\|nexus layout" d6.log | grep -E "chunky|evil|FORGED|esc|red" | cat -A | cut -c1-300
