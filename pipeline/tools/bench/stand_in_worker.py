"""A worker whose "models" threshold the counts: `pipeline bench --models threshold` runs these as its workers.

Why: with `--models none` every mask is empty, which is the cheapest case for the daemon (nothing to label in 3D,
no mask chunk to write). Real frames have peaks. Pixels above THRESHOLD_COUNTS on a simulated frame are about as
many as the truth's peak pixels (a few hundred to a few thousand a frame, none on many), so the daemon's own path is
measured with masks that hold something, at no model cost. Started by the daemon as
`workers.command: [python, -m, pipeline.tools.bench.stand_in_worker]`, with the options of `pipeline worker`; both
models are off in its config, so the joint predictor answers with empty masks, which this replaces.
"""

from __future__ import annotations

import sys

import numpy as np

from pipeline.models.prediction import FramePrediction, FramePredictor

THRESHOLD_COUNTS = 20  # above the simulated background (median 4 counts), below the faint peaks' maxima
STAND_IN_CLUSTER = 3  # the SSLM's cluster id given to the thresholded pixels


class ThresholdPredictor:
    """Masks of the pixels above THRESHOLD_COUNTS in place of the models' (one TLM instance, one SSLM cluster)."""

    def __init__(self, predictor: FramePredictor) -> None:
        self.predictor = predictor

    def predict_batch(self, frames: np.ndarray) -> list[FramePrediction]:
        predictions = self.predictor.predict_batch(frames)
        for frame, prediction in zip(frames, predictions):
            above = (frame > THRESHOLD_COUNTS).astype(np.uint8)
            prediction.ssl_mask = above
            prediction.ssl_clusters = above * np.uint8(STAND_IN_CLUSTER)
            prediction.tlm_labels = above.astype(np.uint16)
        return predictions


def main(argv: list[str] | None = None) -> int:
    from pipeline import cli

    args = cli.build_parser().parse_args(["worker", *(sys.argv[1:] if argv is None else argv)])
    return cli.cmd_worker(args, wrap_predictor=ThresholdPredictor)


if __name__ == "__main__":
    raise SystemExit(main())
