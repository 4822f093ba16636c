"""timm-registered model families (importing this registers them with timm)."""

from .checkpoint import CheckpointMismatchError, LoadResult, load_checkpoint, read_checkpoint, unwrap_state_dict
from .lbvim import AttentionPoolHead, VisionMamba, checkpoint_filter_fn, resample_pos_embed
from .mil import create_mil_model

__all__ = [
    "VisionMamba",
    "AttentionPoolHead",
    "checkpoint_filter_fn",
    "resample_pos_embed",
    "load_checkpoint",
    "read_checkpoint",
    "unwrap_state_dict",
    "CheckpointMismatchError",
    "LoadResult",
    "create_mil_model",
]
