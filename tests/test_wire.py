"""Messages encode and decode losslessly, and anything malformed is refused with a reason."""

import json

import numpy as np
import pytest

from pipeline.live import wire
from pipeline.models.prediction import Detection, FramePrediction


def _prediction(shape=(195, 487)) -> FramePrediction:
    rng = np.random.default_rng(1)
    return FramePrediction(
        tlm_labels=rng.integers(0, 5, shape).astype(np.uint16),
        detections=[Detection(box=(1.0, 2.0, 30.5, 40.0), score=0.9, instance_id=1)],
        ssl_clusters=rng.integers(0, 100, shape).astype(np.uint8),
        ssl_mask=rng.integers(0, 2, shape).astype(np.uint8),
        timings={"tlm": 0.1},
    )


def test_frame_round_trip_keeps_every_value():
    data = np.random.default_rng(0).integers(-2, 1_000_000, (195, 487)).astype(np.int32)
    decoded = wire.decode_frame(wire.encode_frame(wire.FrameTask(task=7, scan="/d/s.nxs", frame=3, data=data)))
    assert (decoded.task, decoded.scan, decoded.frame) == (7, "/d/s.nxs", 3)
    assert decoded.data.dtype == np.int32
    np.testing.assert_array_equal(decoded.data, data)


def test_result_round_trip_keeps_every_value():
    prediction = _prediction()
    parts = wire.encode_result(wire.FrameResult(task=9, scan="s", frame=4, worker="w", prediction=prediction))
    decoded = wire.decode_result(parts)
    assert (decoded.task, decoded.frame, decoded.worker) == (9, 4, "w")
    np.testing.assert_array_equal(decoded.prediction.tlm_labels, prediction.tlm_labels)
    np.testing.assert_array_equal(decoded.prediction.ssl_clusters, prediction.ssl_clusters)
    np.testing.assert_array_equal(decoded.prediction.ssl_mask, prediction.ssl_mask)
    assert decoded.prediction.detections == prediction.detections
    assert decoded.prediction.timings == {"tlm": 0.1}


def _frame_parts(**header_changes):
    header = {"task": 1, "scan": "s", "frame": 0, "dtype": "int32", "shape": [4, 5], **header_changes}
    return [wire.FRAME, json.dumps(header).encode(), np.zeros((4, 5), np.int32).tobytes()]


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([wire.FRAME], "3 parts"),
        ([wire.FRAME, b"{not json", b""], "not valid JSON"),
        ([wire.FRAME, b"[1, 2]", b""], "not an object"),
        (_frame_parts(shape=[4, 6]), "bytes"),
        (_frame_parts(shape=[100000, 100000]), "shape"),
        (_frame_parts(shape=[4]), "shape"),
        (_frame_parts(dtype="object"), "dtype"),
        (_frame_parts(task="1"), "task"),
        (_frame_parts(frame=True), "frame"),
        ([wire.FRAME, b" " * (wire.MAX_HEADER_BYTES + 1), b""], "exceeds"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(parts, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_frame(parts)


def test_malformed_results_are_refused():
    good = wire.encode_result(wire.FrameResult(task=1, scan="s", frame=0, worker="w", prediction=_prediction((4, 5))))
    header = json.loads(good[1])
    for change, reason in [({"detections": [[1, 2, 3]]}, "detection"), ({"detections": [[0, 0, 1, 1, 0.5, 0]]}, "detection"),
                           ({"timings": {"a": "slow"}}, "timings"), ({"shape": [5, 4, 1]}, "shape")]:
        parts = [good[0], json.dumps({**header, **change}).encode(), *good[2:]]
        with pytest.raises(wire.WireError, match=reason):
            wire.decode_result(parts)
    with pytest.raises(wire.WireError, match="bytes"):
        wire.decode_result([*good[:2], good[2][:-2], *good[3:]])


def test_credit_is_bounded():
    assert wire.credit_of({"n": 4}, limit=8) == 4
    for body in ({"n": 9}, {"n": -1}, {"n": "4"}, {}):
        with pytest.raises(wire.WireError):
            wire.credit_of(body, limit=8)
