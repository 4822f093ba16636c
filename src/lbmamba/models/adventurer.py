"""Adventurer (causal image modelling with Mamba-2) and LB-Adventurer, registered with timm.

Adventurer treats an image as a sequence of patch tokens followed by a class token (the class token
is the LAST token), adds an absolute position embedding of (1, patches + 1, C), and runs plain
uni-directional blocks:

    x = norm(h)                                    RMSNorm, eps 1e-5
    [flip the patch tokens when the layer flips]   the class token stays last
    x = [mean(x over all tokens incl. class), x]   the "heading average", prepended
    x = mixer(x)[:, 1:]                            Mamba-2; the heading token's output is dropped
    [flip the patch tokens back]
    h = h + drop_path(x)
    h = h + drop_path(SwiGLU(norm_mlp(h)))         w3(silu(w1 x) * w2 x), hidden int(2.5 dim), biases

and classifies the last token after `norm_f`. Every block hands its output back in image order, so
intermediates need no un-flipping.

LB-Adventurer is the same network with the mixer's scan replaced by the LB scan (window "auto":
198 tokens at 224 px -> W 8); it adds no parameters, so the original checkpoints load into both.
`window` selects: 1 reproduces Adventurer (Mamba-2's scan), "auto" or an int the LB scan.

Parameter names and shapes are those of the official code (`Adventurer` in models_mamba.py with
`MambaCustom`), so its `{'model': ..., 'model_ema': ...}` checkpoints load unchanged (see
docs/models.md): the 'model' weights are taken (pass `read_file(path)['model_ema']` for the EMA ones),
and `pos_embed` is resampled to the model's grid with the class token's entry kept last. (The official
fine-tuning script takes the first entry as the class token's, which does not fit this layout; this
code does not copy that.)
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, lecun_normal_, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..nn import RMSNorm
from ..nn.mamba2 import Mamba2
from ..nn.pos_embed import split_class_token
from ._build import LBMAMBA_PAPER, build_with_cfg, checkpoint_filter_fn, default_cfg
from ._family import (
    PlainModelMixin,
    check_intermediates_args,
    layer_drop_path_rates,
    layer_feature_info,
    rescale_out_proj,
    tokens_to_map,
)

__all__ = ["Adventurer", "AdventurerBlock", "SwiGLU", "FLIP_SCHEDULES", "layer_flips", "flip_patch_tokens",
           "checkpoint_filter_fn"]

#: which layers flip their patch tokens (n = layer index):
#: "released": n // 2 == 1, layers 2 and 3 only (the released code's condition; the default);
#: "pairs": (n // 2) % 2 == 1, layers 2, 3, 6, 7, ... (the author's fix: a flip between every two layers);
#: "alternate": n % 2 == 1, every odd layer (the other fix the author named); "none": no flips.
FLIP_SCHEDULES = ("released", "pairs", "alternate", "none")


def layer_flips(schedule: str, n: int) -> bool:
    """Whether layer `n` flips its patch tokens under `schedule` (one of FLIP_SCHEDULES)."""
    if schedule == "released":
        return n // 2 == 1
    if schedule == "pairs":
        return (n // 2) % 2 == 1
    if schedule == "alternate":
        return n % 2 == 1
    if schedule == "none":
        return False
    raise ValueError(f"flip_schedule must be one of {FLIP_SCHEDULES}, got {schedule!r}")


def flip_patch_tokens(x: torch.Tensor) -> torch.Tensor:
    """Reverse the patch tokens of a (B, patches + 1, C) sequence, keeping the class token last.
    Its own inverse."""
    return torch.cat([x[:, :-1].flip(1), x[:, -1:]], dim=1)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), all three Linear layers with biases (Adventurer's MLP)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w3(F.silu(self.w1(x)) * self.w2(x)))


class AdventurerBlock(nn.Module):
    """norm -> [flip] -> heading average -> Mamba-2 -> drop heading -> [flip back] -> residual;
    norm_mlp -> SwiGLU -> residual. The class token is the last token of the input."""

    def __init__(self, dim: int, mixer: nn.Module, norm_layer, mlp_hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.mixer = mixer
        self.norm = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.norm_mlp = norm_layer(dim)

    def forward(self, hidden_states: torch.Tensor, flip: bool = False) -> torch.Tensor:
        x = self.norm(hidden_states)
        if flip:
            x = flip_patch_tokens(x)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = self.mixer(x)[:, 1:]
        if flip:
            x = flip_patch_tokens(x)
        hidden_states = hidden_states + self.drop_path(x)
        return hidden_states + self.drop_path(self.mlp(self.norm_mlp(hidden_states)))


class Adventurer(PlainModelMixin, nn.Module):
    """Adventurer / LB-Adventurer: a plain causal vision backbone on Mamba-2 blocks.

    Args:
        img_size: image size the position embedding is built for (other sizes divisible by the patch
            run: the embedding is resampled on the fly; the official code accepts only its own size).
        patch_size, in_chans, num_classes: as in timm.
        global_pool: "token" (the last, class token: the official head; default), "avg" (mean of the
            patch tokens) or "" (no pooling).
        embed_dim, depth: width and number of blocks.
        d_state, d_conv, expand, headdim, ngroups: Mamba-2 sizes (64, 4, 2, 64, 1 as the official
            models).  ssm_cfg: further `Mamba2` kwargs (dt_min, dt_max, A_init_range, dt_limit...).
        window: the scan's window: 1 (Adventurer: Mamba-2's scan, what the official checkpoints were
            trained with), or "auto" / an int (LB-Adventurer: the LB scan).
        flip_schedule: which layers flip their patch tokens: "released" (default: `n // 2 == 1`, only
            layers 2 and 3, the condition in the released code), "pairs" (`(n // 2) % 2 == 1`, a flip
            between every two layers as the paper describes; the author's stated fix), "alternate"
            (`n % 2 == 1`) or "none". Which one the released checkpoints were trained with is not known:
            the default follows the released code.
        mlp_ratio: SwiGLU hidden size = int(mlp_ratio * embed_dim) (2.5: 640 for width 256).
        norm_eps: eps of the RMSNorms (1e-5).
        pos_drop_rate: dropout after the position embedding (the official `drop_rate`).
        drop_rate: dropout before the classifier (timm's meaning; the official model has none).
        drop_path_rate: stochastic depth; layer i gets ([0] + linspace(0, rate, depth))[i], as the
            official code (layer 0 and 1 get 0, the last layer gets rate * (depth - 2) / (depth - 1)).
    """

    global_pools = ("token", "avg", "")
    class_token = "tail"  # the class token is the last token, after the patches

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 256,
        depth: int = 12,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        window=1,
        flip_schedule: str = "released",
        mlp_ratio: float = 2.5,
        norm_eps: float = 1e-5,
        pos_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ssm_cfg: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        layer_flips(flip_schedule, 0)  # validate
        self.num_classes = num_classes
        self.global_pool = self._check_pool(global_pool, self.class_token)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth = depth
        self.window = window
        self.flip_schedule = flip_schedule
        self.num_prefix_tokens = 1  # the class token (it sits at the end of the sequence)
        self.dynamic_img_size = True
        norm_layer = partial(RMSNorm, eps=norm_eps)

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, strict_img_size=False
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        mixer_cls = partial(Mamba2, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                            ngroups=ngroups, window=window, **(ssm_cfg or {}))
        dpr = layer_drop_path_rates(drop_path_rate, depth)
        mlp_hidden = int(embed_dim * mlp_ratio)
        self.layers = nn.ModuleList(
            [
                AdventurerBlock(embed_dim, mixer_cls(embed_dim, layer_idx=i), norm_layer, mlp_hidden, drop_path=dpr[i])
                for i in range(depth)
            ]
        )
        self.norm_f = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = layer_feature_info(depth, embed_dim, self.patch_embed.patch_size[0])
        self.init_weights()

    def init_weights(self):
        """The official initialisation.

        patch_embed.proj: lecun-normal, zero bias; pos_embed / cls_token: trunc-normal 0.02; head:
        trunc-normal 0.02, zero bias; every Linear bias zeroed (the SwiGLU biases); each mixer
        out_proj.weight kaiming-uniform(a=sqrt 5) divided by sqrt(depth); in_proj, conv1d and the
        SwiGLU weights keep PyTorch's default; dt_bias, A_log and D are set by the mixer.
        """
        lecun_normal_(self.patch_embed.proj.weight)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        rescale_out_proj(self.layers, self.depth)

    def layer_is_flipped(self, index: int) -> bool:
        """Whether layer `index` flips its patch tokens (see `flip_schedule`)."""
        return layer_flips(self.flip_schedule, index)

    # ------------------------------------------------------------------ forward
    def _run_layer(self, index: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._checkpointed(layer, x, self.layer_is_flipped(index))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, patches + 1, embed_dim): patches in image order, class
        token last."""
        x, _ = self._embed(x)
        for i, layer in enumerate(self.layers):
            x = self._run_layer(i, layer, x)
        return self.norm_f(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns per-block outputs, like timm's ViT.

        The output of block i is its output stream (image order: a flipping block flips back),
        normalised with `norm_f` when `norm`; the class token is split off (returned as
        `(spatial, class token (B, 1, C))` pairs when `return_prefix_tokens`).

        Args:
            indices: last n blocks if int, all if None, else the listed blocks (negative from the end).
            output_fmt: "NCHW" (B, C, H/p, W/p) or "NLC" (B, H/p * W/p, C).
            stop_early: stop after the last requested block (the final output then covers those).
            intermediates_only: return only the list.
        Returns:
            (final normalised tokens as forward_features gives them, intermediates) or the list alone.
        """
        check_intermediates_args(output_fmt)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        take = set(take_indices)
        x, grid = self._embed(x)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates, prefixes = [], []
        for i, layer in enumerate(layers):
            x = self._run_layer(i, layer, x)
            if i in take:
                y = self.norm_f(x) if norm else x
                spatial, prefix = split_class_token(y, self.class_token)
                if output_fmt == "NCHW":
                    spatial = tokens_to_map(spatial, grid)
                intermediates.append(spatial)
                prefixes.append(prefix)
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self.norm_f(x), intermediates


# ---------------------------------------------------------------------- timm registration
_ADVENTURER_PAPER = dict(paper_ids="arXiv:2410.07599",
                         paper_name="Causal Image Modeling for Efficient Visual Understanding")

default_cfgs = generate_default_cfgs(
    {
        "adventurer_tiny_patch16_224": default_cfg(**_ADVENTURER_PAPER),
        "adventurer_small_patch16_224": default_cfg(**_ADVENTURER_PAPER),
        "lb_adventurer_tiny_patch16_224": default_cfg(**LBMAMBA_PAPER),
        "lb_adventurer_small_patch16_224": default_cfg(**LBMAMBA_PAPER),
    }
)

ADVENTURER_ARGS = dict(patch_size=16, depth=12, d_state=64, expand=2, headdim=64, window=1)
LB_ADVENTURER_ARGS = dict(ADVENTURER_ARGS, window="auto")

_build = partial(build_with_cfg, Adventurer)


@register_model
def adventurer_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """Adventurer-T: width 256, depth 12, Mamba-2 (N 64, 8 heads), class token last (11.6 M params)."""
    return _build("adventurer_tiny_patch16_224", pretrained, dict(ADVENTURER_ARGS, embed_dim=256), **kwargs)


@register_model
def adventurer_small_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """Adventurer-S: width 512, depth 12 (44.5 M params)."""
    return _build("adventurer_small_patch16_224", pretrained, dict(ADVENTURER_ARGS, embed_dim=512), **kwargs)


@register_model
def lb_adventurer_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """LB-Adventurer-T: Adventurer-T with the LB scan (window "auto"; W 8 at 224 px)."""
    return _build("lb_adventurer_tiny_patch16_224", pretrained, dict(LB_ADVENTURER_ARGS, embed_dim=256), **kwargs)


@register_model
def lb_adventurer_small_patch16_224(pretrained: bool = False, **kwargs) -> Adventurer:
    """LB-Adventurer-S: Adventurer-S with the LB scan (window "auto")."""
    return _build("lb_adventurer_small_patch16_224", pretrained, dict(LB_ADVENTURER_ARGS, embed_dim=512), **kwargs)
