"""The one way every family here builds a registered model through timm: its default cfg, its checkpoint
filter and `build_model_with_cfg`."""

from __future__ import annotations

from typing import Any, Dict, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

__all__ = ["LBMAMBA_PAPER", "default_cfg", "checkpoint_filter_fn", "build_with_cfg"]

LBMAMBA_PAPER = dict(paper_ids="arXiv:2506.15976", paper_name="LBMamba: Locally Bi-directional Mamba")


def default_cfg(**kwargs) -> Dict[str, Any]:
    """A pretrained cfg: ImageNet-1k at 224 px, crop 0.875, bicubic, any input size; `kwargs` add or override
    (a family's `first_conv` / `classifier` when not `patch_embed.proj` / `head`, paper, license)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's `pretrained_filter_fn` for every family: the model's own `checkpoint_filter` (unwrapping, the
    family's renames, `pos_embed` resampled to the model's grid)."""
    return model.checkpoint_filter(state_dict)


def build_with_cfg(model_cls: Type[nn.Module], variant: str, pretrained: bool, args: Dict[str, Any],
                   default_out_indices: Any = 3, **kwargs) -> nn.Module:
    """timm's `build_model_with_cfg` for `variant` with constructor arguments `args` updated by `kwargs`:
    checkpoints pass through `checkpoint_filter_fn`, and `features_only` takes its maps from
    `forward_intermediates` (timm's "getter"), the layers `out_indices` (popped from the arguments; default
    `default_out_indices`)."""
    args = dict(args, **kwargs)
    out_indices = args.pop("out_indices", default_out_indices)
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)
