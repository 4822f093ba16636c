"""LocalVim (LocalMamba's plain model, arXiv 2403.09338) and its LB version, registered with timm.

A plain vision Mamba like Vim: a 16x16 patch embedding (images padded to a multiple of the patch),
an absolute position embedding, ``depth`` residual blocks (Add -> RMSNorm -> mixer, residual stream in
float32), ``norm_f``, pooling and a linear head. Its mixer is `lbmamba.nn.MultiMamba`: four Mamba-1
branches per layer, each scanning the tokens in its own direction (raster ``h``, column-major ``v``,
raster inside 2x2 / 7x7 windows ``w2`` / ``w7``, or one of them reversed), with per-layer directions
found by the authors' search. LocalVim-T and -S also rotate the hidden states and the residual stream
with a 2-D RoPE before every layer; the middle-class-token variant has no RoPE and pools its class token.

The LB versions (``lb_*``) only change the scans: every direction's scan is the LB scan with window
"auto" (chosen from that direction's own sequence length: 196 tokens at 224 px -> W 8; the padded
length for windowed directions, the class token included). Parameters and names are unchanged, so the
official checkpoints load into both.

Reproduced from the official code (hunto/LocalMamba, classification/lib/models/local_vim.py):
PatchEmbed with dynamic padding; the searched directions of ``local_vim_tiny``; ``local_vim_small`` as
its *second* definition in the file (``(h, h_flip, w2, w2_flip)`` in every layer); RoPE applied to the
hidden states and (``rope_residual``) the residual stream before every layer (not after the last);
mean pooling over all tokens, or the middle class token when there is one; on another input size,
position embedding and RoPE tables resized bicubically (align_corners False, no antialiasing); the
weight initialisation (`init_weights`). The model follows timm's vision_transformer.py API.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..nn.block import Block
from ..nn.local_scan import V_REVERSE, as_direction_lists
from ..nn.multi_mamba import MultiMamba
from ..nn.norm import RMSNorm, add_norm
from ..nn.pos_embed import resample_pos_embed, split_class_token
from ..nn.rope import GridRope
from ._build import LBMAMBA_PAPER, build_with_cfg, checkpoint_filter_fn, default_cfg
from ._family import (
    PlainModelMixin,
    check_intermediates_args,
    layer_drop_path_rates,
    layer_feature_info,
    rescale_out_proj,
    residual_stream_output,
    tokens_to_map,
)

__all__ = ["LocalVisionMamba", "checkpoint_filter_fn", "LOCALVIM_TINY_DIRECTIONS", "LOCALVIM_SMALL_DIRECTIONS"]

#: LocalVim-T's searched directions, layers 0-19 (official `local_vim_tiny`)
LOCALVIM_TINY_DIRECTIONS = (
    ("h", "v_flip", "w7", "w7_flip"),
    ("h_flip", "w2_flip", "w7", "w7_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "w2", "w2_flip"),
    ("v", "v_flip", "w2", "w7"),
    ("h", "h_flip", "v", "w2"),
    ("h", "h_flip", "w2_flip", "w7"),
    ("v", "v_flip", "w2", "w2_flip"),
)
#: LocalVim-S: the second (winning) `local_vim_small` definition of the official file
LOCALVIM_SMALL_DIRECTIONS = (("h", "h_flip", "w2", "w2_flip"),) * 20

class _LocalBlock(Block):
    """`lbmamba.nn.Block` whose mixer also gets the token grid."""

    def forward(self, hidden_states, residual=None, grid=None):
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        hidden_states, residual = add_norm(hidden_states, residual, self.norm, self.residual_in_fp32)
        return self.mixer(hidden_states, grid), residual


def _layer_directions(directions, depth: int) -> Tuple[Tuple[str, ...], ...]:
    if directions is None:
        directions = LOCALVIM_TINY_DIRECTIONS
    directions = list(directions)
    if directions and all(isinstance(d, str) for d in directions):
        directions = [directions]  # one list for every layer
    per_layer = as_direction_lists(directions)
    if not per_layer:
        raise ValueError("directions must name at least one layer's directions")
    return tuple(per_layer[i % len(per_layer)] for i in range(depth))


class LocalVisionMamba(PlainModelMixin, nn.Module):
    """LocalVim: a plain vision Mamba with LocalMamba's multi-direction mixer (LocalVim-T / -S / the middle
    class token variant; the LB versions with window "auto").

    Args:
        img_size: image size the position embedding and the RoPE tables are built for (any input size runs:
            images are padded to a multiple of the patch, the tables resized on the fly).
        patch_size, in_chans, num_classes: as in timm.
        global_pool: "mean" (over the patch tokens), "token" (the class token) or "" (none); None picks the
            official choice: "token" with a class token, else "mean".
        embed_dim, depth: width and number of layers.
        directions: each layer's scan directions: a list of per-layer lists (layer i uses entry
            i % len(directions)) or one list for every layer; None = LocalVim-T's searched directions.
        d_state, d_conv, expand: mixer sizes. ssm_cfg: further `MultiMamba` kwargs (dt_rank, dt_min...).
        window: the LB window of every scan: "auto" (default, the LB models) or a positive int; 1 is the
            official (vanilla Mamba-1) scan.
        class_token: None (default) or "middle" (the official middle-class-token variant: the token sits at
            index num_patches // 2 and is re-inserted at that index of every direction's sequence).
        rope: 2-D RoPE on the hidden states before every layer (official LocalVim-T / -S: True; not
            with a class token). rope_residual: also on the residual stream (official: True).
        rope_pt_seq_len, rope_theta: RoPE positions span this many steps (official 14), frequency base.
        v_reverse: "exact" (default) or "official" (the reference code's v reverse, which differs from the
            inverse on non-square grids; see `lbmamba.nn.local_scan`).
        norm_eps: RMSNorm eps. residual_in_fp32: keep the residual stream in float32.
        drop_rate: dropout after the position embedding (the official `drop_rate`).
        drop_path_rate: stochastic depth: layer i gets ([0] + linspace(0, rate, depth))[i], the final add
            `rate` (official; LocalVim-T was trained with 0.1).
    """

    global_pools = ("", "mean", "token")
    class_token_places = (None, "middle")
    pos_embed_antialias = False  # the official code's bicubic resize (mmseg's), no antialiasing
    stem_pattern = r"^cls_token|^pos_embed|^patch_embed|^rope"

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Optional[str] = None,
        embed_dim: int = 192,
        depth: int = 20,
        directions=None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        window="auto",
        class_token: Optional[str] = None,
        rope: bool = True,
        rope_residual: bool = True,
        rope_pt_seq_len: int = 14,
        rope_theta: float = 10000.0,
        v_reverse: str = "exact",
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ssm_cfg: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self._check_class_token(class_token)
        if rope and class_token is not None:
            raise ValueError("rope=True with a class token is not a LocalVim configuration (the official class "
                             "token variant has no RoPE): pass rope=False")
        if v_reverse not in V_REVERSE:
            raise ValueError(f"v_reverse must be one of {V_REVERSE}, got {v_reverse!r}")
        if global_pool is None:
            global_pool = "token" if class_token else "mean"
        self.class_token = class_token
        self.global_pool = self._check_pool(global_pool, class_token)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth = depth
        self.num_prefix_tokens = 0 if class_token is None else 1
        self.residual_in_fp32 = residual_in_fp32
        self.rope_residual = rope_residual
        self.window = window
        self.dynamic_img_size = True
        self.directions = _layer_directions(directions, depth)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False, dynamic_img_pad=True)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token is not None else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.rope = GridRope(embed_dim, self.patch_embed.grid_size, rope_pt_seq_len, rope_theta) if rope else None

        dpr = layer_drop_path_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList([
            _LocalBlock(
                embed_dim,
                mixer_cls=lambda dim, i=i: MultiMamba(
                    dim, self.directions[i], d_state=d_state, d_conv=d_conv, expand=expand, window=window,
                    class_token=class_token is not None, v_reverse=v_reverse, layer_idx=i, **(ssm_cfg or {})),
                norm_layer=lambda dim: RMSNorm(dim, eps=norm_eps),
                residual_in_fp32=residual_in_fp32,
                drop_path=dpr[i],
            )
            for i in range(depth)
        ])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Identity()  # LocalVim has no dropout before the classifier (`drop_rate` is pos_drop)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = layer_feature_info(depth, embed_dim, self.patch_embed.patch_size[0])
        self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    def init_weights(self):
        """The official initialisation.

        Every Linear layer (in_proj, x_proj_k, dt_proj_k, out_proj, the gate's, head): weight
        trunc-normal(0.02), bias zero: dt_proj_k included, so the official model starts with step sizes
        softplus(0) and dt_proj_k weights of std 0.02 rather than Mamba's dt initialisation; LayerNorm
        weight 1, bias 0; pos_embed trunc-normal(0.02); cls_token zero; out_proj.weight kaiming-uniform
        (a = sqrt 5) / sqrt(depth); patch_embed.proj, conv1d_k, A_log_k (S4D-real), D_k (ones) and the
        RMSNorm weights (ones) keep their own initialisation.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        rescale_out_proj(self.layers, self.depth)

    # ------------------------------------------------------------------ timm API
    def checkpoint_filter(self, state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Adapt an official (or our own) LocalVim checkpoint to this model (hook used by
        `lbmamba.load_checkpoint` and timm's pretrained loading).

        Unwraps `{'model': ...}` (the official training checkpoints, which also hold 'ema_model' and
        'optimizer') / `{'state_dict': ...}` (their converted files) and `module.` / `_orig_mod.` prefixes.
        When the checkpoint was trained on another grid, `pos_embed` (the middle class token's entry kept)
        and `rope.freqs_cos` / `rope.freqs_sin` are resized bicubically to the model's grid, as the official
        dense backbone does. A checkpoint without the RoPE tables gets the model's own (they are not learned).
        """
        state_dict = dict(super().checkpoint_filter(state_dict))
        if self.rope is not None:
            for name in ("freqs_cos", "freqs_sin"):
                key, own = f"rope.{name}", getattr(self.rope, name)
                table = state_dict.get(key)
                if table is None:
                    state_dict[key] = own.detach().clone()
                elif table.dim() == 2 and table.shape != own.shape:
                    state_dict[key] = resample_pos_embed(table.float(), self.pos_embed_grid,
                                                         antialias=False).to(table.dtype)
        return state_dict

    # ------------------------------------------------------------------ forward
    def _rope_tables(self, grid):
        return None if self.rope is None else self.rope.tables(grid)

    def _run_layer(self, i: int, layer: nn.Module, hidden, residual, grid, rope):
        if rope is not None:
            hidden = GridRope.rotate(hidden, *rope)
            if residual is not None and self.rope_residual:
                residual = GridRope.rotate(residual, *rope)
        return self._checkpointed(layer, hidden, residual, grid)

    def _final_norm(self, hidden, residual) -> torch.Tensor:
        x, _ = add_norm(self.drop_path(hidden), residual, self.norm_f, self.residual_in_fp32)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, tokens, embed_dim) in image order (class token included)."""
        x, grid = self._embed(x)
        rope = self._rope_tables(grid)
        hidden, residual = x, None
        for i, layer in enumerate(self.layers):
            hidden, residual = self._run_layer(i, layer, hidden, residual, grid, rope)
        return self._final_norm(hidden, residual)

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
        """Forward that also returns per-layer outputs, like timm's ViT (and `lbmamba.models.VisionMamba`).

        The output of layer i is its residual stream, residual + mixer output (drop path not applied),
        normalised with `norm_f` when `norm`; with `source="mixer"` it is the mixer output alone (the
        block's `hidden_states`: what the official dense backbone takes, from layers 4, 9, 14, 19, each
        through its own LayerNorm). The class token is split off (returned as `(spatial, prefix)` pairs
        when `return_prefix_tokens`).

        Args:
            indices: last n layers if int, all if None, else the listed layers (negative from the end).
            output_fmt: "NCHW" (B, C, H/p, W/p) or "NLC" (B, H/p * W/p, C).
            stop_early: stop after the last requested layer.  intermediates_only: return only the list.
            source: "residual" (the residual stream) or "mixer" (the mixer output; not with `norm`).
        """
        check_intermediates_args(output_fmt, source, norm)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        take = set(take_indices)
        x, grid = self._embed(x)
        rope = self._rope_tables(grid)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates, prefixes = [], []
        hidden, residual = x, None
        for i, layer in enumerate(layers):
            hidden, residual = self._run_layer(i, layer, hidden, residual, grid, rope)
            if i in take:
                y = residual_stream_output(hidden, residual, source, self.norm_f if norm else None,
                                           self.residual_in_fp32)
                y, prefix = split_class_token(y, self.class_token)
                if output_fmt == "NCHW":
                    y = tokens_to_map(y, grid)
                intermediates.append(y)
                prefixes.append(prefix)
        if return_prefix_tokens and self.class_token is not None:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual), intermediates


# ---------------------------------------------------------------------- timm registration
_cfg = partial(default_cfg, license="apache-2.0")

_LOCALMAMBA_PAPER = dict(paper_ids="arXiv:2403.09338",
                         paper_name="LocalMamba: Visual State Space Model with Windowed Selective Scan")

default_cfgs = generate_default_cfgs(
    {
        "localvim_tiny": _cfg(**_LOCALMAMBA_PAPER),
        "lb_localvim_tiny": _cfg(**LBMAMBA_PAPER),
        "localvim_tiny_middle_cls_token": _cfg(**_LOCALMAMBA_PAPER),
        "lb_localvim_tiny_middle_cls_token": _cfg(**LBMAMBA_PAPER),
        "localvim_small": _cfg(**_LOCALMAMBA_PAPER),
        "lb_localvim_small": _cfg(**LBMAMBA_PAPER),
    }
)

TINY_ARGS = dict(patch_size=16, embed_dim=192, depth=20, directions=LOCALVIM_TINY_DIRECTIONS, rope=True,
                 rope_residual=True, class_token=None)
TINY_MIDDLE_CLS_ARGS = dict(TINY_ARGS, rope=False, rope_residual=False, class_token="middle")
SMALL_ARGS = dict(TINY_ARGS, embed_dim=384, directions=LOCALVIM_SMALL_DIRECTIONS)


_build = partial(build_with_cfg, LocalVisionMamba)


@register_model
def localvim_tiny(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-T (official `local_vim_tiny`): width 192, 20 layers of searched directions, RoPE, vanilla scans
    (7,994,152 params)."""
    return _build("localvim_tiny", pretrained, dict(TINY_ARGS, window=1), **kwargs)


@register_model
def lb_localvim_tiny(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-T with every scan an LB scan (window "auto")."""
    return _build("lb_localvim_tiny", pretrained, dict(TINY_ARGS, window="auto"), **kwargs)


@register_model
def localvim_tiny_middle_cls_token(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-T with a middle class token and no RoPE (official `local_vim_tiny_middle_cls_token`)."""
    return _build("localvim_tiny_middle_cls_token", pretrained, dict(TINY_MIDDLE_CLS_ARGS, window=1), **kwargs)


@register_model
def lb_localvim_tiny_middle_cls_token(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """The middle-class-token LocalVim-T with LB scans (window "auto")."""
    return _build("lb_localvim_tiny_middle_cls_token", pretrained, dict(TINY_MIDDLE_CLS_ARGS, window="auto"), **kwargs)


@register_model
def localvim_small(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-S (official `local_vim_small`, its second definition): width 384, (h, h_flip, w2, w2_flip) in
    all 20 layers, RoPE, vanilla scans."""
    return _build("localvim_small", pretrained, dict(SMALL_ARGS, window=1), **kwargs)


@register_model
def lb_localvim_small(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-S with LB scans (window "auto")."""
    return _build("lb_localvim_small", pretrained, dict(SMALL_ARGS, window="auto"), **kwargs)
