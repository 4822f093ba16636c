"""Dense prediction: UperNet segmentors and (Cascade) Mask R-CNN detectors on timm backbones.

One file per concern, as torchvision's detection package: `backbone` (the backbone adapter and the
detection backbone), `feature_pyramid`, `uper_head` (the segmentation heads), `segmentor`,
`sliding_window` (test-time inference), `rcnn_heads` (box / mask heads and the cascade), `detector`, and
`weights` (initialising either from checkpoints).
"""

from .backbone import (
    BACKBONE_NORMS,
    FEATURE_SOURCES,
    NECKS,
    BackboneAdapter,
    DetectionBackbone,
    default_out_indices,
    dense_backbone,
)
from .detector import DETECTOR_KINDS, Detector, build_detector
from .feature_pyramid import HierarchicalFeaturePyramid, SimpleFeaturePyramid
from .rcnn_heads import (
    CASCADE_BOX_STDS,
    CASCADE_IOU_THRESHOLDS,
    CASCADE_STAGE_WEIGHTS,
    CascadeRoIHeads,
    CascadeStage,
    stds_to_weights,
)
from .segmentor import Segmentor, build_segmentor
from .sliding_window import PREDICT_MODES, predict_logits
from .uper_head import PPM, ConvModule, FCNHead, UPerHead
from .weights import (
    BackboneLoadReport,
    load_adapter_weights,
    load_backbone_weights,
    load_detector_weights,
    load_whole_weights,
)

__all__ = [
    "FEATURE_SOURCES",
    "NECKS",
    "BACKBONE_NORMS",
    "PREDICT_MODES",
    "DETECTOR_KINDS",
    "CASCADE_IOU_THRESHOLDS",
    "CASCADE_STAGE_WEIGHTS",
    "CASCADE_BOX_STDS",
    "default_out_indices",
    "dense_backbone",
    "BackboneAdapter",
    "DetectionBackbone",
    "SimpleFeaturePyramid",
    "HierarchicalFeaturePyramid",
    "ConvModule",
    "PPM",
    "UPerHead",
    "FCNHead",
    "Segmentor",
    "build_segmentor",
    "predict_logits",
    "stds_to_weights",
    "CascadeStage",
    "CascadeRoIHeads",
    "Detector",
    "build_detector",
    "BackboneLoadReport",
    "load_backbone_weights",
    "load_adapter_weights",
    "load_whole_weights",
    "load_detector_weights",
]
