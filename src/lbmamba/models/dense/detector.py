"""Object detection and instance segmentation: Mask R-CNN and Cascade Mask R-CNN (ViTDet style) over
LBVim / Vim / uVim (or any timm model with `forward_intermediates`), and VMamba, as torchvision's
`GeneralizedRCNN` (transform -> backbone -> RPN -> RoI heads) with a `DetectionBackbone` (backbone.py,
the pyramids in feature_pyramid.py), torchvision's `RegionProposalNetwork` / `RPNHead` and
`CascadeRoIHeads` (rcnn_heads.py).

Facts the defaults follow (read from the reference configs):

* LBMamba (detection/configs/lbmamba/vitdet_cascade_mask-rcnn_bivim_tiny_norope_rms_lsj-300e.py): RPN
  with `num_convs=2`; Cascade Mask R-CNN with 3 stages (see rcnn_heads.py); fixed-size large-scale-jitter
  input at 1024.
* mmdetection's cascade base config (configs/_base_/models/cascade-mask-rcnn_r50_fpn.py): anchors of
  scale 8 at ratios 0.5 / 1 / 2 on strides 4..64; RPN 256 anchors at 50 % positives, IoU 0.7 / 0.3, NMS
  0.7 keeping 2000 (train) / 1000 (test); test score threshold 0.05, NMS 0.5, 100 detections.
* Mask R-CNN (`kind="mask_rcnn"`) is the same model with a one-stage RoI head.

Differences from the reference, all small: the RPN's box loss is torchvision's smooth L1 (beta 1/9)
where mmdet's base config uses L1; labels follow torchvision (0 is background, the classes are
1..num_classes); see rcnn_heads.py for the RoI heads'.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch.nn as nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from ._checks import check_choice, check_int
from .backbone import BACKBONE_NORMS, FEATURE_SOURCES, DetectionBackbone, dense_backbone
from .feature_pyramid import PYRAMID_NAMES, PYRAMID_STRIDES
from .rcnn_heads import CASCADE_BOX_STDS, CASCADE_IOU_THRESHOLDS, CASCADE_STAGE_WEIGHTS, CascadeRoIHeads, CascadeStage

__all__ = ["DETECTOR_KINDS", "Detector", "build_detector"]

DETECTOR_KINDS = ("cascade_mask_rcnn", "mask_rcnn")


class _FixedSizeTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that normalises and pads (to `size_divisible`) but never resizes: the
    data pipeline (large-scale jitter) already gives fixed-size squares."""

    def resize(self, image, target=None):
        return image, target


class Detector(GeneralizedRCNN):
    """torchvision's GeneralizedRCNN (transform -> backbone -> RPN -> RoI heads) with a
    `DetectionBackbone` and `CascadeRoIHeads`. Call as torchvision's detectors: `model(images, targets)`
    in training (images: list of (3, H, W) floats in [0, 1]; targets: dicts with `boxes` (x1, y1, x2, y2),
    `labels` 1..num_classes, `masks` (N, H, W) uint8) gives the loss dict; in eval `model(images)` gives
    per image {"boxes", "labels", "scores", "masks" (N, 1, H, W) probabilities}."""

    def __init__(self, backbone: DetectionBackbone, rpn: RegionProposalNetwork, roi_heads: CascadeRoIHeads,
                 transform: GeneralizedRCNNTransform, num_classes: int, kind: str):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = num_classes
        self.kind = kind

    def eager_outputs(self, losses, detections):
        return losses if self.training else detections

    @property
    def num_layers(self) -> int:
        """The backbone's depth (the layers it runs; the layer-wise lr decay of engine/optim.py counts them)."""
        return self.backbone.body.num_layers


