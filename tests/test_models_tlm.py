"""The TLM: DiPID's full ResNet50-FPN state dict, the light backbone, painting instances."""

import numpy as np
import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from pipeline.config import ModelSettings, SSLMSettings, TLMSettings
from pipeline.models.card import WeightsError
from pipeline.models.joint import JointPredictor
from pipeline.models.tlm import build_tlm, light_card, paint_instances


def _dipid_state_dict() -> dict[str, torch.Tensor]:
    """What DiPID saved: torchvision's maskrcnn_resnet50_fpn with 2 classes (FrozenBatchNorm: no counters)."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_dipid_checkpoint_loads_and_runs(tmp_path) -> None:
    path = tmp_path / "tlm_dipid.pth"
    torch.save(_dipid_state_dict(), path)
    defaults = JointPredictor.from_settings(
        ModelSettings(tlm=TLMSettings(weights=path), sslm=SSLMSettings(enabled=False)))
    card = defaults.provenance()["tlm"]["settings"]
    assert (card["backbone"], card["min_size"], card["max_size"], card["score_threshold"]) == (
        "resnet50_fpn", 800, 1333, 0.4)
    # Config values override the card: run it at native size, low threshold, to keep the test fast.
    settings = ModelSettings(
        tlm=TLMSettings(weights=path, min_size=195, max_size=487, score_threshold=0.0),
        sslm=SSLMSettings(enabled=False))
    predictor = JointPredictor.from_settings(settings)
    assert predictor.tlm.transform.min_size == (195,)
    frame = np.random.default_rng(1).poisson(3, size=(195, 487)).astype(np.int32)
    prediction = predictor.predict_image(frame)
    assert prediction.tlm_labels.shape == (195, 487) and prediction.tlm_labels.dtype == np.uint16
    assert [d.instance_id for d in prediction.detections] == list(range(1, len(prediction.detections) + 1))
    assert not prediction.ssl_mask.any()


def test_dipid_checkpoint_with_batchnorm_counters_loads(tmp_path) -> None:
    path = tmp_path / "tlm_dipid_bn.pth"
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2).state_dict(), path)
    JointPredictor.from_settings(ModelSettings(tlm=TLMSettings(weights=path), sslm=SSLMSettings(enabled=False)))


def test_wrong_architecture_is_one_line(tmp_path) -> None:
    path = tmp_path / "light_as_dipid.pth"
    torch.save(build_tlm(light_card()).state_dict(), path)  # light weights without a card: DiPID defaults
    with pytest.raises(WeightsError) as error:
        JointPredictor.from_settings(ModelSettings(tlm=TLMSettings(weights=path), sslm=SSLMSettings(enabled=False)))
    assert "\n" not in str(error.value) and "light_as_dipid.pth" in str(error.value)
    # ...and with the right backbone named in the config it loads
    JointPredictor.from_settings(ModelSettings(
        tlm=TLMSettings(weights=path, backbone="resnet18_fpn", min_size=195, max_size=487, score_threshold=0.5),
        sslm=SSLMSettings(enabled=False)))


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown TLM backbone"):
        build_tlm(light_card(backbone="vgg"))


def test_paint_instances_best_score_wins() -> None:
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2, :2] = 0.9  # low score, overlaps the best one
    masks[1, 0, 1:3, 1:3] = 0.8
    output = {"scores": torch.tensor([0.3, 0.9]), "boxes": torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3]]).float(),
              "masks": masks}
    labels, detections = paint_instances(output, (4, 4))
    assert [(d.instance_id, d.score) for d in detections] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.3))]
    assert labels[1, 1] == 1 and labels[0, 0] == 2 and labels[3, 3] == 0
    assert labels.dtype == np.uint16


def test_proposals_and_detections_serve_crowded_frames_and_are_set_by_the_config() -> None:
    """The light TLM scores 200 proposals and keeps at most 100 detections per 195 x 487 frame (real crowded modules
    hold 20-80 spots: 50/16 capped them, tlm.py's table); the config overrides both, the effective values are
    recorded in the provenance, and DiPID's resnet50 keeps torchvision's own sizes unless told."""
    from pipeline.models.joint import load_tlm

    shipped, loaded = load_tlm(TLMSettings())
    assert shipped.rpn._post_nms_top_n["testing"] == 200 and shipped.roi_heads.detections_per_img == 100
    assert (loaded.card.proposals, loaded.card.detections) == (200, 100)  # what ran, though the shipped card sets neither
    sized, loaded = load_tlm(TLMSettings(proposals=30, detections=12))
    assert sized.rpn._post_nms_top_n["testing"] == 30 and sized.roi_heads.detections_per_img == 12
    assert (loaded.card.proposals, loaded.card.detections) == (30, 12)  # recorded in the store's provenance
    dipid = build_tlm(light_card(backbone="resnet50_fpn", min_size=195, max_size=487))
    assert dipid.rpn._post_nms_top_n["testing"] == 1000 and dipid.roi_heads.detections_per_img == 100
    with pytest.raises(ValueError):
        TLMSettings(detections=1000)  # more than a frame's 256 stored rows


def test_caps_grow_with_the_frame_area_up_to_the_stores_rows() -> None:
    model = build_tlm(light_card(proposals=200, detections=100))
    assert model.caps((195, 487)) == (500, 200, 100)
    assert model.caps((100, 100)) == (500, 200, 100)  # smaller frames keep them
    assert model.caps((619, 487)) == (1588, 635, 256)  # 3.17 modules of area; detections stop at the store's 256 rows
    assert build_tlm(light_card(proposals=50, detections=16)).caps((390, 487)) == (1000, 100, 32)


def test_every_frame_shape_gets_the_scale_a_100k_frame_gets() -> None:
    """torchvision's rule (shorter side to min_size, longer at most max_size) would shrink a 1065 x 1030 frame to
    201 x 195 for native-size weights; the scale is the one a 195 x 487 frame gets, for every shape."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    native = build_tlm(light_card()).eval().transform
    dipid = build_tlm(light_card(backbone="resnet50_fpn", min_size=800, max_size=1333)).eval().transform
    reference = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    module = torch.rand(3, 195, 487)
    torch.testing.assert_close(dipid.resize(module)[0], reference.resize(module)[0], rtol=0, atol=0)  # as before
    assert native.resize(module)[0] is module  # scale 1: not resampled at all
    for shape in ((619, 487), (1065, 1030), (40, 33)):
        image = torch.rand(3, *shape)
        assert native.resize(image)[0].shape[1:] == shape
        scale = min(800 / 195, 1333 / 487)
        assert dipid.resize(image)[0].shape[1:] == (int(shape[0] * scale), int(shape[1] * scale))


def test_masks_pasted_from_patches_are_torchvisions_pasted_masks() -> None:
    """`paint_instances` pastes the mask head's patches into their boxes; the labels equal torchvision's frame-sized
    paste (`paste_masks_in_image`) thresholded, pixel for pixel, on a frame with many overlapping detections."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from pipeline.models.preprocess import prepare
    from pipeline.simulator import synth

    torch.manual_seed(3)
    model = build_tlm(light_card(score_threshold=0.0, detections=100)).eval()
    frame = synth.training_sample(np.random.default_rng(5))[0]
    with torch.inference_mode():
        output = model([torch.from_numpy(prepare(frame)).expand(3, -1, -1)])[0]
    assert "masks" not in output and output["mask_patches"].shape[1:] == (1, 28, 28) and len(output["scores"]) >= 50
    pasted = dict(output, masks=paste_masks_in_image(output["mask_patches"], output["boxes"], frame.shape))
    del pasted["mask_patches"]
    labels, detections = paint_instances(output, frame.shape)
    expected, expected_detections = paint_instances(pasted, frame.shape)
    np.testing.assert_array_equal(labels, expected)
    assert detections == expected_detections and labels.max() > 20
