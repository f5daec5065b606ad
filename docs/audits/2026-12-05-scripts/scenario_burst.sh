#!/bin/bash
# 100 tiny (2-frame) scans dropped at once; time `pipeline status` while they are processed; then one more good scan.
D=/tmp/audit-broken; N=$(dirname $(readlink -f $0)); W=$D/w3; S=$D/staging
mkdir -p $D; chmod 700 $D; cd $D; rm -rf $W $S; mkdir -p $W $S
/work/main/.venv/bin/python -c "
import sys; sys.path.insert(0,'$N'); from common import nexus; import numpy as np
for k in range(100): nexus(f'$S/tiny{k:03d}.nxs', np.random.default_rng(k).poisson(5.0,(2,195,487)).astype(np.int32))
nexus('$D/last.nxs', np.random.default_rng(999).poisson(5.0,(4,195,487)).astype(np.int32))"
$N/daemon.sh start $W d3.log; sleep 6
mv $S/*.nxs $W/; T0=$(date +%s.%N); echo "100 dropped at $(date +%T)"
for i in $(seq 1 30); do
  s=$(date +%s.%N); out=$(timeout 10 /work/main/.venv/bin/pipeline status --endpoint ipc://$D/control --json 2>&1); rc=$?; e=$(date +%s.%N)
  n=$(ls -d $W/*.zarr 2>/dev/null | wc -l)
  c=$(grep -l '"status": *"complete"' $W/*.zarr/zarr.json 2>/dev/null | wc -l)
  printf "t=%5.1f status_rc=%s status_took=%.2fs stores=%s complete=%s\n" $(echo "$s - $T0" | bc) $rc $(echo "$e - $s" | bc) $n $c
  [ "$c" -ge 100 ] && break; sleep 1
done
mv $D/last.nxs $W/; sleep 6
grep -c '"status": *"complete"' $W/*.zarr/zarr.json | grep -v ":1$" ; echo "complete stores: $(grep -l '"status": *"complete"' $W/*.zarr/zarr.json | wc -l)"
grep "last.nxs" d3.log | grep -v "nexus layout" | cut -c1-200
$N/daemon.sh stop
grep -E "WARNING|ERROR" d3.log | cut -c1-300 | head
