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


def _peaks_prediction(shape=(195, 487), peaks=((10, 20), (100, 400), (194, 486))) -> FramePrediction:
    """A frame's masks as the models make them: a few small peaks, the rest background."""
    tlm, clusters, mask = np.zeros(shape, np.uint16), np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for number, (y, x) in enumerate(peaks, start=1):
        tlm[max(0, y - 2):y + 2, max(0, x - 2):x + 2] = number + 300  # ids above 255: the uint16 values survive
        clusters[max(0, y - 1):y + 1, max(0, x - 1):x + 1] = 7
        mask[max(0, y - 1):y + 1, max(0, x - 1):x + 1] = 1
    return FramePrediction(tlm_labels=tlm, detections=[], ssl_clusters=clusters, ssl_mask=mask)


@pytest.mark.parametrize("peaks", [(), ((10, 20),), ((0, 0), (100, 400), (194, 486))])
def test_sparse_masks_travel_as_their_set_pixels_and_come_back_equal(peaks):
    prediction = _peaks_prediction(peaks=peaks)
    parts = wire.encode_result(wire.FrameResult(task=3, scan="s", frame=1, worker="w", prediction=prediction))
    header = json.loads(parts[1])
    set_pixels = [int(np.count_nonzero(a)) for a in (prediction.tlm_labels, prediction.ssl_clusters, prediction.ssl_mask)]
    assert header["sparse"] == set_pixels
    assert [len(part) for part in parts[2:]] == [n * 6 for n in set_pixels[:1]] + [n * 5 for n in set_pixels[1:]]
    assert sum(len(part) for part in parts) < 2_000  # an empty or nearly empty frame's answer: bytes, not 380 KB
    decoded = wire.decode_result([bytes(part) for part in parts]).prediction
    for sent, received in ((prediction.tlm_labels, decoded.tlm_labels), (prediction.ssl_clusters, decoded.ssl_clusters),
                           (prediction.ssl_mask, decoded.ssl_mask)):
        assert received.dtype == sent.dtype and received.shape == sent.shape
        np.testing.assert_array_equal(received, sent)


def test_crowded_masks_travel_dense():
    prediction = _prediction()
    parts = wire.encode_result(wire.FrameResult(task=3, scan="s", frame=1, worker="w", prediction=prediction))
    assert json.loads(parts[1])["sparse"] == [None, None, None]
    assert [len(part) for part in parts[2:]] == [195 * 487 * 2, 195 * 487, 195 * 487]


def test_a_result_without_sparse_counts_is_read_dense():
    """Workers from before sparse masks send no `sparse` field: their dense masks are still read."""
    prediction = _peaks_prediction()
    header = {"task": 1, "scan": "s", "frame": 0, "worker": "old", "shape": [195, 487], "detections": [], "timings": {}}
    parts = [wire.RESULT, json.dumps(header).encode(), prediction.tlm_labels.tobytes(), prediction.ssl_clusters.tobytes(),
             prediction.ssl_mask.tobytes()]
    np.testing.assert_array_equal(wire.decode_result(parts).prediction.tlm_labels, prediction.tlm_labels)


def _sparse_parts(indices, values, count=None, **header_changes):
    """A result for a 4 x 5 frame whose tlm labels are sent as these set pixels; the other masks empty."""
    header = {"task": 1, "scan": "s", "frame": 0, "worker": "w", "shape": [4, 5], "detections": [], "timings": {},
              "sparse": [len(indices) if count is None else count, 0, 0], **header_changes}
    payload = np.asarray(indices, np.uint32).tobytes() + np.asarray(values, np.uint16).tobytes()
    return [wire.RESULT, json.dumps(header).encode(), payload, b"", b""]


@pytest.mark.parametrize(
    "parts, reason",
    [
        (_sparse_parts([20], [1]), "below 20"),  # one past the last pixel: would write outside the frame
        (_sparse_parts([2**32 - 1], [1]), "below 20"),
        (_sparse_parts([3, 3], [1, 2]), "strictly"),  # the same pixel twice
        (_sparse_parts([5, 2], [1, 2]), "strictly"),
        (_sparse_parts([1, 2], [1, 2], count=3), "bytes"),  # more claimed than sent
        (_sparse_parts([1, 2], [1, 2], count=1), "bytes"),
        (_sparse_parts([], [], count=-1), "sparse count"),
        (_sparse_parts([], [], count=21), "sparse count"),  # more set pixels than the frame has
        (_sparse_parts([], [], count=True), "sparse count"),
        (_sparse_parts([], [], count="0"), "sparse count"),
        (_sparse_parts([], [], sparse=[0, 0]), "3 counts"),
        (_sparse_parts([], [], sparse={"a": 0}), "3 counts"),
    ],
)
def test_malformed_sparse_masks_are_refused_with_a_reason(parts, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_result(parts)


def test_credit_is_bounded():
    assert wire.credit_of({"n": 4}, limit=8) == 4
    for body in ({"n": 9}, {"n": -1}, {"n": "4"}, {}):
        with pytest.raises(wire.WireError):
            wire.credit_of(body, limit=8)
