#!/bin/bash
# Round 2: run the daemon (one worker, models off) over the batch of odd files + bombs + a non-UTF-8 file name.
B=/tmp/audit-broken; N=/work/notes/audit-broken; PY=/work/main/.venv/bin/python
mkdir -p $B; chmod 700 $B; cd $B; rm -rf b1 b1src bombsrc
$PY $N/r2_make_batch.py b1src > /dev/null
$PY $N/r2_bomb_filters.py bombsrc 1024 > /dev/null
$PY - <<'EOP'   # a scan whose name is not UTF-8 (a copy of good_last.nxs)
import shutil; shutil.copy(b"b1src/good_last.nxs", b"b1src/name_\xff\xfe_latin.nxs")
EOP
$N/daemon.sh start $B/b1 $B/b1.log
sleep 25   # workers up
cp -r b1src/*-files b1/ ; cp bombsrc/bomb_fletcher.nxs bombsrc/bomb_scaleoffset.nxs b1/
for f in b1src/*.nxs; do cp "$f" b1/; done
for i in $(seq 1 24); do sleep 5; /usr/bin/time -f "status took %e s" timeout 20 /work/main/.venv/bin/pipeline status --config $B/dcfg.yaml > $B/status.$i 2>&1; tail -1 $B/status.$i; done
$PY - <<'EOP'
import os, zarr
for n in sorted(os.listdir(b"/tmp/audit-broken/b1")):
    if n.endswith(b".zarr"):
        try:
            a = dict(zarr.open_group(os.path.join(b"/tmp/audit-broken/b1", n).decode(errors="surrogateescape"), mode="r", use_consolidated=False).attrs)
        except Exception as e:
            print(n, "UNREADABLE", e); continue
        print(n.decode(errors="backslashreplace"), a.get("status"), a.get("frames_done"), "|", a.get("end_reason"), "| bad", a.get("bad_frames"))
nx = [n for n in os.listdir(b"/tmp/audit-broken/b1") if n.endswith(b".nxs")]
print("nxs without store:", [n for n in nx if not os.path.exists(os.path.join(b"/tmp/audit-broken/b1", n[:-4] + b".zarr"))])
EOP
$N/daemon.sh stop
