#!/bin/bash
# Round 2: the same as r2_cwd_links.sh, through `pipeline run` (roots = watch.dirs), the daemon started in BASE/cwd.
B=/tmp/audit-broken/cwdd; PY=/work/main/.venv/bin/python
rm -rf $B; mkdir -p $B; chmod 700 /tmp/audit-broken $B
$PY /work/notes/audit-broken/r2_cwd_links.py $B/src > /dev/null
mkdir -p $B/w; mv $B/src/cwd $B/cwd
cat > $B/cfg.yaml <<EOC
models: {tlm: {enabled: false}, sslm: {enabled: false}}
workers: {local: 1}
follow: {link_timeout_s: 3.0, open_timeout_s: 5.0}
daemon: {control: "ipc://$B/control"}
EOC
cd $B/cwd
timeout 120 /work/main/.venv/bin/pipeline run --config $B/cfg.yaml --watch $B/w --workers 1 > $B/log 2>&1 &
DPID=$!; sleep 20; cp $B/src/w/*.nxs $B/w/; sleep 15; kill -TERM $DPID; wait $DPID
grep -E "nxs|secret" $B/log | cut -c1-260
for s in vds_rel grp_link abs_link; do $PY -c "
import zarr,sys; a=dict(zarr.open_group('$B/w/$s.zarr',mode='r',use_consolidated=False).attrs); print('STORE $s', a.get('status'), a.get('bad_frames'))"; done
