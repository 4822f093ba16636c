"""Object detection and instance segmentation: Mask R-CNN and Cascade Mask R-CNN (ViTDet style) over
LBVim / Vim / uVim (or any timm model with `forward_intermediates`), and VMamba, on torchvision's
detection package (`GeneralizedRCNN`, `RegionProposalNetwork`, `RPNHead`, `MultiScaleRoIAlign`,
`RoIHeads`, `Matcher`, `BalancedPositiveNegativeSampler`, `BoxCoder`, `maskrcnn_loss`).

Facts the defaults follow (read from the reference configs):

* LBMamba (detection/configs/lbmamba/vitdet_cascade_mask-rcnn_bivim_tiny_norope_rms_lsj-300e.py,
  detection/model.py): backbone BiVim-T with RMSNorm, no class token, drop path 0.1, img_size 1024,
  out_indices [23]: the last layer's mixer output (`hidden_states`) in image token order through one
  LayerNorm `outnorm_0`; neck ViTDet `SimpleFPN` (backbone_channel 192, in_channels [48, 96, 192, 192],
  256 out, num_outs 5, LN2d); RPN with `num_convs=2`; `CascadeRoIHead` with 3 stages, stage loss
  weights [1, 0.5, 0.25], RoIAlign 7 (boxes) / 14 (masks), sampling_ratio 0, featmap strides
  [4, 8, 16, 32]; `Shared4Conv1FCBBoxHead` (256-channel convs, fc 1024, LN2d), class-specific
  regression, `DeltaXYWHBBoxCoder` stds (0.1, 0.1, 0.2, 0.2) / (0.05, 0.05, 0.1, 0.1) /
  (0.033, 0.033, 0.067, 0.067), CE class loss, L1 box loss; `FCNMaskHead` 4 convs with LN2d.
* mmdetection (projects/ViTDet/vitdet/simple_fpn.py): fpn1 = ConvTranspose2d(C, C/2, 2, 2), LN2d, GELU,
  ConvTranspose2d(C/2, C/4, 2, 2); fpn2 = ConvTranspose2d(C, C/2, 2, 2); fpn3 = identity; fpn4 =
  MaxPool2d(2); per level a 1x1 and a 3x3 ConvModule with the norm and no activation; the 5th level is
  `max_pool2d(outs[-1], 1, stride=2)`.
* mmdetection's cascade base config (configs/_base_/models/cascade-mask-rcnn_r50_fpn.py): per stage
  an assigner with pos = neg = min_pos IoU 0.5 / 0.6 / 0.7 (no low-quality matches), a random sampler of
  512 RoIs with 25 % positives and the ground truth added; anchors of scale 8 at ratios 0.5 / 1 / 2 on
  strides 4..64; RPN 256 anchors at 50 % positives, IoU 0.7 / 0.3, NMS 0.7 keeping 2000 (train) / 1000
  (test); test score threshold 0.05, NMS 0.5, 100 detections; mask size 28.
* mmdetection's CascadeRoIHead (mmdet/models/roi_heads/cascade_roi_head.py): in training each stage's
  losses are multiplied by its weight, and the sampled RoIs are refined by that stage's regression (the
  RoI's target class, the argmax foreground class for negatives), detached, and the ground-truth RoIs
  removed before the next stage; at test time the stages' class logits are averaged (softmax after the
  average), each stage's RoIs refined with its own argmax class, the last stage's regression gives the
  boxes, and the mask probabilities are the average of every stage's mask sigmoid.
* Mask R-CNN (`kind="mask_rcnn"`) is the same RoI head with one stage (IoU 0.5, stds (0.1, 0.1, 0.2, 0.2),
  L1 box loss as mmdet's mask-rcnn base config) and the same ViTDet heads.

Differences from the reference, all small: torchvision's RoIAlign here is `aligned=False`
(`MultiScaleRoIAlign` does not expose it; mmcv's is `aligned=True`); the RPN's box loss is torchvision's
smooth L1 (beta 1/9) where mmdet's base config uses L1; labels follow torchvision (0 is background, the
classes are 1..num_classes).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from .segmentor import (
    BACKBONE_NORMS,
    FEATURE_SOURCES,
    BackboneAdapter,
    BackboneLoadReport,
    _check_choice,
    _check_int,
    _read,
    dense_backbone,
    load_adapter_weights,
    load_whole_weights,
)

__all__ = [
    "DETECTOR_KINDS",
    "CASCADE_IOU_THRESHOLDS",
    "CASCADE_STAGE_WEIGHTS",
    "CASCADE_BOX_STDS",
    "stds_to_weights",
    "SimpleFeaturePyramid",
    "HierarchicalFeaturePyramid",
    "DetectionBackbone",
    "CascadeStage",
    "CascadeRoIHeads",
    "Detector",
    "build_detector",
    "load_detector_weights",
]

DETECTOR_KINDS = ("cascade_mask_rcnn", "mask_rcnn")
CASCADE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
CASCADE_STAGE_WEIGHTS = (1.0, 0.5, 0.25)
CASCADE_BOX_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
PYRAMID_STRIDES = (4, 8, 16, 32, 64)
PYRAMID_NAMES = ("0", "1", "2", "3", "pool")
LN2D_EPS = 1e-6  # mmdet's ViTDet LN2d


def stds_to_weights(stds: Sequence[float]) -> Tuple[float, float, float, float]:
    """mmdet's DeltaXYWHBBoxCoder target_stds as torchvision's BoxCoder weights (1 / std)."""
    stds = tuple(float(s) for s in stds)
    if len(stds) != 4 or any(not s > 0 for s in stds):
        raise ValueError(f"box coder stds must be 4 positive numbers, got {stds!r}")
    return tuple(1.0 / s for s in stds)  # type: ignore[return-value]


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv ConvModule with LN2d and no activation: conv (no bias, as under a norm) then LayerNorm2d."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(out_channels, eps=LN2D_EPS),
    )


def _pyramid_dict(outs: List[torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    outs = outs + [F.max_pool2d(outs[-1], kernel_size=1, stride=2)]  # mmdet's extra level (num_outs 5)
    return OrderedDict(zip(PYRAMID_NAMES, outs))


# ---------------------------------------------------------------------------------------------- necks
class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (mmdet SimpleFPN) from one map of a plain backbone.

    From a (B, C, H/s, W/s) map, four maps at strides 4, 8, 16, 32 with C/4, C/2, C, C channels (for s=16:
    two 2x2 stride-2 transposed convs with LayerNorm2d + GELU between, one transposed conv, identity,
    2x2 max-pool; for other strides the same branches by scale factor), each then a 1x1 and a 3x3 conv
    with LayerNorm2d to `out_channels`, plus the stride-64 level max-pooled from the last. Returns an
    OrderedDict "0", "1", "2", "3", "pool" as torchvision's heads take it.
    """

    def __init__(self, in_channels: int, in_stride: int = 16, out_channels: int = 256):
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("out_channels", out_channels)
        if in_stride not in (4, 8, 16, 32, 64):
            raise ValueError(f"the backbone map's stride must be 4, 8, 16, 32 or 64 (a power of 2 the pyramid can "
                             f"resample to strides 4..32), got {in_stride!r}")
        c = in_channels
        self.in_channels, self.in_stride, self.out_channels = c, in_stride, out_channels
        self.strides = PYRAMID_STRIDES
        branches, widths = [], []
        for target, width in zip((4, 8, 16, 32), (c // 4, c // 2, c, c)):
            branch, width = self._branch(c, in_stride, target, width)
            branches.append(branch)
            widths.append(width)
        self.branches = nn.ModuleList(branches)
        self.lateral_convs = nn.ModuleList(_conv_norm(w, out_channels, 1) for w in widths)
        self.output_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3) for _ in widths)
        self.branch_channels = widths

    @staticmethod
    def _branch(c: int, in_stride: int, target: int, width: int) -> Tuple[nn.Module, int]:
        if target == in_stride:
            return nn.Identity(), c
        if target > in_stride:
            k = target // in_stride
            return nn.MaxPool2d(kernel_size=k, stride=k), c
        ups = (in_stride // target).bit_length() - 1  # number of 2x upsamplings
        if ups == 1:
            return nn.ConvTranspose2d(c, max(width, 1), 2, stride=2), max(width, 1)
        layers: List[nn.Module] = []
        ch = c
        for i in range(ups):
            out = max(ch // 2, 1)
            layers.append(nn.ConvTranspose2d(ch, out, 2, stride=2))
            if i < ups - 1:
                layers += [LayerNorm2d(out, eps=LN2D_EPS), nn.GELU()]
            ch = out
        return nn.Sequential(*layers), ch

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SimpleFeaturePyramid takes (B, {self.in_channels}, H, W) maps, got {tuple(x.shape)}")
        outs = [out(lat(branch(x))) for branch, lat, out in zip(self.branches, self.lateral_convs, self.output_convs)]
        return _pyramid_dict(outs)


class HierarchicalFeaturePyramid(nn.Module):
    """FPN over a hierarchical backbone's four stages (VMamba: strides 4, 8, 16, 32): per stage a 1x1
    conv with LayerNorm2d, the top-down path (nearest 2x upsampling, summed), a 3x3 conv with
    LayerNorm2d, `out_channels` each, plus the stride-64 level max-pooled from the last."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) != 4:
            raise ValueError(f"HierarchicalFeaturePyramid takes 4 stages, got in_channels={in_channels}")
        self.in_channels, self.out_channels, self.strides = in_channels, out_channels, PYRAMID_STRIDES
        self.lateral_convs = nn.ModuleList(_conv_norm(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        if len(feats) != 4:
            raise ValueError(f"HierarchicalFeaturePyramid takes 4 maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        return _pyramid_dict([conv(x) for conv, x in zip(self.output_convs, laterals)])


class _LastLayerAdapter(BackboneAdapter):
    """BackboneAdapter taking only the last layer (LBMamba's detection backbone: out_indices [23],
    one `outnorm_0`): the layer's output in image order, class token removed, through the LayerNorm."""

    @staticmethod
    def _check_indices(out_indices, depth: int) -> Tuple[int, ...]:
        return (depth - 1,)


class DetectionBackbone(nn.Module):
    """Backbone + pyramid: images -> OrderedDict of 5 maps ("0".."3", "pool") at strides 4..64.

    `body` is a `BackboneAdapter` (its state-dict keys are the wrapped timm model's, under `body.`);
    `fpn` is a `SimpleFeaturePyramid` (plain backbones: one stride for every layer) or a
    `HierarchicalFeaturePyramid` (VMamba and other staged backbones).
    """

    def __init__(self, model: nn.Module, *, feature_source: Optional[str] = None, out_channels: int = 256):
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not isinstance(info, (list, tuple)) or not info:
            raise TypeError(f"{type(model).__name__} has no feature_info list to take layer widths / strides from")
        if not callable(getattr(model, "forward_intermediates", None)):
            raise TypeError(f"the backbone must have timm's forward_intermediates(); {type(model).__name__} has not")
        strides = [int(i["reduction"]) for i in info]
        if feature_source is None:
            from inspect import signature
            takes = "source" in signature(model.forward_intermediates).parameters
            feature_source = "mixer" if takes else "residual"
        _check_choice("feature_source", feature_source, FEATURE_SOURCES)
        self.hierarchical = len(set(strides)) > 1
        if self.hierarchical:
            if len(info) < 4 or strides[-4:] != [4, 8, 16, 32]:
                raise ValueError(f"a staged backbone needs its last four stages at strides 4, 8, 16, 32; "
                                 f"{type(model).__name__} has strides {strides}")
            n = len(info)
            self.body = BackboneAdapter(model, out_indices=tuple(range(n - 4, n)), feature_source=feature_source,
                                        neck="none", out_norm=True)
            self.fpn: nn.Module = HierarchicalFeaturePyramid(self.body.out_channels, out_channels)
        else:
            self.body = _LastLayerAdapter(model, feature_source=feature_source, neck="none", out_norm=True)
            self.fpn = SimpleFeaturePyramid(self.body.out_channels[0], self.body.out_strides[0], out_channels)
        self.out_channels = out_channels  # torchvision's heads read this
        self.feature_source = feature_source
        self.size_divisor = self.body.size_divisor

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(feats if self.hierarchical else feats[0])


# ---------------------------------------------------------------------------------------------- heads
def _box_head(in_channels: int, roi_size: int, conv_channels: int = 256, fc_channels: int = 1024) -> nn.Module:
    """mmdet Shared4Conv1FCBBoxHead with LN2d: 4 x (3x3 conv, LayerNorm2d, ReLU), flatten, fc + ReLU."""
    return FastRCNNConvFCHead((in_channels, roi_size, roi_size), [conv_channels] * 4, [fc_channels],
                              norm_layer=lambda c: LayerNorm2d(c, eps=LN2D_EPS))


class _BoxPredictor(nn.Module):
    """fc_cls (num_classes + 1, background at 0) and class-specific fc_reg ((num_classes + 1) x 4),
    initialised as mmdet's BBoxHead (normal std 0.01 / 0.001, bias 0)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def _mask_head(in_channels: int, num_classes: int, conv_channels: int = 256) -> Tuple[nn.Module, nn.Module]:
    """mmdet FCNMaskHead with LN2d: 4 x (3x3 conv, LayerNorm2d, ReLU), then 2x2 stride-2 deconv, ReLU,
    1x1 conv to num_classes + 1 mask logits (28 x 28 from 14 x 14 RoIs)."""
    head = MaskRCNNHeads(in_channels, [conv_channels] * 4, 1, norm_layer=lambda c: LayerNorm2d(c, eps=LN2D_EPS))
    return head, MaskRCNNPredictor(conv_channels, conv_channels, num_classes + 1)


class CascadeStage(nn.Module):
    """One stage of the cascade: its own matcher (IoU threshold), sampler, box coder (weights = 1 / std),
    loss weight, box head and predictor, and mask head and predictor."""

    def __init__(self, num_classes: int, iou_threshold: float, box_stds: Sequence[float], loss_weight: float, *,
                 in_channels: int = 256, rois_per_image: int = 512, positive_fraction: float = 0.25,
                 box_roi_size: int = 7, with_mask: bool = True, conv_channels: int = 256, fc_channels: int = 1024):
        super().__init__()
        if not 0.0 < float(iou_threshold) < 1.0:
            raise ValueError(f"IoU thresholds must be in (0, 1), got {iou_threshold!r}")
        if float(loss_weight) < 0:
            raise ValueError(f"stage loss weights must be >= 0, got {loss_weight!r}")
        self.iou_threshold = float(iou_threshold)
        self.loss_weight = float(loss_weight)
        self.box_stds = tuple(float(s) for s in box_stds)
        # mmdet's MaxIoUAssigner with pos = neg = min_pos IoU: positive at IoU >= t, negative below
        self.proposal_matcher = det_utils.Matcher(self.iou_threshold, self.iou_threshold,
                                                  allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(rois_per_image, positive_fraction)
        self.box_coder = det_utils.BoxCoder(stds_to_weights(box_stds))
        self.box_head = _box_head(in_channels, box_roi_size, conv_channels, fc_channels)
        self.box_predictor = _BoxPredictor(fc_channels, num_classes)
        if with_mask:
            self.mask_head, self.mask_predictor = _mask_head(in_channels, num_classes, conv_channels)

    def match(self, proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor):
        """(matched gt index clamped to >= 0, label per proposal: the gt's class, 0 background)."""
        if gt_boxes.numel() == 0:
            matched = torch.zeros(proposals.shape[0], dtype=torch.int64, device=proposals.device)
            return matched, torch.zeros_like(matched)
        quality = box_ops.box_iou(gt_boxes, proposals)
        idxs = self.proposal_matcher(quality)
        matched = idxs.clamp(min=0)
        labels = gt_labels[matched].to(torch.int64)
        labels[idxs == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
        labels[idxs == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
        return matched, labels


def _l1_box_loss(box_regression: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mmdet's L1Loss on class-specific deltas of the positives, summed and divided by the sampled RoIs."""
    pos = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(box_regression.shape[0], -1, 4)
    pred = box_regression[pos, labels[pos]].float()
    return F.l1_loss(pred, targets[pos].float(), reduction="sum") / max(labels.numel(), 1)


class CascadeRoIHeads(RoIHeads):
    """Cascade (Mask) R-CNN RoI heads with torchvision's RoIHeads interface; one stage is Mask R-CNN.

    Training returns {"loss_classifier_s{i}", "loss_box_reg_s{i}", "loss_mask_s{i}"} for each stage i,
    already multiplied by the stage's weight; eval returns per image {"boxes", "labels", "scores",
    "masks"} (masks: (N, 1, 28, 28) probabilities, pasted into the image by the transform).
    """

    def __init__(self, stages: Sequence[CascadeStage], box_roi_pool: MultiScaleRoIAlign,
                 mask_roi_pool: Optional[MultiScaleRoIAlign], *, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100):
        stages = list(stages)
        if not stages:
            raise ValueError("CascadeRoIHeads needs at least one stage")
        last = stages[-1]
        with_mask = mask_roi_pool is not None
        super().__init__(box_roi_pool, None, None, last.iou_threshold, last.iou_threshold, 1, 0.25,
                         last.box_coder.weights, score_thresh, nms_thresh, detections_per_img)
        self.stages = nn.ModuleList(stages)
        self.box_coder = last.box_coder  # postprocess_detections decodes the last stage's deltas
        if with_mask:
            self.mask_roi_pool = mask_roi_pool
        self.with_mask = with_mask

    def has_mask(self) -> bool:
        return self.with_mask

    @property
    def stage_loss_weights(self) -> Tuple[float, ...]:
        return tuple(s.loss_weight for s in self.stages)

    # -------------------------------------------------------------------------- training
    def sample(self, stage: CascadeStage, proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]):
        """Per image: ground truth added, matched at the stage's IoU, sampled. Returns lists of
        (rois, labels, matched gt index, regression targets (stage's coder), is-gt flags)."""
        out = {k: [] for k in ("rois", "labels", "matched", "targets", "is_gt")}
        for props, tgt in zip(proposals, targets):
            gt_boxes = tgt["boxes"].to(props.dtype)
            rois = torch.cat([props, gt_boxes])
            is_gt = torch.cat([torch.zeros(len(props), dtype=torch.bool, device=props.device),
                               torch.ones(len(gt_boxes), dtype=torch.bool, device=props.device)])
            matched, labels = stage.match(rois, gt_boxes, tgt["labels"])
            pos, neg = stage.fg_bg_sampler([labels])
            keep = torch.where(pos[0] | neg[0])[0]
            rois, labels, matched, is_gt = rois[keep], labels[keep], matched[keep], is_gt[keep]
            if gt_boxes.numel() == 0:
                gt_boxes = rois.new_zeros((1, 4))
            out["targets"].append(stage.box_coder.encode_single(gt_boxes[matched], rois))
            for k, v in (("rois", rois), ("labels", labels), ("matched", matched), ("is_gt", is_gt)):
                out[k].append(v)
        return out

    @staticmethod
    def refine(stage: CascadeStage, rois: List[torch.Tensor], labels: List[torch.Tensor], class_logits: torch.Tensor,
               box_regression: torch.Tensor, image_shapes: List[Tuple[int, int]]) -> List[torch.Tensor]:
        """mmdet's refine / regress_by_class: each RoI decoded with its class's deltas (the given label, or
        the argmax foreground class where the label is background), clipped to the image, detached."""
        counts = [len(r) for r in rois]
        fg_argmax = class_logits[:, 1:].argmax(dim=1) + 1 if class_logits.shape[0] else class_logits.new_zeros(0)
        cls = torch.cat(labels) if labels is not None else fg_argmax.long()
        cls = torch.where(cls > 0, cls, fg_argmax.long())
        deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
        deltas = deltas[torch.arange(deltas.shape[0], device=deltas.device), cls]
        # float32 decoding: half-precision boxes would be quantised (0.5 px at 1024) under AMP
        boxes = stage.box_coder.decode_single(deltas.detach().float(), torch.cat(rois).detach().float())
        out = []
        for b, shape in zip(boxes.split(counts), image_shapes):
            out.append(box_ops.clip_boxes_to_image(b, shape).detach())
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (a list of dicts with boxes, labels and, for masks, masks)")
            self._check_targets(targets)
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._predict(features, proposals, image_shapes), {}

    def _check_targets(self, targets) -> None:
        """One-line errors for targets the losses would otherwise fail on deep inside."""
        num_classes = self.stages[0].box_predictor.cls_score.out_features - 1
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4 \
                    or not boxes.is_floating_point():
                raise ValueError(f"target {i}: boxes must be a float tensor (N, 4) of (x1, y1, x2, y2), got "
                                 f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"target {i}: labels must be an int64 tensor with one entry per box")
            if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
                raise ValueError(f"target {i}: labels must lie in 1..{num_classes} (0 is background), got "
                                 f"{sorted(set(labels.tolist()))}")
            if self.with_mask:
                masks = t.get("masks")
                if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] != boxes.shape[0]:
                    raise ValueError(f"target {i}: masks must be a tensor (N, H, W) with one mask per box (or build "
                                     "the detector with with_mask=False)")

    def _losses(self, features, proposals, image_shapes, targets) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        rois = [p.detach() for p in proposals]
        for i, stage in enumerate(self.stages):
            s = self.sample(stage, rois, targets)
            x = stage.box_head(self.box_roi_pool(features, s["rois"], image_shapes))
            class_logits, box_regression = stage.box_predictor(x)
            labels = torch.cat(s["labels"])
            reg_targets = torch.cat(s["targets"])
            w = stage.loss_weight
            losses[f"loss_classifier_s{i}"] = w * F.cross_entropy(class_logits.float(), labels)
            losses[f"loss_box_reg_s{i}"] = w * _l1_box_loss(box_regression, labels, reg_targets)
            if self.with_mask:
                pos = [torch.where(lab > 0)[0] for lab in s["labels"]]
                pos_rois = [r[p] for r, p in zip(s["rois"], pos)]
                if sum(len(p) for p in pos):
                    mask_logits = stage.mask_predictor(stage.mask_head(
                        self.mask_roi_pool(features, pos_rois, image_shapes)))
                    loss_mask = maskrcnn_loss(mask_logits.float(), pos_rois, [t["masks"] for t in targets],
                                              [lab[p] for lab, p in zip(s["labels"], pos)],
                                              [m[p] for m, p in zip(s["matched"], pos)])
                else:  # keep the graph connected (DDP) with a zero loss
                    loss_mask = sum(p.sum() for p in stage.mask_predictor.parameters()) * 0.0
                losses[f"loss_mask_s{i}"] = w * loss_mask
            if i < len(self.stages) - 1:
                with torch.no_grad():
                    refined = self.refine(stage, s["rois"], s["labels"], class_logits, box_regression, image_shapes)
                    rois = [r[~g] for r, g in zip(refined, s["is_gt"])]
        return losses

    # -------------------------------------------------------------------------- inference
    def _predict(self, features, proposals, image_shapes) -> List[Dict[str, torch.Tensor]]:
        rois = list(proposals)
        all_logits = []
        box_regression = None
        for i, stage in enumerate(self.stages):
            x = stage.box_head(self.box_roi_pool(features, rois, image_shapes))
            class_logits, box_regression = stage.box_predictor(x)
            all_logits.append(class_logits)
            if i < len(self.stages) - 1:
                rois = self.refine(stage, rois, None, class_logits, box_regression, image_shapes)
        mean_logits = torch.stack([c.float() for c in all_logits]).mean(0)
        rois = [r.float() for r in rois]
        boxes, scores, labels = self.postprocess_detections(mean_logits, box_regression.float(), rois, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": sc} for b, sc, lab in zip(boxes, scores, labels)]
        if self.with_mask:
            det_boxes = [r["boxes"] for r in result]
            det_labels = torch.cat([r["labels"] for r in result])
            counts = [len(b) for b in det_boxes]
            mask_features = self.mask_roi_pool(features, det_boxes, image_shapes)
            probs = None
            for stage in self.stages:
                logits = stage.mask_predictor(stage.mask_head(mask_features))
                p = logits[torch.arange(logits.shape[0], device=logits.device), det_labels][:, None].float().sigmoid()
                probs = p if probs is None else probs + p
            probs = probs / len(self.stages)
            for r, m in zip(result, probs.split(counts)):
                r["masks"] = m
        return result


# ---------------------------------------------------------------------------------------------- detector
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

    # ------------------------------------------------------------------ optimiser helpers
    @property
    def num_layers(self) -> int:
        """The backbone's depth (the layers it runs)."""
        return self.backbone.body.num_layers

    @staticmethod
    def reference_name(name: str) -> str:
        """A parameter's name as LBMamba's mmdet model spells it: `backbone.body.X` -> `backbone.X`,
        `backbone.fpn.X` -> `neck.X` (the other names are kept)."""
        if name.startswith("backbone.body."):
            return "backbone." + name[len("backbone.body."):]
        if name.startswith("backbone.fpn."):
            return "neck." + name[len("backbone.fpn."):]
        return name

    def layer_id(self, name: str, num_layers: Optional[int] = None, *, per_layer: bool = False) -> int:
        """Layer of parameter `name` for layer-wise lr decay, as LBMamba's `get_layer_id_for_vit`
        (detection/vitdet/layer_decay_optimizer_constructor.py): 0 for names holding patch_embed /
        pos_embed, i + 1 for ViT blocks `backbone.blocks.i`, num_layers + 1 for everything else. Its
        branch for the Mamba layers (`backbone.layers.i`) is commented out, so they get num_layers + 1
        too; `per_layer=True` restores it (i + 1). num_layers: default the backbone's depth."""
        n = self.num_layers if num_layers is None else _check_int("num_layers", num_layers)
        ref = self.reference_name(name)
        if not ref.startswith("backbone"):
            return n + 1
        if "patch_embed" in ref or "pos_embed" in ref:
            return 0
        parts = ref.split(".")
        if ".blocks." in ref or (per_layer and ".layers." in ref):
            return int(parts[2]) + 1
        return n + 1

    def lr_scale(self, name: str, decay_rate: float = 0.7, num_layers: Optional[int] = None, *,
                 per_layer: bool = False) -> float:
        """decay_rate ** (num_layers + 1 - layer_id), as LBMamba's LayerDecayOptimizerConstructor.

        Default (LBMamba's run: num_layers 12 from its config, the Mamba branch commented out): the patch
        and position embeddings get 0.7 ** 13 and every other parameter 1.0. `per_layer=True` is the
        intended decay (num_layers default the backbone's depth): layer i gets decay ** (depth - i), the
        embeddings decay ** (depth + 1), the neck and heads 1.0."""
        if not 0.0 < float(decay_rate) <= 1.0:
            raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate!r}")
        if num_layers is None:
            num_layers = self.num_layers if per_layer else 12
        return float(decay_rate) ** (num_layers + 1 - self.layer_id(name, num_layers, per_layer=per_layer))

    def no_weight_decay(self) -> Set[str]:
        """Full names of the parameters LBMamba's constructor trains without weight decay: names holding
        `pos_embed`, and norms of ViT blocks (`backbone.blocks.*norm*`). Everything else, the Mamba
        layers' norms, biases, A_log and D included, gets the weight decay there."""
        names = set()
        for name, _ in self.named_parameters():
            ref = self.reference_name(name)
            if (ref.startswith("backbone.blocks") and "norm" in ref) or "pos_embed" in ref:
                names.add(name)
        return names


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
    _check_choice("kind", kind, DETECTOR_KINDS)
    _check_int("num_classes", num_classes)
    _check_int("img_size", img_size)
    _check_int("rois_per_image", rois_per_image)
    _check_int("size_divisible", size_divisible)
    for name, value in (("out_channels", out_channels), ("head_conv_channels", head_conv_channels),
                        ("head_fc_channels", head_fc_channels)):
        _check_int(name, value)
    _check_choice("backbone_norm", backbone_norm, BACKBONE_NORMS)
    if feature_source is not None:
        _check_choice("feature_source", feature_source, FEATURE_SOURCES)
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


def load_detector_weights(model: Detector, checkpoint, *, strict: bool = True) -> BackboneLoadReport:
    """Initialise `model` from a checkpoint file (or an already read dict) and say what was loaded: a whole
    detector state dict (ours: keys `rpn.*` / `roi_heads.*`) loads whole, the position embedding resized to
    the model's grid; a classification checkpoint loads into the backbone as `load_backbone_weights` does
    for a segmentor (the pyramid and heads keep their initialisation). Raises `CheckpointMismatchError`."""
    if not isinstance(model, Detector):
        raise TypeError(f"model must be a Detector, got {type(model).__name__}")
    state_dict, source = _read(checkpoint)
    body = model.backbone.body
    if any(k.startswith(("rpn.", "roi_heads.")) for k in state_dict):
        return load_whole_weights(model, body, state_dict, source, strict=strict, prefix="backbone.body.",
                                  kind="detector")
    return load_adapter_weights(body, state_dict, source, strict=strict, prefix="backbone.body.")
