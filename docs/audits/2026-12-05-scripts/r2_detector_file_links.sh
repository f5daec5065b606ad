#!/bin/bash
# Round 2: the detector file (inside the roots) links onward, with an ABSOLUTE path, to a file outside the roots
# (external link; virtual dataset). Run from / so no relative/CWD fallback is involved.
B=/tmp/audit-broken/detlinks; PY=/work/main/.venv/bin/python
rm -rf $B; mkdir -p $B; chmod 700 /tmp/audit-broken
$PY /work/notes/audit-broken/r2_make_batch2.py $B/w $B/outside > /dev/null
printf 'models: {tlm: {enabled: false}, sslm: {enabled: false}}\n' > $B/cfg.yaml
cd /
for s in det_ext_out det_vds_out; do
  timeout 120 /work/main/.venv/bin/pipeline process --config $B/cfg.yaml --workers 1 --no-progress $B/w/$s.nxs 2>&1 | grep -E "nxs" | cut -c1-250
  $PY -c "
import zarr; a=dict(zarr.open_group('$B/w/$s.zarr',mode='r',use_consolidated=False).attrs); print('   STORE $s', a.get('status'), a.get('end_reason'), a.get('bad_frames'))"
done
