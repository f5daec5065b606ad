#!/bin/bash
# Round 2: pixels read from the daemon's working directory (outside watch.dirs / allowed_roots) via relative links.
B=/tmp/audit-broken/cwdlinks; rm -rf $B; mkdir -p $B; chmod 700 /tmp/audit-broken
/work/main/.venv/bin/python /work/notes/audit-broken/r2_cwd_links.py $B
cat > $B/cfg.yaml <<EOC
models: {tlm: {enabled: false}, sslm: {enabled: false}}
follow: {link_timeout_s: 3.0, open_timeout_s: 5.0}
EOC
cd $B/cwd   # the daemon's working directory (systemd: /opt/pipeline)
for s in vds_rel grp_link abs_link; do
  timeout 120 /work/main/.venv/bin/pipeline process --config $B/cfg.yaml --workers 1 --no-progress $B/w/$s.nxs 2>&1 | grep -v "^$" | tail -5
  /work/main/.venv/bin/python - $B/w/$s.zarr <<'EOP'
import sys, zarr
g = zarr.open_group(sys.argv[1], mode="r", use_consolidated=False)
a = dict(g.attrs); print("   STORE", sys.argv[1].split("/")[-1], a.get("status"), a.get("end_reason"), "bad_frames=", a.get("bad_frames"), "source=", a.get("source_file"), a.get("source_dataset"))
EOP
done
