"""A real worker made slow (or made to crash) on purpose, for tests: `python -m pipeline.testing.slow_worker ...`.

It takes the options of `pipeline worker` and runs the same worker, except that with the
environment variable `PIPELINE_WORKER_DELAY_S` set it sleeps that many extra seconds per frame
after the models ran, and with `PIPELINE_WORKER_CRASH_AFTER=N` the process dies (exit 3) when it
has predicted N frames, as a worker that crashes mid-scan. A daemon starts it as its local workers when the config says
`workers.command: [python, -m, pipeline.testing.slow_worker]`; the variable then comes from the
daemon's environment, so only the daemon it is set for is slowed down.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np

from pipeline.models.prediction import FramePrediction, FramePredictor

log = logging.getLogger(__name__)

DELAY_ENV = "PIPELINE_WORKER_DELAY_S"
CRASH_ENV = "PIPELINE_WORKER_CRASH_AFTER"


def delay_from_env() -> float:
    """Seconds per frame from `PIPELINE_WORKER_DELAY_S`; 0 (with a warning) when it is not a number >= 0."""
    text = os.environ.get(DELAY_ENV, "").strip()
    try:
        delay = float(text) if text else 0.0
    except ValueError:
        delay = -1.0
    if not delay >= 0:  # also NaN
        log.warning("%s=%r is not a number of seconds >= 0; ignored", DELAY_ENV, text)
        return 0.0
    return delay


class SlowPredictor:
    """The real predictor, then a sleep of `delay_s` per frame."""

    def __init__(self, predictor: FramePredictor, delay_s: float) -> None:
        self.predictor, self.delay_s = predictor, delay_s

    def predict_batch(self, frames: np.ndarray) -> list[FramePrediction]:
        predictions = self.predictor.predict_batch(frames)
        time.sleep(self.delay_s * len(predictions))
        return predictions


class CrashingPredictor:
    """The real predictor, until `frames` frames are predicted: then the process dies without a word to the daemon."""

    def __init__(self, predictor: FramePredictor, frames: int) -> None:
        self.predictor, self.left = predictor, frames

    def predict_batch(self, frames: np.ndarray) -> list[FramePrediction]:
        if self.left <= 0:
            log.error("%s: this worker crashes on purpose", CRASH_ENV)
            os._exit(3)
        self.left -= len(frames)
        return self.predictor.predict_batch(frames)


def slowed(predictor: FramePredictor) -> FramePredictor:
    crash_after = os.environ.get(CRASH_ENV, "").strip()
    if crash_after.isdigit():
        predictor = CrashingPredictor(predictor, int(crash_after))
    delay_s = delay_from_env()
    if not delay_s:
        return predictor
    log.warning("%s: this worker sleeps %g s per frame on purpose", DELAY_ENV, delay_s)
    return SlowPredictor(predictor, delay_s)


def main(argv: list[str] | None = None) -> int:
    from pipeline import cli

    args = cli.build_parser().parse_args(["worker", *(sys.argv[1:] if argv is None else argv)])
    return cli.cmd_worker(args, wrap_predictor=slowed)


if __name__ == "__main__":
    raise SystemExit(main())
