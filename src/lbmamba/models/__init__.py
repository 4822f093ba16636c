"""timm-registered model families (importing this registers them with timm), and checkpoint loading."""

from ..nn.pos_embed import resample_pos_embed
from . import adventurer  # noqa: F401  (registers Adventurer / LB-Adventurer with timm)
from ._build import checkpoint_filter_fn
from .checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    LoadResult,
    load_checkpoint,
    read_checkpoint,
    read_file,
    unwrap_state_dict,
)
from .dense import (
    DETECTOR_KINDS,
    FEATURE_SOURCES,
    NECKS,
    BackboneAdapter,
    BackboneLoadReport,
    CascadeRoIHeads,
    DetectionBackbone,
    Detector,
    Segmentor,
    SimpleFeaturePyramid,
    build_detector,
    build_segmentor,
    load_backbone_weights,
    load_detector_weights,
    predict_logits,
)
from .lbvim import VisionMamba
from .localvim import LocalVisionMamba  # noqa: F401  (registers LocalVim / LB-LocalVim with timm)
from .mil import ABMIL, MIL_MODELS, MambaMIL, create_mil_model
from .plainmamba import PlainMamba  # noqa: F401  (registers PlainMamba / LB-PlainMamba with timm)
from .vmamba import VMamba  # noqa: F401  (registers VMamba / LB-VMamba with timm)

__all__ = [
    "VisionMamba",
    "checkpoint_filter_fn",
    "resample_pos_embed",
    "MambaMIL",
    "ABMIL",
    "MIL_MODELS",
    "create_mil_model",
    "load_checkpoint",
    "read_checkpoint",
    "read_file",
    "unwrap_state_dict",
    "CheckpointReadError",
    "CheckpointMismatchError",
    "LoadResult",
    "FEATURE_SOURCES",
    "NECKS",
    "BackboneAdapter",
    "BackboneLoadReport",
    "Segmentor",
    "build_segmentor",
    "load_backbone_weights",
    "predict_logits",
    "DETECTOR_KINDS",
    "CascadeRoIHeads",
    "DetectionBackbone",
    "Detector",
    "SimpleFeaturePyramid",
    "build_detector",
    "load_detector_weights",
]
