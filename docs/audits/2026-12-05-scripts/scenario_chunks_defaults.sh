#!/bin/bash
# F5 with the default follow settings (settle_s 0.5) through `pipeline process` of a growing file: 4-frame chunks, 0.7 s grow-to-write gap.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w11
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W; mkdir -p $W
printf 'models: {tlm: {enabled: false}, sslm: {enabled: false}}\nworkers: {local: 1}\n' > cfg_default.yaml
/work/main/.venv/bin/python $N/live_writer_chunks.py $W/chunky07.nxs 8 4 0.7 > /dev/null 2>&1 &
sleep 1
timeout 120 /work/main/.venv/bin/pipeline process --config cfg_default.yaml --workers 1 --no-progress --idle-timeout 5 $W/chunky07.nxs 2>&1 | grep -E "chunky07" | grep -v "quick look\|nexus layout" | cut -c1-300
wait
