"""Real Pilatus frames (thaumatin, dials/data-files) through the shipped models: crowded frames, caps, other shapes.

The frames have no outlines; detections are checked against a classical spot finder (`reference_spots`) and
against the same module run alone. Data: pipeline/models/data/ and tests/data/real_frames/ (see their README).
"""

from pathlib import Path

import numpy as np
import pytest

from pipeline.common.detector import FRAME_SHAPE
from pipeline.config import ModelSettings
from pipeline.models.joint import JointPredictor
from pipeline.models.real_frames import REAL_MODULES, instances_on_spots, load_frames, reference_spots, spots_covered

DATA = Path(__file__).parent / "data" / "real_frames"
CROWDED = [0, 1, 2, 3]  # 59-81 reference spots each
BLANK = 7  # a frame past the crystal: background only


def _predictor(**tlm: object) -> JointPredictor:
    return JointPredictor.from_settings(ModelSettings.model_validate({"precision": "float32", "tlm": tlm}))


@pytest.fixture(scope="module")
def modules() -> np.ndarray:
    return load_frames(REAL_MODULES)[0]


@pytest.fixture(scope="module")
def predictor() -> JointPredictor:
    """The shipped weights with the shipped defaults."""
    return _predictor()


@pytest.fixture(scope="module")
def module_predictions(predictor, modules) -> list:
    return predictor.predict_batch(modules)


def test_shipped_modules_are_what_the_readme_says(modules) -> None:
    frames, sources = load_frames(REAL_MODULES)
    assert frames.shape == (8, *FRAME_SHAPE) and frames.dtype == np.int32
    assert len(sources) == 8 and all("thau_3_2_" in s for s in sources)
    spots = [int(reference_spots(m).max()) for m in modules]
    assert all(s >= 55 for s in (spots[i] for i in CROWDED)) and spots[BLANK] == 0, spots
    assert (modules < 0).sum() > 0  # real dead pixels (-2) are in the data


def test_crowded_real_modules_are_not_capped(module_predictions, modules) -> None:
    """Issue 26: the TLM returned exactly 16 detections on every crowded module, silently."""
    for index in CROWDED:
        prediction = module_predictions[index]
        spots = reference_spots(modules[index])
        assert len(prediction.detections) > 16, (index, len(prediction.detections))
        assert not prediction.detections_capped
        # what it finds are real spots: nearly every instance lies on one, and it covers a good part of them
        assert instances_on_spots(prediction.tlm_labels, spots) >= 0.9 * len(prediction.detections)
        assert spots_covered(spots, prediction.tlm_labels) >= 0.3 * spots.max()
    blank = module_predictions[BLANK]
    assert blank.detections == [] and not blank.detections_capped


def test_a_frame_at_the_detection_cap_says_so(modules) -> None:
    predictions = _predictor(detections=8).predict_batch(modules[[*CROWDED, BLANK]])
    for prediction in predictions[:-1]:
        assert len(prediction.detections) == 8 and prediction.detections_capped
    assert predictions[-1].detections == [] and not predictions[-1].detections_capped


def test_pilatus_300k_frame_runs_at_native_scale(predictor, modules, module_predictions) -> None:
    """619 x 487 (3 modules stacked with their 17-row gaps): not shrunk to 195 rows, spots found as on a module."""
    frame = load_frames(DATA / "pilatus_300k.npz")[0][0]
    assert frame.shape == (619, 487)
    np.testing.assert_array_equal(frame[212:407], modules[3])  # its middle module is shipped module 3
    assert (frame[195:212] == -1).all()  # the gap
    prediction = predictor.predict_image(frame)
    for array, dtype in ((prediction.tlm_labels, np.uint16), (prediction.ssl_clusters, np.uint8), (prediction.ssl_mask, np.uint8)):
        assert array.shape == (619, 487) and array.dtype == dtype
    spots = reference_spots(frame)
    assert spots.max() > 150
    assert len(prediction.detections) > 60 and not prediction.detections_capped
    assert instances_on_spots(prediction.tlm_labels, spots) >= 0.9 * len(prediction.detections)
    widths = [d.box[2] - d.box[0] for d in prediction.detections]
    assert np.median(widths) < 20  # Bragg spots are a few pixels wide, at the scale of a module
    # the middle module finds about what it finds alone
    middle = [d for d in prediction.detections if 212 <= (d.box[1] + d.box[3]) / 2 < 407]
    alone = len(module_predictions[3].detections)
    assert abs(len(middle) - alone) <= 0.25 * alone, (len(middle), alone)
    assert int(prediction.ssl_mask[212:407].sum()) == pytest.approx(int(module_predictions[3].ssl_mask.sum()), rel=0.05)


def test_eiger_1m_shaped_frame_runs_at_native_scale_with_caps_for_its_area(predictor) -> None:
    """1065 x 1030: about 11.5 modules of area and ~450 spots; the caps grow with the frame's area."""
    frame = load_frames(DATA / "eiger_1m_shape.npz")[0][0]
    assert frame.shape == (1065, 1030)
    prediction = predictor.predict_image(frame)
    for array in (prediction.tlm_labels, prediction.ssl_clusters, prediction.ssl_mask):
        assert array.shape == (1065, 1030)
    spots = reference_spots(frame)
    assert spots.max() > 300
    assert len(prediction.detections) > 150 and not prediction.detections_capped  # a fixed cap of 100 would cut
    assert instances_on_spots(prediction.tlm_labels, spots) >= 0.9 * len(prediction.detections)
    assert np.median([d.box[2] - d.box[0] for d in prediction.detections]) < 20
    assert prediction.tlm_labels.max() == len(prediction.detections)
    assert prediction.ssl_mask[(frame == -1)].mean() < 0.01  # module gaps (no pixels) are not peaks


def test_bad_frames_file_is_one_line(tmp_path) -> None:
    for name, content in (("garbage.npz", None), ("noframes.npz", {"other": np.zeros(3)}),
                          ("flat.npz", {"frames": np.zeros(5)}), ("objects.npz", {"frames": np.array([{}], dtype=object)})):
        path = tmp_path / name
        if content is None:
            path.write_bytes(b"not a zip")
        else:
            np.savez(path, **content)
        with pytest.raises(ValueError) as error:
            load_frames(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
