"""The joint predictor: batch-invariance, disabled models, scans, volumes, overlays, provenance."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelSettings, SSLMSettings, TLMSettings
from pipeline.models.joint import JointPredictor
from pipeline.simulator import synth
from pipeline.testing.configs import write_untrained_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """Untrained light TLM and SSLM weights with cards (a low TLM threshold so it detects plenty)."""
    return write_untrained_weights(tmp_path_factory.mktemp("weights"), score_threshold=0.0, peak_channels=(0, 1))


@pytest.fixture(scope="module")
def predictor(weights) -> JointPredictor:
    return JointPredictor.from_settings(
        ModelSettings(tlm=TLMSettings(weights=weights["tlm"]), sslm=SSLMSettings(weights=weights["sslm"])))


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.stack([synth.training_sample(rng)[0] for _ in range(4)])


def test_batch_equals_single(predictor, frames) -> None:
    batched = predictor.predict_batch(frames)
    for frame, in_batch in zip(frames, batched):
        alone = predictor.predict_image(frame)
        assert np.array_equal(alone.tlm_labels, in_batch.tlm_labels)
        assert np.array_equal(alone.ssl_clusters, in_batch.ssl_clusters)
        assert np.array_equal(alone.ssl_mask, in_batch.ssl_mask)
        assert alone.detections == in_batch.detections
    assert any(p.detections for p in batched)  # the check compared real detections
    assert set(batched[0].timings) == {"preprocess", "tlm", "sslm"}


def test_padded_batches_give_a_frame_the_same_masks_alone_and_among_others(weights, frames) -> None:
    """models.model_batch: every model call holds exactly that many frames (blank ones pad it), so a frame alone, in a
    full batch, or among other neighbours gives the same masks, boxes and scores to the last bit (on CPU here; the GPU
    check is part of `pipeline bench --device cuda`)."""
    settings = ModelSettings(tlm=TLMSettings(weights=weights["tlm"]), sslm=SSLMSettings(weights=weights["sslm"]), model_batch=4)
    padded = JointPredictor.from_settings(settings)
    full = padded.predict_batch(frames)
    reordered = padded.predict_batch(frames[::-1])[::-1]
    three = padded.predict_batch(frames[:3])  # one padded with a blank frame
    for index, frame in enumerate(frames):
        alone = padded.predict_image(frame)  # padded with three blank frames
        for other in [full[index], reordered[index], *([three[index]] if index < 3 else [])]:
            assert np.array_equal(alone.tlm_labels, other.tlm_labels), index
            assert np.array_equal(alone.ssl_clusters, other.ssl_clusters), index
            assert np.array_equal(alone.ssl_mask, other.ssl_mask), index
            assert alone.detections == other.detections, index
    assert sum(len(p.detections) for p in full) > 4  # real detections were compared


def test_preprocessing_on_the_device_gives_the_same_predictions(weights, frames) -> None:
    """A GPU worker fixes dead pixels and normalises in torch on the device (pipeline.models.preprocess_torch); forced
    here on the CPU, it must give what NumPy's reference preprocessing gives, NaN and dead pixels included."""
    settings = ModelSettings(tlm=TLMSettings(weights=weights["tlm"]), sslm=SSLMSettings(weights=weights["sslm"]))
    reference = JointPredictor.from_settings(settings)
    on_device = JointPredictor.from_settings(settings)
    on_device.preprocess_on_device = True
    assert not reference.preprocess_on_device  # a CPU keeps NumPy's version
    damaged = frames.astype(np.float32)
    damaged[0, 5, 7], damaged[1, 0, 0], damaged[2, 194, 486] = np.nan, -2.0, np.inf
    for frame_set in (frames, damaged):
        for mine, theirs in zip(on_device.predict_batch(frame_set), reference.predict_batch(frame_set)):
            assert np.array_equal(mine.tlm_labels, theirs.tlm_labels)
            assert np.array_equal(mine.ssl_clusters, theirs.ssl_clusters) and np.array_equal(mine.ssl_mask, theirs.ssl_mask)
            assert mine.detections == theirs.detections


def test_disabled_models_give_zeros(weights, frames) -> None:
    only_sslm = JointPredictor.from_settings(
        ModelSettings(tlm=TLMSettings(enabled=False), sslm=SSLMSettings(weights=weights["sslm"])))
    prediction = only_sslm.predict_image(frames[0])
    assert prediction.tlm_labels.dtype == np.uint16 and not prediction.tlm_labels.any()
    assert prediction.detections == [] and (prediction.detections_capped, prediction.detection_cap) == (False, 0)
    nothing = JointPredictor.from_settings(
        ModelSettings(tlm=TLMSettings(enabled=False), sslm=SSLMSettings(enabled=False)))
    prediction = nothing.predict_image(frames[0])
    assert not prediction.ssl_clusters.any() and not prediction.ssl_mask.any()
    assert nothing.provenance()["tlm"] == {"enabled": False}


