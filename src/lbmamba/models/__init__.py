"""timm-registered model families (importing this registers them with timm), and checkpoint loading."""

from .checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    LoadResult,
    load_checkpoint,
    read_checkpoint,
    read_file,
    unwrap_state_dict,
)
from .lbvim import VisionMamba, checkpoint_filter_fn, resample_pos_embed
from .mil import ABMIL, MIL_MODELS, MambaMIL, create_mil_model

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
]
