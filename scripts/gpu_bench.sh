#!/usr/bin/env bash
# Every GPU figure issue 15 asks for, in one run that fits a lent machine's ~15 minutes (README "Speed", "On a GPU").
# Run from the repository root on the GPU host, after `pip install -e .` there:  bash scripts/gpu_bench.sh [OUT_DIR]
# On a lent GPU machine (no package index, 64 MiB sent): `python scripts/device_kit.py prepare` here prints the
# one device command that installs what is missing and runs this script; `... restore` afterwards.
# Prints each table and keeps the JSON. Never part of CI: a benchmark, not a test.
# DEVICE=cpu bash scripts/gpu_bench.sh runs the same steps on a CPU (slowly), to check the script itself.
set -euo pipefail
out=${1:-gpu-figures}
mkdir -p "$out"
py=${PYTHON:-python}
device=${DEVICE:-cuda}
# QUICK=1: a few frames per step, to check the whole script on a CPU in minutes (DEVICE=cpu QUICK=1 bash ...)
if [ "${QUICK:-0}" = 1 ]; then many=200; gpu_frames=24; baseline=4; hz_frames=24; scale=1,2
else many=2000; gpu_frames=1000; baseline=40; hz_frames=500; scale=1,2,4; fi

echo "== batch invariance on the GPU (a frame alone, in a full padded batch, reordered: the same masks)"
for batch in 1 8; do
  "$py" - "$batch" "$device" <<'EOF'
import sys
import numpy as np
from pipeline.config import ModelSettings
from pipeline.models.joint import JointPredictor
from pipeline.simulator import synth
batch, device = int(sys.argv[1]), sys.argv[2]
predictor = JointPredictor.from_settings(ModelSettings(model_batch=batch), device=device)
rng = np.random.default_rng(7)
frames = np.stack([synth.training_sample(rng)[0] for _ in range(batch * 2)])
full, alone = predictor.predict_batch(frames), [predictor.predict_image(frame) for frame in frames]
same = all(np.array_equal(a.tlm_labels, b.tlm_labels) and np.array_equal(a.ssl_mask, b.ssl_mask) and a.detections == b.detections
           for a, b in zip(alone, full))
print(f"model_batch {batch}: frame alone == in batch for all {len(frames)} frames: {same}")
EOF
done

echo "== the daemon's ceiling (models off) and the GPU table: 1, 2, 4 workers, model batches 1 and 8"
"$py" -m pipeline bench --models none --frames "$many" --workers 2 --no-progress --json "$out/ceiling.json" | tee "$out/ceiling.txt"
echo "== the daemon's ceiling with masks that hold something (stand-in workers: pixels above 20 counts; what bounds a GPU pool)"
"$py" -m pipeline bench --models threshold --frames "$many" --workers 4 --baseline-frames 0 --no-progress \
  --json "$out/ceiling-threshold.json" | tee "$out/ceiling-threshold.txt"
for batch in 1 8; do
  printf 'models:\n  model_batch: %s\nworkers:\n  batch_size: %s\n' "$batch" "$((batch > 4 ? batch : 4))" > "$out/batch$batch.yaml"
  "$py" -m pipeline bench --device "$device" --config "$out/batch$batch.yaml" --frames "$gpu_frames" --workers 2 --scale "$scale" \
    --baseline-frames "$baseline" --no-progress --json "$out/gpu-batch$batch.json" | tee "$out/gpu-batch$batch.txt"
done

echo "== latency at a 100 Hz detector, one GPU worker"
"$py" -m pipeline bench --device "$device" --config "$out/batch8.yaml" --rate 100 --frames "$hz_frames" --workers 1 --baseline-frames 0 \
  --no-progress --json "$out/gpu-100hz.json" | tee "$out/gpu-100hz.txt"

echo "== adaptive batching at a 100 Hz detector, one GPU worker: model calls padded to their bucket, a 50 ms latency target"
printf 'models:\n  model_batch: 8\n  batch_padding: bucket\nworkers:\n  batch_size: 8\n  latency_target_s: 0.05\n' > "$out/adaptive.yaml"
"$py" -m pipeline bench --device "$device" --config "$out/adaptive.yaml" --rate 100 --frames "$hz_frames" --workers 1 --baseline-frames 0 \
  --no-progress --json "$out/gpu-100hz-adaptive.json" | tee "$out/gpu-100hz-adaptive.txt"
"$py" - "$out/gpu-100hz-adaptive.json" "$out/gpu-100hz.json" <<'EOF'
import collections, json, sys
for label, path in (("adaptive (bucket, 50 ms target)", sys.argv[1]), ("fixed model_batch 8", sys.argv[2])):
    run = json.load(open(path))["pipeline"]
    latency = run["latency_ms"]["flush_to_done"]
    sizes = collections.Counter(int(row.get("batch", 0)) for row in run.get("per_frame", []))
    print(f"{label}: latency p50 {latency['p50']} ms, p99 {latency['p99']} ms; frames by batch size {dict(sorted(sizes.items()))}")
EOF
