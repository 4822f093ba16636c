"""The one way every family here builds a registered model through timm."""

from __future__ import annotations

from typing import Any, Callable, Dict, Type

import torch.nn as nn
from timm.models import build_model_with_cfg


def build_with_cfg(model_cls: Type[nn.Module], variant: str, pretrained: bool, filter_fn: Callable,
                   args: Dict[str, Any], default_out_indices: Any = 3) -> nn.Module:
    """timm's `build_model_with_cfg` for `variant` with constructor arguments `args`: checkpoints pass through
    `filter_fn`, and `features_only` takes its maps from `forward_intermediates` (timm's "getter"), the
    layers `out_indices` (popped from `args`; default `default_out_indices`)."""
    args = dict(args)
    out_indices = args.pop("out_indices", default_out_indices)
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)