def build_detector(
    backbone: Union[str, nn.Module] = "lbvim_tiny_patch16_224",
    num_classes: int = 80,
    *,
    kind: str = "cascade_mask_rcnn",
    img_size: int = 1024,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    feature_source: Optional[str] = None,
    backbone_norm: str = "rmsnorm",
    drop_path: float = 0.1,
    min_size: Optional[int] = None,
    max_size: Optional[int] = None,
    size_divisible: int = 32,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    out_channels: int = 256,
    head_conv_channels: int = 256,
    head_fc_channels: int = 1024,
    with_mask: bool = True,
    iou_thresholds: Optional[Sequence[float]] = None,
    stage_loss_weights: Optional[Sequence[float]] = None,
    box_stds: Optional[Sequence[Sequence[float]]] = None,
    rois_per_image: int = 512,
    positive_fraction: float = 0.25,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
) -> Detector:
    """Mask R-CNN or Cascade Mask R-CNN (LBMamba's ViTDet config) on a timm backbone.

    Args:
        backbone: a timm model name (LBVim / Vim / uVim, VMamba, or any timm model with
            forward_intermediates) or a built model.
        num_classes: object classes (labels 1..num_classes; 0 is background).
        kind: "cascade_mask_rcnn" (3 stages: IoU 0.5 / 0.6 / 0.7, weights 1 / 0.5 / 0.25, stds as mmdet's)
            or "mask_rcnn" (one stage: IoU 0.5, stds (0.1, 0.1, 0.2, 0.2)).
        img_size: the size the backbone's position embedding is built for (VisionMamba families).
        feature_source: "mixer" / "residual"; None = "mixer" where the backbone offers it, else "residual".
        backbone_norm: "rmsnorm" (LBMamba's detection config, rms_norm=True) or "layernorm"; VisionMamba only.
        min_size, max_size: None (default) = no resizing (fixed-size LSJ input; images only normalised
            and padded to `size_divisible`); else torchvision's resize to these sizes.
        out_channels, head_conv_channels, head_fc_channels: widths of the pyramid (256), the box and mask
            heads' convs (256) and the box head's fc (1024), as LBMamba's config; smaller for quick runs.
        iou_thresholds, stage_loss_weights, box_stds: override the stages (one entry per stage).
        rois_per_image, positive_fraction: each stage's RoI sampler.
        The rest: torchvision's RPN and post-processing settings, set to mmdet's cascade config.
    """
    check_choice("kind", kind, DETECTOR_KINDS)
    check_int("num_classes", num_classes)
    check_int("img_size", img_size)
    check_int("rois_per_image", rois_per_image)
    check_int("size_divisible", size_divisible)
    for name, value in (("out_channels", out_channels), ("head_conv_channels", head_conv_channels),
                        ("head_fc_channels", head_fc_channels)):
        check_int(name, value)
    check_choice("backbone_norm", backbone_norm, BACKBONE_NORMS)
    if feature_source is not None:
        check_choice("feature_source", feature_source, FEATURE_SOURCES)
    if not 0.0 < float(positive_fraction) <= 1.0:
        raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction!r}")
    if not 0.0 <= float(drop_path) < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    if (min_size is None) != (max_size is None):
        raise ValueError("give both min_size and max_size (torchvision's resize) or neither (no resizing)")

    # LBMamba's detection backbone: no class token, RMSNorm
    model = dense_backbone(backbone, drop_path, backbone_kwargs, {},
                           dict(img_size=img_size, norm_layer=backbone_norm, global_pool="", class_token=None))
    body = DetectionBackbone(model, feature_source=feature_source, out_channels=out_channels)

    n = 3 if kind == "cascade_mask_rcnn" else 1
    ious = tuple(iou_thresholds) if iou_thresholds is not None else CASCADE_IOU_THRESHOLDS[:n]
    weights = tuple(stage_loss_weights) if stage_loss_weights is not None else CASCADE_STAGE_WEIGHTS[:n]
    stds = tuple(box_stds) if box_stds is not None else CASCADE_BOX_STDS[:n]
    if not len(ious) == len(weights) == len(stds) or not ious:
        raise ValueError(f"iou_thresholds, stage_loss_weights and box_stds need one entry per stage, got "
                         f"{len(ious)}, {len(weights)} and {len(stds)}")
    if kind == "mask_rcnn" and len(ious) != 1:
        raise ValueError(f"kind='mask_rcnn' has one stage; got {len(ious)} (use kind='cascade_mask_rcnn')")

    anchor_generator = AnchorGenerator(tuple((8 * s,) for s in PYRAMID_STRIDES), ((0.5, 1.0, 2.0),) * 5)
    rpn = RegionProposalNetwork(
        anchor_generator, RPNHead(out_channels, 3, conv_depth=2), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
        pre_nms_top_n=dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
        nms_thresh=rpn_nms_thresh)
    stages = [CascadeStage(num_classes, t, sd, w, in_channels=out_channels, rois_per_image=rois_per_image,
                           positive_fraction=positive_fraction, with_mask=with_mask,
                           conv_channels=head_conv_channels, fc_channels=head_fc_channels)
              for t, sd, w in zip(ious, stds, weights)]
    names = list(PYRAMID_NAMES[:4])
    roi_heads = CascadeRoIHeads(
        stages, MultiScaleRoIAlign(names, 7, sampling_ratio=0),
        MultiScaleRoIAlign(names, 14, sampling_ratio=0) if with_mask else None,
        score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img)
    divisor = max(size_divisible, *body.size_divisor)
    if min_size is None:
        transform: GeneralizedRCNNTransform = _FixedSizeTransform(img_size, img_size, list(image_mean),
                                                                  list(image_std), size_divisible=divisor)
    else:
        transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std),
                                             size_divisible=divisor)
    return Detector(body, rpn, roi_heads, transform, num_classes, kind)
