"""LBVim and Vim: plain (non-hierarchical) vision Mamba backbones, registered with timm.

One class, `VisionMamba`, covers both families:

* LBVim (LBMamba paper, arXiv 2506.15976): one LB scan per layer (window "auto"), no class token,
  the token sequence (hidden states and residual stream) flipped after every layer, mean pooling
  (or the attention-pooling head of `lbvim_528_patch16_224_atthead`).
* Vim (arXiv 2401.09417): the bidirectional "v2" mixer (two plain scans, (y_f + y_b) / 2), a class
  token inserted in the middle of the patch sequence, class-token pooling, no flips.
* uVim: LBVim with window 1 (plain unidirectional Mamba scan per layer, with the flips).

Parameter names match the reference code bases, so their `{'model': state_dict}` checkpoints load
as they are (see docs/models.md). The model follows timm's vision_transformer.py API:
`forward_features`, `forward_head`, `forward_intermediates`, `prune_intermediate_layers`,
`reset_classifier`, `get_classifier`, `set_grad_checkpointing`, `no_weight_decay`, `group_matcher`,
and `features_only=True` through timm's feature getter.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, PatchEmbed, lecun_normal_, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..nn import AttentionPoolHead, Block, Mamba, RMSNorm, add_norm
from ..nn.pos_embed import split_class_token
from ._build import LBMAMBA_PAPER, build_with_cfg, default_cfg
from ._family import (
    PlainModelMixin,
    check_intermediates_args,
    layer_drop_path_rates,
    layer_feature_info,
    linear_head,
    rescale_out_proj,
    residual_stream_output,
    tokens_to_map,
)

__all__ = ["VisionMamba"]


def _norm_layer(norm_layer, eps: float):
    if callable(norm_layer) and not isinstance(norm_layer, str):
        return norm_layer
    name = str(norm_layer).lower()
    if name == "rmsnorm":
        return partial(RMSNorm, eps=eps)
    if name == "layernorm":
        return partial(nn.LayerNorm, eps=eps)
    raise ValueError(f"norm_layer must be 'rmsnorm', 'layernorm' or a callable, got {norm_layer!r}")


class VisionMamba(PlainModelMixin, nn.Module):
    """Plain vision Mamba backbone (LBVim / Vim / uVim).

    Args:
        img_size: image size the position embedding is built for (any size divisible by the patch
            runs: the embedding is resampled on the fly when the grid differs).
        patch_size, in_chans, num_classes: as in timm.
        global_pool: "mean" (over patch tokens), "token" (the class token), "attn" (AttentionPoolHead,
            stored as `head.0`, the classifier as `head.1`) or "" (no pooling).
        embed_dim, depth: width and number of layers.
        d_state, d_conv, expand: mixer sizes.  ssm_cfg: further `Mamba` kwargs (dt_rank, dt_min...).
        scan: "lb", "forward" or "bi" (see `lbmamba.nn.Mamba`).  window: LB window ("auto" or int).
        if_divide_out: scan="bi": average the two directions.
        class_token: None, "middle" (Vim's mid class token, index num_patches // 2) or "head".
        flip_every_layer: flip hidden states and residual stream after every layer (LBVim).
        norm_layer: "rmsnorm", "layernorm" or a callable; norm_eps its eps.
        residual_in_fp32: keep the residual stream in float32.
        drop_rate: dropout before the classifier.  pos_drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth; layer i gets ([0] + linspace(0, rate, depth))[i], the final
            add gets `rate`, as in Vim.
        attn_pool_heads: heads of the attention-pooling head.
    """

    global_pools = ("", "mean", "token", "attn")
    class_token_places = (None, "middle", "head")
    #: as the reference Vim code: the SSM parameters marked `_no_weight_decay` (A_log, D) are not listed
    no_weight_decay_marked = False

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "mean",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        scan: str = "lb",
        window="auto",
        if_divide_out: bool = True,
        class_token: Optional[str] = None,
        flip_every_layer: bool = True,
        norm_layer="rmsnorm",
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_pool_heads: int = 6,
        ssm_cfg: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self._check_class_token(class_token)
        global_pool = self._check_pool(global_pool, class_token)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth = depth
        self.class_token = class_token
        self.num_prefix_tokens = 0 if class_token is None else 1
        self.flip_every_layer = flip_every_layer
        self.residual_in_fp32 = residual_in_fp32
        self.attn_pool_heads = attn_pool_heads
        self.dynamic_img_size = True
        norm_layer = _norm_layer(norm_layer, norm_eps)

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, strict_img_size=False
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token is not None else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        mixer_cls = partial(
            Mamba, d_state=d_state, d_conv=d_conv, expand=expand, scan=scan, window=window,
            if_divide_out=if_divide_out, **(ssm_cfg or {}),
        )
        dpr = layer_drop_path_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    mixer_cls=partial(mixer_cls, layer_idx=i),
                    norm_layer=norm_layer,
                    residual_in_fp32=residual_in_fp32,
                    drop_path=dpr[i],
                )
                for i in range(depth)
            ]
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes, global_pool)
        self.feature_info = layer_feature_info(depth, embed_dim, self.patch_embed.patch_size[0])
        self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    def _make_head(self, num_classes: int, global_pool: str, attn_pool: Optional[nn.Module] = None) -> nn.Module:
        classifier = linear_head(self.embed_dim, num_classes)
        if global_pool == "attn":
            attn_pool = attn_pool or AttentionPoolHead(self.embed_dim, self.attn_pool_heads)
            return nn.Sequential(attn_pool, classifier)
        return classifier

    def init_weights(self):
        """Vim's initialisation (docs/models.md).

        patch_embed.proj: lecun-normal, zero bias; pos_embed / cls_token: trunc-normal 0.02; head:
        trunc-normal 0.02, zero bias; every Linear bias zeroed except dt_proj biases (marked
        `_no_reinit`); each out_proj.weight kaiming-uniform(a=sqrt 5) then divided by sqrt(depth);
        other mixer Linear layers keep PyTorch's default (as the reference code does); A_log, D and the
        dt projections are set by the mixer itself.
        """
        lecun_normal_(self.patch_embed.proj.weight)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
        rescale_out_proj(self.layers, self.depth)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head[1] if self.global_pool == "attn" else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        attn_pool = self.head[0] if self.global_pool == "attn" else None
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool, self.class_token)
        if self.global_pool != "attn":
            attn_pool = None
        device = self.pos_embed.device
        self.head = self._make_head(num_classes, self.global_pool, attn_pool).to(device)

    # ------------------------------------------------------------------ forward
    def layer_is_flipped(self, index: int) -> bool:
        """Whether layer `index` sees the token sequence reversed (odd layers when flip_every_layer)."""
        return self.flip_every_layer and index % 2 == 1

    def _final_norm(self, hidden, residual, flipped: bool) -> torch.Tensor:
        x, _ = add_norm(self.drop_path(hidden), residual, self.norm_f, self.residual_in_fp32)
        return x.flip(1) if flipped else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, tokens, embed_dim) in image order (class token included)."""
        x, _ = self._embed(x)
        hidden, residual = x, None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = self._checkpointed(layer, hidden, residual)
            if self.flip_every_layer and i < last:
                hidden, residual = hidden.flip(1), residual.flip(1)
        return self._final_norm(hidden, residual, self.layer_is_flipped(last))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.head[0](x) if self.global_pool == "attn" else super().pool(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        source: str = "residual",
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns per-layer outputs, like timm's ViT.

        The output of layer i is its residual stream, residual + mixer output (what the next layer adds
        and normalises; drop path is not applied to it), normalised with `norm_f` when `norm`; with
        `source="mixer"` it is the mixer output alone (the block's `hidden_states`, what the LBMamba and
        Vim segmentation backbones take). Spatial outputs are always in image order, also from layers that
        saw the sequence flipped. The class token is split off (returned as `(spatial, prefix)` pairs when
        `return_prefix_tokens`).

        Args:
            indices: last n layers if int, all if None, else the listed layers (negative from the end).
            output_fmt: "NCHW" (B, C, H/p, W/p) or "NLC" (B, H/p * W/p, C).
            stop_early: stop after the last requested layer (then the final output covers those layers).
            intermediates_only: return only the list.
            source: "residual" (the residual stream) or "mixer" (the mixer output; not with `norm`).
        Returns:
            (final normalised tokens as forward_features gives them, intermediates) or the list alone.
        """
        check_intermediates_args(output_fmt, source, norm)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        take = set(take_indices)
        x, grid = self._embed(x)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        last = len(layers) - 1
        intermediates, prefixes = [], []
        hidden, residual = x, None
        for i, layer in enumerate(layers):
            hidden, residual = self._checkpointed(layer, hidden, residual)
            flipped = self.layer_is_flipped(i)
            if i in take:
                y = residual_stream_output(hidden, residual, source, self.norm_f if norm else None,
                                           self.residual_in_fp32)
                if flipped:
                    y = y.flip(1)
                y, prefix = split_class_token(y, self.class_token)
                if output_fmt == "NCHW":
                    y = tokens_to_map(y, grid)
                intermediates.append(y)
                prefixes.append(prefix)
            if self.flip_every_layer and i < last:
                hidden, residual = hidden.flip(1), residual.flip(1)
        if return_prefix_tokens and self.class_token is not None:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual, self.layer_is_flipped(last)), intermediates


# ---------------------------------------------------------------------- timm registration
_cfg = partial(default_cfg, license="apache-2.0")
_VIM_PAPER = dict(paper_ids="arXiv:2401.09417", paper_name="Vision Mamba")

VIM_ALIASES = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_224",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_patch16_224",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base_patch16_224",
}

default_cfgs = generate_default_cfgs(
    {
        "lbvim_tiny_patch16_224": _cfg(**LBMAMBA_PAPER),
        "lbvim_300_patch16_224": _cfg(**LBMAMBA_PAPER),
        "lbvim_small_patch16_224": _cfg(**LBMAMBA_PAPER),
        "lbvim_528_patch16_224_atthead": _cfg(classifier="head.1", **LBMAMBA_PAPER),
        "uvim_tiny_patch16_224": _cfg(**LBMAMBA_PAPER),
        "vim_tiny_patch16_224": _cfg(**_VIM_PAPER),
        "vim_small_patch16_224": _cfg(**_VIM_PAPER),
        "vim_base_patch16_224": _cfg(**_VIM_PAPER),
    }
)

LBVIM_ARGS = dict(
    patch_size=16, depth=24, scan="lb", window="auto", class_token=None, flip_every_layer=True,
    global_pool="mean", norm_layer="rmsnorm", residual_in_fp32=True,
)
VIM_ARGS = dict(
    patch_size=16, depth=24, scan="bi", if_divide_out=True, class_token="middle", flip_every_layer=False,
    global_pool="token", norm_layer="rmsnorm", residual_in_fp32=True,
)

_build = partial(build_with_cfg, VisionMamba)


@register_model
def lbvim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-T: width 192, depth 24, LB scan (window auto), flips, mean pooling (6.4 M params)."""
    return _build("lbvim_tiny_patch16_224", pretrained, dict(LBVIM_ARGS, embed_dim=192), **kwargs)


@register_model
def lbvim_300_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-300: width 300 (14.9 M params)."""
    return _build("lbvim_300_patch16_224", pretrained, dict(LBVIM_ARGS, embed_dim=300), **kwargs)


@register_model
def lbvim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-S: width 384 (23.9 M params)."""
    return _build("lbvim_small_patch16_224", pretrained, dict(LBVIM_ARGS, embed_dim=384), **kwargs)


@register_model
def lbvim_528_patch16_224_atthead(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-528 with the attention-pooling head (6 heads) (44.8 M params)."""
    args = dict(LBVIM_ARGS, embed_dim=528, global_pool="attn", attn_pool_heads=6)
    return _build("lbvim_528_patch16_224_atthead", pretrained, args, **kwargs)


@register_model
def uvim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """uVim-T: LBVim-T with window 1 (a plain forward Mamba scan per layer, still flipped every layer)."""
    return _build("uvim_tiny_patch16_224", pretrained, dict(LBVIM_ARGS, embed_dim=192, window=1), **kwargs)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-T: width 192, bidirectional v2 mixer (/2), middle class token (7 M params)."""
    return _build("vim_tiny_patch16_224", pretrained, dict(VIM_ARGS, embed_dim=192), **kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: width 384 (26 M params)."""
    return _build("vim_small_patch16_224", pretrained, dict(VIM_ARGS, embed_dim=384), **kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: width 768 (98 M params)."""
    return _build("vim_base_patch16_224", pretrained, dict(VIM_ARGS, embed_dim=768), **kwargs)


def _register_alias(alias: str, name: str) -> None:
    """Register the reference code's name `alias` for the model `name` (the same model, no warning)."""
    model_fn = globals()[name]

    def entrypoint(pretrained: bool = False, **kwargs) -> VisionMamba:
        return model_fn(pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = alias
    entrypoint.__doc__ = f"The reference code's name for {name} (the same model)."
    globals()[alias] = register_model(entrypoint)  # timm lists it in this module's __all__: it must exist here


for _alias, _name in VIM_ALIASES.items():
    _register_alias(_alias, _name)
