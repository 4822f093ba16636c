"""The RoI heads of Mask R-CNN and Cascade Mask R-CNN (ViTDet style) on torchvision's detection package
(`RoIHeads`, `Matcher`, `BalancedPositiveNegativeSampler`, `BoxCoder`, `maskrcnn_loss`): per stage a box
head and predictor and a mask head and predictor, and the cascade that runs the stages.

Facts the defaults follow (read from the reference configs):

* LBMamba (detection/configs/lbmamba/vitdet_cascade_mask-rcnn_bivim_tiny_norope_rms_lsj-300e.py):
  `CascadeRoIHead` with 3 stages, stage loss weights [1, 0.5, 0.25], RoIAlign 7 (boxes) / 14 (masks),
  sampling_ratio 0, featmap strides [4, 8, 16, 32]; `Shared4Conv1FCBBoxHead` (256-channel convs, fc 1024,
  LN2d), class-specific regression, `DeltaXYWHBBoxCoder` stds (0.1, 0.1, 0.2, 0.2) / (0.05, 0.05, 0.1, 0.1)
  / (0.033, 0.033, 0.067, 0.067), CE class loss, L1 box loss; `FCNMaskHead` 4 convs with LN2d.
* mmdetection's cascade base config (configs/_base_/models/cascade-mask-rcnn_r50_fpn.py): per stage
  an assigner with pos = neg = min_pos IoU 0.5 / 0.6 / 0.7 (no low-quality matches), a random sampler of
  512 RoIs with 25 % positives and the ground truth added; test score threshold 0.05, NMS 0.5, 100
  detections; mask size 28.
* mmdetection's CascadeRoIHead (mmdet/models/roi_heads/cascade_roi_head.py): in training each stage's
  losses are multiplied by its weight, and the sampled RoIs are refined by that stage's regression (the
  RoI's target class, the argmax foreground class for negatives), detached, and the ground-truth RoIs
  removed before the next stage; at test time the stages' class logits are averaged (softmax after the
  average), each stage's RoIs refined with its own argmax class, the last stage's regression gives the
  boxes, and the mask probabilities are the average of every stage's mask sigmoid.
* Mask R-CNN is the same RoI head with one stage (IoU 0.5, stds (0.1, 0.1, 0.2, 0.2), L1 box loss as
  mmdet's mask-rcnn base config) and the same ViTDet heads.

Differences from the reference, all small: torchvision's RoIAlign here is `aligned=False`
(`MultiScaleRoIAlign` does not expose it; mmcv's is `aligned=True`); labels follow torchvision (0 is
background, the classes are 1..num_classes).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from .feature_pyramid import LN2D_EPS

__all__ = [
    "CASCADE_IOU_THRESHOLDS",
    "CASCADE_STAGE_WEIGHTS",
    "CASCADE_BOX_STDS",
    "stds_to_weights",
    "CascadeStage",
    "CascadeRoIHeads",
]

CASCADE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
CASCADE_STAGE_WEIGHTS = (1.0, 0.5, 0.25)
CASCADE_BOX_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def stds_to_weights(stds: Sequence[float]) -> Tuple[float, float, float, float]:
    """mmdet's DeltaXYWHBBoxCoder target_stds as torchvision's BoxCoder weights (1 / std)."""
    stds = tuple(float(s) for s in stds)
    if len(stds) != 4 or any(not s > 0 for s in stds):
        raise ValueError(f"box coder stds must be 4 positive numbers, got {stds!r}")
    return tuple(1.0 / s for s in stds)  # type: ignore[return-value]


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
