#!/bin/bash
# Reproduces findings 1-2: unusual dtypes, limit values, odd shapes, 0/1-frame scans through `pipeline process`.
set -u
D=${1:-/tmp/audit-broken}; mkdir -p $D; cd $D
cat > cfg.yaml <<'EOC'
models: {tlm: {enabled: false}, sslm: {enabled: false}}
workers: {local: 1}
follow: {idle_timeout_s: 5.0, end_grace_s: 2.0, settle_s: 0.3, link_timeout_s: 3.0, open_timeout_s: 5.0}
daemon: {control: "ipc:///tmp/audit-broken/control"}
EOC
/work/main/.venv/bin/python $(dirname $0)/make_dtypes.py dt
timeout 300 /work/main/.venv/bin/pipeline process --config cfg.yaml --workers 1 --no-progress --idle-timeout 5 dt/*.nxs 2>&1 | tee dt.log
for s in lim_f64huge lim_inf lim_uint32max; do /work/main/.venv/bin/python -c "import json; a=json.load(open('dt/$s.zarr/zarr.json'))['attributes']; print('$s', a['status'], a['bad_frames'])"; done
