#!/bin/bash
# Round 2: frames wider than wire.MAX_SIDE (8192) but under follow.max_frame_pixels (a line detector, 1 x 10000):
# the follower accepts them, the worker silently ignores them, they stay in flight; with >= workers.credit of them
# every other scan stalls too. usage: r2_wide_frame.sh [TASK_TIMEOUT_S (default 300)] [OBSERVE_S (default 60)]
B=/tmp/audit-broken/wide; PY=/work/main/.venv/bin/python; TT=${1:-300}; OBS=${2:-60}
rm -rf $B; mkdir -p $B/w; chmod 700 /tmp/audit-broken $B
cat > $B/cfg.yaml <<EOC
models: {tlm: {enabled: false}, sslm: {enabled: false}}
workers: {local: 1, task_timeout_s: $TT}
follow: {idle_timeout_s: 5.0}
daemon: {control: "ipc://$B/control"}
EOC
timeout $((OBS + 120)) /work/main/.venv/bin/pipeline run --config $B/cfg.yaml --watch $B/w --workers 1 > $B/log 2>&1 &
DPID=$!
sleep 20
$PY - $B/w <<'EOP'
import sys, os, h5py, numpy as np, time
d = sys.argv[1]
def scan(name, data):
    with h5py.File(f"{d}/.{name}", "w") as f:
        e = f.create_group("entry1"); n = len(data)
        e["scan_command"] = f"scan eta 10 {10 + 0.25 * (n - 1):g} 0.25 pil3_100k 1"; e["start_time"] = "2026-12-05T00:00:00"; e["end_time"] = "2026-12-05T00:01:00"
        g = e.create_group("pil3_100k"); g.attrs["NX_class"] = "NXdetector"; g.create_dataset("data", data=data, chunks=(1, *data.shape[1:]))
    os.rename(f"{d}/.{name}", f"{d}/{name}")
scan("line_1x10000.nxs", np.ones((10, 1, 10000), np.int32))   # 10 frames >= workers.credit (8)
time.sleep(3)
scan("good_after.nxs", np.ones((3, 195, 487), np.int32) * 5)
EOP
for t in $(seq 10 10 $OBS); do sleep 10; echo "--- t=${t}s"; timeout 20 /work/main/.venv/bin/pipeline status --config $B/cfg.yaml 2>&1 | grep -E "queue|worker|nxs"; done
kill -TERM $DPID; sleep 2; kill -TERM $DPID 2>/dev/null; wait $DPID
grep -E "WARNING|ERROR" $B/log | cut -c1-250 | sort | uniq -c | sort -rn | head -12
