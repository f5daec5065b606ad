"""What the TLM's per-frame caps (region proposals scored, detections kept) cost and find, in one run.

Why: the caps were sized for simulated frames of 1-8 peaks; real crowded frames hold tens of spots
per module (issue 26). For each (proposals, detections) pair this prints, with the shipped weights on
this machine (one torch thread unless --threads):
- real Pilatus modules (pipeline/models/data/pilatus_modules.npz, thaumatin): detections per frame,
  frames at the cap, reference spots covered by a TLM instance (`reference_spots`: a classical
  spot finder, not the truth), TLM milliseconds per frame;
- held-out simulator frames (`pipeline evaluate`'s set): instance F1 against the truth, frames at the
  cap, TLM milliseconds per frame.

Usage: python scripts/tlm_caps_bench.py [--sim-frames 40] [--threads 1] [--caps 50/16,200/64,...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.config import ModelSettings
from pipeline.models.evaluate import HELD_OUT_SETTINGS
from pipeline.models.joint import JointPredictor
from pipeline.models.real_frames import REAL_MODULES, load_frames, reference_spots, spots_covered
from pipeline.models.scoring import instance_figures
from pipeline.simulator import synth

DEFAULT_CAPS = "50/16,100/32,200/64,300/100,500/100,1000/100"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim-frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--caps", default=DEFAULT_CAPS, help=f"proposals/detections pairs (default {DEFAULT_CAPS})")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the frames; the fastest pass counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modules, _ = load_frames(REAL_MODULES)
    spots = [reference_spots(module) for module in modules]
    rng_seed = 12345
    simulated = [synth.training_sample(np.random.default_rng([rng_seed, i]), HELD_OUT_SETTINGS) for i in range(args.sim_frames)]
    sim_counts = np.stack([counts for counts, _ in simulated])
    print(f"real: {len(modules)} Pilatus modules, reference spots {[int(s.max()) for s in spots]}; "
          f"simulated: {args.sim_frames} held-out frames, {sum(int(t.max()) for _, t in simulated)} peaks; "
          f"{args.threads} thread(s), float32")
    print(f"{'proposals/detections':>20} | {'real: detections per frame':<34} {'at cap':>6} {'spots covered':>13} {'ms':>6} | "
          f"{'sim: F1':>7} {'at cap':>6} {'ms':>6}")
    for pair in args.caps.split(","):
        proposals, detections = (int(v) for v in pair.split("/"))
        settings = ModelSettings.model_validate({"precision": "float32", "tlm": {"proposals": proposals, "detections": detections},
                                                 "sslm": {"enabled": False}})
        predictor = JointPredictor.from_settings(settings)
        predictor.predict_batch(modules[:1])  # warm-up

        def timed(frames: np.ndarray, predictor: JointPredictor = predictor) -> tuple[list, float]:
            best, predictions = float("inf"), []
            for _ in range(args.repeats):
                started = time.perf_counter()
                predictions = [predictor.predict_image(frame) for frame in frames]
                best = min(best, (time.perf_counter() - started) / len(frames))
            return predictions, best

        real, real_s = timed(modules)
        covered = sum(spots_covered(s, p.tlm_labels) for s, p in zip(spots, real))
        total = sum(int(s.max()) for s in spots)
        sim, sim_s = timed(sim_counts)
        f1 = instance_figures([p.tlm_labels for p in sim], [truth for _, truth in simulated])["f1"]
        counts = " ".join(f"{len(p.detections):>3}" for p in real)
        print(f"{pair:>20} | {counts:<34} {sum(p.detections_capped for p in real):>6} {covered:>5}/{total:<4} "
              f"{100 * covered / total:>2.0f}% {real_s * 1000:>5.0f} | {f1:>7.3f} {sum(p.detections_capped for p in sim):>6} "
              f"{sim_s * 1000:>6.0f}")


if __name__ == "__main__":
    main()
