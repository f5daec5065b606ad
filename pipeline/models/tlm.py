"""TLM: torchvision Mask R-CNN with a 2-class box predictor and mask predictor (256 hidden), as DiPID.

Two backbones:
- "resnet50_fpn": DiPID's layout; loads a full 2-class `maskrcnn_resnet50_fpn` state dict
  (FrozenBatchNorm like the COCO-pretrained original, torchvision's default anchors and sampling).
- "resnet18_fpn": the light one we train from scratch at native size on CPU. Plain BatchNorm
  (FrozenBatchNorm without pretrained statistics would not normalise), smaller anchors with
  elongated aspect ratios for streaks, and fewer proposals/samples because a frame holds ~1-8 peaks.
Nothing is ever downloaded: every builder gets weights=None.
Frames are 1-channel: the normalised frame is repeated to 3 channels.

Frames of any shape (a Pilatus 300K's 619 x 487, an Eiger's 1065 x 1030) run at the pixel scale the
weights were trained at: the card's min_size/max_size give the scale torchvision's transform gives a
195 x 487 frame, and every frame gets that scale (`FrameScaleTransform`; torchvision's own rule would
shrink a 1065 x 1030 frame to 201 x 195 for native-size weights). The per-frame caps (proposals,
detections) are per 195 x 487 of frame area: a larger frame gets proportionally more (`FrameMaskRCNN`), up to
the store's 256 detection rows a frame.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.common.detector import FRAME_SHAPE
from pipeline.models.card import ModelCard
from pipeline.models.prediction import Detection
from pipeline.store.schema import MAX_DETECTIONS_PER_FRAME

BACKBONES = ("resnet50_fpn", "resnet18_fpn")
NUM_CLASSES = 2  # background, peak
LIGHT_CHANNELS = 128  # FPN and mask-head width of the light TLM: half of torchvision's, ~3x faster on CPU
# proposals the box head scores and detections kept per 195 x 487 of frame, when the card says nothing. Real crowded
# frames decide (issue 26: thaumatin on a Pilatus, 22-81 spots a module; scripts/tlm_caps_bench.py, one core, float32):
#   proposals/detections   real modules: spots covered, frames at cap, ms   simulated held-out: F1, ms
#   50/16 (the old default)              26 %, 4 of 8, 143 ms                       0.942, 113 ms
#   200/100 (this default)               42 %, 0 of 8, 192 ms                       0.942, 142 ms
#   500/100                              50 %, 0 of 8, 237 ms                       0.934, 188 ms
#   1000/100 (torchvision's)             52 %, 0 of 8, 305 ms                       0.934, 252 ms
# 200 proposals find 2.6x the spots 50 did where the cap bit (16 -> 29 a module) for +29 ms a simulated frame; more
# proposals add a few weak spots for much more time. The box head's cost is one 6272 -> 1024 -> 1024 MLP per proposal.
# 100 detections are never reached on a module at the shipped threshold (at most 37 even at 1000 proposals) and cost
# nothing where there are fewer peaks (the mask head runs per detection kept).
LIGHT_PROPOSALS, LIGHT_DETECTIONS = 200, 100
MASK_THRESHOLD = 0.5  # mask probability above which a pixel belongs to an instance
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class FrameScaleTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with one pixel scale for every frame shape.

    The scale is what torchvision's rule gives a 195 x 487 frame (the frame the weights were made for):
    min(min_size / 195, max_size / 487), computed the same way, so 195 x 487 frames see exactly what they saw
    before; at scale 1 (native-size weights) a frame is not resampled at all.
    """

    def __init__(self, min_size: int, max_size: int, image_mean: list[float], image_std: list[float]) -> None:
        super().__init__(min_size, max_size, image_mean, image_std)
        self.scale = min(min_size / min(FRAME_SHAPE), max_size / max(FRAME_SHAPE))

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.scale == 1.0:
            return image, target
        height, width = image.shape[-2:]
        image = F.interpolate(image[None], scale_factor=self.scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if target is None:
            return image, target
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), scale_factor=self.scale,
                                            recompute_scale_factor=True)[:, 0].byte()
        target["boxes"] = resize_boxes(target["boxes"], (height, width), (image.shape[-2], image.shape[-1]))
        return image, target

    def postprocess(self, result: list[dict[str, torch.Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Boxes back to frame pixels; masks stay the head's small patches (`mask_patches`, N x 1 x 28 x 28).

        torchvision pastes every mask into a frame-sized float image (N x H x W: 825 MB for 188 spots on a
        1065 x 1030 frame, and 1.7 s); `paint_instances` pastes each patch into its box only, the same pixels.
        """
        if self.training:
            return result
        for prediction, size, original in zip(result, image_shapes, original_image_sizes):
            prediction["boxes"] = resize_boxes(prediction["boxes"], size, original)
            if "masks" in prediction:
                prediction["mask_patches"] = prediction.pop("masks")
        return result


class FrameMaskRCNN(MaskRCNN):
    """Mask R-CNN whose inference caps (proposals before and after NMS, detections) are per 195 x 487 of frame area.

    Why: a cap sized for a 100K frame would silently cut a crowded frame four or eleven times larger; scaled by
    area, the cost per pixel and the density of spots it can report stay the same. Frames of 195 x 487 or
    smaller get the caps as given; detections never exceed MAX_DETECTIONS_PER_FRAME, the rows the store keeps
    a frame. Training is unchanged. `detection_cap(shape)` says what a frame gets.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        old = cast(GeneralizedRCNNTransform, self.get_submodule("transform"))
        self.transform = FrameScaleTransform(old.min_size[-1], old.max_size, old.image_mean, old.image_std)
        self.reference_caps = (self.rpn._pre_nms_top_n["testing"], self.rpn._post_nms_top_n["testing"],
                               self.roi_heads.detections_per_img)

    def caps(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(proposals per level before NMS, proposals after NMS, detections) for a frame of `shape` (..., H, W)."""
        factor = max(1.0, shape[-2] * shape[-1] / (FRAME_SHAPE[0] * FRAME_SHAPE[1]))
        pre, post, detections = (math.ceil(cap * factor) for cap in self.reference_caps)
        return pre, post, min(detections, MAX_DETECTIONS_PER_FRAME)

    def detection_cap(self, shape: tuple[int, ...]) -> int:
        """At most this many detections come back for a frame of `shape`."""
        return self.caps(shape)[2]

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if not self.training and images:
            largest = max((image.shape for image in images), key=lambda shape: shape[-2] * shape[-1])
            pre, post, detections = self.caps(tuple(largest))
            self.rpn._pre_nms_top_n["testing"], self.rpn._post_nms_top_n["testing"] = pre, post
            self.roi_heads.detections_per_img = detections
        return super().forward(images, targets)


def light_card(**changes: object) -> ModelCard:
    """The card of a from-scratch resnet18_fpn TLM at native size (before training fills the rest)."""
    card = ModelCard(
        architecture="tlm", backbone="resnet18_fpn", min_size=195, max_size=487,
        score_threshold=0.5, nms_iou=0.3, image_mean=0.2, image_std=0.2,
    )
    return card.replace(**changes)


def build_tlm(card: ModelCard) -> FrameMaskRCNN:
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
        model = FrameMaskRCNN(backbone, num_classes=91, **common, **sizing)
    else:
        backbone = _light_backbone()
        anchors = AnchorGenerator(
            sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.25, 0.5, 1.0, 2.0, 4.0),) * 5
        )
        model = FrameMaskRCNN(
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


def detection_cap(model: nn.Module, shape: tuple[int, ...]) -> int:
    """How many detections `model` returns at most for a frame of `shape` (a plain torchvision model: its fixed cap)."""
    if isinstance(model, FrameMaskRCNN):
        return model.detection_cap(shape)
    return int(cast(Any, model).roi_heads.detections_per_img)


def to_images(inputs: torch.Tensor) -> list[torch.Tensor]:
    """(B, H, W) normalised frames -> list of (3, H, W) images, the 1 channel repeated."""
    return [frame.unsqueeze(0).expand(3, -1, -1) for frame in inputs]


def paint_instances(output: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[np.ndarray, list[Detection]]:
    """One frame's Mask R-CNN output -> (uint16 instance labels, detections).

    Instance ids follow the score order (1 = best); instances are painted from the lowest to the
    highest score so that where masks overlap the best one wins. Masks come either frame-sized
    (`masks`, a plain torchvision model) or as the mask head's patches (`mask_patches`, `FrameScaleTransform`),
    pasted into their boxes as torchvision's `paste_masks_in_image` does (1 pixel of padding, bilinear).
    """
    scores = output["scores"].detach().cpu().numpy()
    boxes = output["boxes"].detach().cpu()
    order = np.argsort(-scores, kind="stable")
    labels = np.zeros(shape, dtype=np.uint16)
    detections: list[Detection] = []
    for rank, index in enumerate(order, start=1):
        box = cast(tuple[float, float, float, float], tuple(float(v) for v in boxes[index]))  # boxes are (N, 4)
        detections.append(Detection(box=box, score=float(scores[index]), instance_id=rank))
    if not len(scores):
        return labels, detections
    if "mask_patches" in output:
        _paint_patches(labels, output["mask_patches"].detach().cpu().float(), boxes.float(), order)
        return labels, detections
    masks = output["masks"].detach().cpu().numpy()[:, 0] > MASK_THRESHOLD
    for rank in range(len(order), 0, -1):
        labels[masks[order[rank - 1]]] = rank
    return labels, detections


def _paint_patches(labels: np.ndarray, patches: torch.Tensor, boxes: torch.Tensor, order: np.ndarray) -> None:
    """Paint (N, 1, M, M) mask probabilities into `labels` by box, lowest score first; ids = rank in `order`."""
    padded, scale = expand_masks(patches, padding=1)
    pixel_boxes = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()
    height, width = labels.shape
    for rank in range(len(order), 0, -1):
        index = int(order[rank - 1])
        x0, y0, x1, y1 = pixel_boxes[index]
        box_width, box_height = max(int(x1 - x0 + 1), 1), max(int(y1 - y0 + 1), 1)
        top, bottom, left, right = max(y0, 0), min(y1 + 1, height), max(x0, 0), min(x1 + 1, width)
        if top >= bottom or left >= right:
            continue
        mask = F.interpolate(padded[index:index + 1], size=(box_height, box_width), mode="bilinear", align_corners=False)[0, 0]
        inside = mask[top - y0:bottom - y0, left - x0:right - x0].numpy() > MASK_THRESHOLD
        labels[top:bottom, left:right][inside] = rank
