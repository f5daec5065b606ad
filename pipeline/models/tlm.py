"""TLM: torchvision Mask R-CNN with a 2-class box predictor and mask predictor (256 hidden), as DiPID.

Two backbones:
- "resnet50_fpn": DiPID's layout; loads a full 2-class `maskrcnn_resnet50_fpn` state dict
  (FrozenBatchNorm like the COCO-pretrained original, torchvision's default anchors and sampling).
- "resnet18_fpn": the light one we train from scratch at native size on CPU. Plain BatchNorm
  (FrozenBatchNorm without pretrained statistics would not normalise), smaller anchors with
  elongated aspect ratios for streaks, and fewer proposals/samples because a frame holds ~1-8 peaks.
Nothing is ever downloaded: every builder gets weights=None.
Frames are 1-channel: the normalised frame is repeated to 3 channels.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.models.card import ModelCard
from pipeline.models.prediction import Detection

BACKBONES = ("resnet50_fpn", "resnet18_fpn")
NUM_CLASSES = 2  # background, peak
LIGHT_CHANNELS = 128  # FPN and mask-head width of the light TLM: half of torchvision's, ~3x faster on CPU
# proposals the box head scores and detections kept per image at inference, when the card says nothing: a frame holds
# at most 8 peaks in the real labels (../shared/data), so the box head's cost (one 6272 -> 1024 -> 1024 MLP per proposal)
# is sized to that, not to COCO's 1000/100 (README Speed: the TLM's time and held-out figures at 200/50, 100/20, 50/16, 30/10)
LIGHT_PROPOSALS, LIGHT_DETECTIONS = 50, 16  # were 200, 50: TLM 270 -> 220 ms a frame on one core, held-out F1 0.929 -> 0.933
MASK_THRESHOLD = 0.5  # mask probability above which a pixel belongs to an instance
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def light_card(**changes: object) -> ModelCard:
    """The card of a from-scratch resnet18_fpn TLM at native size (before training fills the rest)."""
    card = ModelCard(
        architecture="tlm", backbone="resnet18_fpn", min_size=195, max_size=487,
        score_threshold=0.5, nms_iou=0.3, image_mean=0.2, image_std=0.2,
    )
    return card.replace(**changes)


def build_tlm(card: ModelCard) -> MaskRCNN:
    """An untrained Mask R-CNN described by `card` (backbone, input scale, threshold, NMS)."""
    if card.backbone not in BACKBONES:
        raise ValueError(f"unknown TLM backbone {card.backbone!r}: expected one of {', '.join(BACKBONES)}")
    mean = IMAGENET_MEAN if card.image_mean is None else [card.image_mean] * 3
    std = IMAGENET_STD if card.image_std is None else [card.image_std] * 3
    common = dict(
        min_size=card.min_size or 800, max_size=card.max_size or 1333, image_mean=mean, image_std=std,
        box_score_thresh=0.05 if card.score_threshold is None else card.score_threshold,
        box_nms_thresh=0.5 if card.nms_iou is None else card.nms_iou,
    )
    sizing = {name: value for name, value in (("rpn_post_nms_top_n_test", card.proposals), ("box_detections_per_img", card.detections))
              if value is not None}
    if card.backbone == "resnet50_fpn":
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
        )
        model = MaskRCNN(backbone, num_classes=91, **common, **sizing)
    else:
        backbone = _light_backbone()
        anchors = AnchorGenerator(
            sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.25, 0.5, 1.0, 2.0, 4.0),) * 5
        )
        model = MaskRCNN(
            backbone, num_classes=91, rpn_anchor_generator=anchors,
            rpn_head=_rpn_head(backbone.out_channels, anchors.num_anchors_per_location()[0]),
            mask_head=MaskRCNNHeads(backbone.out_channels, [LIGHT_CHANNELS] * 4, dilation=1),
            rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=500, box_batch_size_per_image=128, **common,
            **{"rpn_post_nms_top_n_test": LIGHT_PROPOSALS, "box_detections_per_img": LIGHT_DETECTIONS, **sizing},
        )
    # DiPID's heads: new 2-class predictors on the standard Mask R-CNN heads.
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, NUM_CLASSES)
    in_features_mask = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(in_features_mask, 256, NUM_CLASSES)
    return model


def _light_backbone() -> BackboneWithFPN:
    """ResNet18 body (all layers trainable, BatchNorm) with a 128-channel FPN over strides 4..32 (+ pool)."""
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    return BackboneWithFPN(
        body, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512], out_channels=LIGHT_CHANNELS, extra_blocks=LastLevelMaxPool(),
    )


def _rpn_head(channels: int, anchors: int) -> nn.Module:
    from torchvision.models.detection.rpn import RPNHead

    return RPNHead(channels, anchors)


def to_images(inputs: torch.Tensor) -> list[torch.Tensor]:
    """(B, H, W) normalised frames -> list of (3, H, W) images, the 1 channel repeated."""
    return [frame.unsqueeze(0).expand(3, -1, -1) for frame in inputs]


def paint_instances(output: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[np.ndarray, list[Detection]]:
    """One frame's Mask R-CNN output -> (uint16 instance labels, detections).

    Instance ids follow the score order (1 = best); instances are painted from the lowest to the
    highest score so that where masks overlap the best one wins.
    """
    scores = output["scores"].detach().cpu().numpy()
    boxes = output["boxes"].detach().cpu().numpy()
    masks = output["masks"].detach().cpu().numpy()[:, 0] > MASK_THRESHOLD if len(scores) else None
    order = np.argsort(-scores, kind="stable")
    labels = np.zeros(shape, dtype=np.uint16)
    detections: list[Detection] = []
    for rank, index in enumerate(order, start=1):
        box = cast(tuple[float, float, float, float], tuple(float(v) for v in boxes[index]))  # boxes are (N, 4)
        detections.append(Detection(box=box, score=float(scores[index]), instance_id=rank))
    if masks is not None:  # None only when there are no detections, and then there is nothing to paint
        for rank in range(len(order), 0, -1):
            labels[masks[order[rank - 1]]] = rank
    return labels, detections
