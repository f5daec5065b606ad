#!/bin/bash
# Reproduces F2-F3: hostile metadata around good frames, through `pipeline process`.
set -u
D=${1:-/tmp/audit-broken}; mkdir -p $D; cd $D
[ -f cfg.yaml ] || cat > cfg.yaml <<'EOC'
models: {tlm: {enabled: false}, sslm: {enabled: false}}
workers: {local: 1}
follow: {idle_timeout_s: 5.0, end_grace_s: 2.0, settle_s: 0.3, link_timeout_s: 3.0, open_timeout_s: 5.0}
daemon: {control: "ipc:///tmp/audit-broken/control"}
EOC
H=$(dirname $(readlink -f $0))
/work/main/.venv/bin/python $H/make_meta.py meta
/work/main/.venv/bin/python $H/make_axis_fill.py meta/m_axis_fill.nxs 400000000
timeout 300 /work/main/.venv/bin/pipeline process --config cfg.yaml --workers 1 --no-progress --idle-timeout 5 meta/*.nxs 2>&1 | grep -v "quick look" | tee meta.log