def test_predict_scan_batches_in_order(predictor, frames) -> None:
    scan = list(predictor.predict_scan(iter(frames), batch_size=3))
    assert len(scan) == 4
    assert np.array_equal(scan[3].ssl_clusters, predictor.predict_image(frames[3]).ssl_clusters)


def test_untrained_tlm_fills_its_cap_and_says_so(weights, frames) -> None:
    """The untrained TLM at threshold 0 returns as many detections as allowed: every frame is flagged, with its cap."""
    capped = JointPredictor.from_settings(ModelSettings(tlm=TLMSettings(weights=weights["tlm"], detections=5),
                                                       sslm=SSLMSettings(enabled=False)))
    for prediction in capped.predict_batch(frames):
        assert len(prediction.detections) == 5 and prediction.detections_capped and prediction.detection_cap == 5
    stacked = np.concatenate([frames[:2], frames[2:]], axis=1)  # 390 x 487: twice the area, twice the cap
    assert capped.predict_batch(stacked)[0].detection_cap == 10


def test_compile_volume_links_frames_in_3d() -> None:
    masks = np.zeros((3, 195, 487), dtype=np.uint8)
    masks[0, 10:12, 10:12] = 1
    masks[1, 12, 12] = 1  # diagonal neighbour of the previous frame's block: same peak
    masks[2, 100, 100] = 1  # elsewhere: another peak
    volume = JointPredictor.compile_volume(list(masks))
    assert volume.dtype == np.uint32
    assert volume[0, 10, 10] == volume[1, 12, 12] != volume[2, 100, 100]
    assert volume.max() == 2


def test_overlay_png(predictor, frames, tmp_path) -> None:
    prediction = predictor.predict_image(frames[0])
    for scale in ("log", "linear"):
        path = predictor.save_overlay(frames[0], prediction, tmp_path / f"overlay_{scale}.png", scale=scale)
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size[0] >= 487 and image.size[1] >= 195


def test_provenance_is_json(predictor, weights) -> None:
    provenance = json.loads(json.dumps(predictor.provenance()))
    assert provenance["tlm"]["weights"] == str(weights["tlm"])
    assert len(provenance["sslm"]["sha256"]) == 64
    assert provenance["tlm"]["settings"]["min_size"] == 195


def test_missing_default_weights_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(ValueError) as error:
        JointPredictor.from_settings(ModelSettings())
    assert "tlm.safetensors" in str(error.value) and "\n" not in str(error.value)


def test_bfloat16_precision_runs_both_models_and_is_recorded(weights, frames) -> None:

    settings = ModelSettings(precision="bfloat16", tlm=TLMSettings(weights=weights["tlm"]), sslm=SSLMSettings(weights=weights["sslm"]))
    fast = JointPredictor.from_settings(settings)
    exact = JointPredictor.from_settings(settings.model_copy(update={"precision": "float32"}))
    assert fast.provenance()["precision"] == "bfloat16" and exact.provenance()["precision"] == "float32"
    for low, full in zip(fast.predict_batch(frames[:2]), exact.predict_batch(frames[:2])):  # two frames: bfloat16 is slow where not native
        assert low.ssl_clusters.dtype == np.uint8 and low.tlm_labels.dtype == np.uint16
        assert all(np.isfinite(d.score) for d in low.detections)
        # the same network in another precision: most pixels land in the same cluster
        assert (low.ssl_clusters == full.ssl_clusters).mean() > 0.8
    with pytest.raises(ValueError, match="precision must be auto, float32 or bfloat16"):
        JointPredictor(device="cpu", precision="float16")  # type: ignore[arg-type]


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it() -> None:
    from pathlib import Path

    from pipeline.common.devices import resolve_precision

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = " avx512_bf16" in flags or " amx_bf16" in flags
    assert resolve_precision("auto", torch.device("cpu")) == ("bfloat16" if native else "float32")
    assert resolve_precision("float32", torch.device("cpu")) == "float32"
    # GPUs run these small models faster in float32 (measured on an H200), so auto never picks bfloat16 there
    assert resolve_precision("auto", torch.device("cuda")) == "float32"
    assert resolve_precision("bfloat16", torch.device("cuda")) == "bfloat16"
    assert JointPredictor(device="cpu", precision="auto").precision == ("bfloat16" if native else "float32")
