"""The residual block of Mamba / Vim / LBVim: Add -> Norm -> Mixer.

`Block.forward(hidden, residual)` returns `(mixer(norm(residual')), residual')` with
`residual' = residual + drop_path(hidden)` (or `hidden` itself in the first block, where residual is None).
Keeping the add outside the mixer lets the residual stream stay in float32 (`residual_in_fp32`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath

from .mixer import Mamba
from .norm import RMSNorm, add_norm

__all__ = ["Block"]


class Block(nn.Module):
    """Args:
        dim: width.
        mixer_cls: callable dim -> mixer module (default: `Mamba` with its defaults).
        norm_layer: callable dim -> norm module (default: `RMSNorm`, eps 1e-5).
        residual_in_fp32: keep the residual stream in float32.
        drop_path: stochastic depth rate applied to the incoming hidden states before the add.
    """

    def __init__(
        self,
        dim: int,
        mixer_cls: Optional[Callable[[int], nn.Module]] = None,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        residual_in_fp32: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        mixer_cls = mixer_cls or partial(Mamba)
        norm_layer = norm_layer or partial(RMSNorm, eps=1e-5)
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer_cls(dim)
        self.norm = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        hidden_states, residual = add_norm(hidden_states, residual, self.norm, self.residual_in_fp32)
        return self.mixer(hidden_states), residual
