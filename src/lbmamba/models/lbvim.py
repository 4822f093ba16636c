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

import math
from functools import partial
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

try:  # timm >= 1.0.12
    from timm.models import checkpoint
except ImportError:  # pragma: no cover
    from torch.utils.checkpoint import checkpoint as _torch_checkpoint

    def checkpoint(function, *args, **kwargs):
        return _torch_checkpoint(function, *args, use_reentrant=False, **kwargs)

from ..nn import AttentionPoolHead, Block, Mamba, RMSNorm, add_norm
from ._build import build_with_cfg
from .checkpoint import unwrap_state_dict

__all__ = ["VisionMamba", "checkpoint_filter_fn", "resample_pos_embed"]

CLASS_TOKEN_POSITIONS = (None, "middle", "head")
GLOBAL_POOLS = ("", "mean", "token", "attn")
#: what `forward_intermediates` returns per layer: the residual stream or the mixer output
INTERMEDIATE_SOURCES = ("residual", "mixer")


def class_token_index(num_patches: int, class_token: Optional[str]) -> Optional[int]:
    """Index of the class token in a sequence holding `num_patches` patch tokens (None without one)."""
    if class_token is None:
        return None
    return num_patches // 2 if class_token == "middle" else 0


def _split_class_token(x: torch.Tensor, index: Optional[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(patch tokens, class token (B, 1, C) or None) from a (B, L, C) sequence."""
    if index is None:
        return x, None
    return torch.cat([x[:, :index], x[:, index + 1 :]], dim=1), x[:, index : index + 1]


def _insert_class_token(x: torch.Tensor, token: torch.Tensor, class_token: Optional[str]) -> torch.Tensor:
    index = class_token_index(x.shape[1], class_token)
    if index is None:
        return x
    return torch.cat([x[:, :index], token, x[:, index:]], dim=1)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Tuple[int, int],
    old_grid: Optional[Tuple[int, int]] = None,
    class_token: Optional[str] = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a (1, tokens, C) absolute position embedding to `new_grid` patches.

    The class token's entry (middle or head of the sequence, as `class_token` says) is kept as it is
    and re-inserted at the class token's position in the new sequence. `old_grid` defaults to a
    square grid.
    """
    num_prefix = 0 if class_token is None else 1
    num_old = pos_embed.shape[1] - num_prefix
    if old_grid is None:
        side = int(round(math.sqrt(num_old)))
        if side * side != num_old:
            raise ValueError(
                f"cannot infer the position-embedding grid of {num_old} patch tokens (not a square); pass old_grid"
            )
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != num_old:
        raise ValueError(f"old_grid {old_grid} does not match {num_old} patch tokens in pos_embed")
    if old_grid == new_grid:
        return pos_embed
    patches, token = _split_class_token(pos_embed, class_token_index(num_old, class_token))
    patches = resample_abs_pos_embed(
        patches, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0,
        interpolation=interpolation, antialias=antialias,
    )
    return patches if token is None else _insert_class_token(patches, token, class_token)


def _norm_layer(norm_layer, eps: float):
    if callable(norm_layer) and not isinstance(norm_layer, str):
        return norm_layer
    name = str(norm_layer).lower()
    if name == "rmsnorm":
        return partial(RMSNorm, eps=eps)
    if name == "layernorm":
        return partial(nn.LayerNorm, eps=eps)
    raise ValueError(f"norm_layer must be 'rmsnorm', 'layernorm' or a callable, got {norm_layer!r}")


class VisionMamba(nn.Module):
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
        if class_token not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token must be one of {CLASS_TOKEN_POSITIONS}, got {class_token!r}")
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
        self.grad_checkpointing = False
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
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # [0] + linspace(0, rate, depth)
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
        self.feature_info = [
            dict(module=f"layers.{i}", num_chs=embed_dim, reduction=self.patch_embed.patch_size[0])
            for i in range(depth)
        ]
        self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_pool(global_pool: str, class_token: Optional[str]) -> str:
        global_pool = {"avg": "mean", None: ""}.get(global_pool, global_pool)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('avg' = 'mean'), got {global_pool!r}")
        if global_pool == "token" and class_token is None:
            raise ValueError("global_pool='token' needs a class token: set class_token='middle' or 'head'")
        return global_pool

    def _make_head(self, num_classes: int, global_pool: str, attn_pool: Optional[nn.Module] = None) -> nn.Module:
        classifier = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(classifier, nn.Linear):
            trunc_normal_(classifier.weight, std=0.02)
            nn.init.zeros_(classifier.bias)
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
        for layer in self.layers:
            out_proj = layer.mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight.div_(math.sqrt(self.depth))

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        names = {"pos_embed", "cls_token"}
        names.update(name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False))
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

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

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Hook used by `lbmamba.load_checkpoint`: unwrap and resize pos_embed for this model."""
        return checkpoint_filter_fn(state_dict, self)

    # ------------------------------------------------------------------ forward
    def _pos_embed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if self.cls_token is not None:
            x = _insert_class_token(x, self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), self.class_token)
        pos_embed = self.pos_embed
        if tuple(grid) != tuple(self.patch_embed.grid_size):
            pos_embed = resample_pos_embed(pos_embed, grid, self.patch_embed.grid_size, self.class_token)
        return self.pos_drop(x + pos_embed.to(x.dtype))

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        x = self.patch_embed(x)
        return self._pos_embed(x, grid), grid

    def layer_is_flipped(self, index: int) -> bool:
        """Whether layer `index` sees the token sequence reversed (odd layers when flip_every_layer)."""
        return self.flip_every_layer and index % 2 == 1

    def _run_layer(self, layer: nn.Module, hidden, residual):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(layer, hidden, residual)
        return layer(hidden, residual)

    def _final_norm(self, hidden, residual, flipped: bool) -> torch.Tensor:
        x, _ = add_norm(self.drop_path(hidden), residual, self.norm_f, self.residual_in_fp32)
        return x.flip(1) if flipped else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, tokens, embed_dim) in image order (class token included)."""
        x, _ = self._embed(x)
        hidden, residual = x, None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = self._run_layer(layer, hidden, residual)
            if self.flip_every_layer and i < last:
                hidden, residual = hidden.flip(1), residual.flip(1)
        return self._final_norm(hidden, residual, self.layer_is_flipped(last))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "attn":
            return self.head[0](x)
        if self.global_pool == "":
            return x
        index = class_token_index(x.shape[1] - self.num_prefix_tokens, self.class_token)
        if self.global_pool == "token":
            return x[:, index]
        patches, _ = _split_class_token(x, index)
        return patches.mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if source not in INTERMEDIATE_SOURCES:
            raise ValueError(f"source must be one of {INTERMEDIATE_SOURCES}, got {source!r}")
        if norm and source == "mixer":
            raise ValueError("norm=True normalises the residual stream with norm_f; it does not apply to "
                             "source='mixer' (the mixer output)")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        take = set(take_indices)
        batch = x.shape[0]
        x, grid = self._embed(x)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        last = len(layers) - 1
        intermediates, prefixes = [], []
        hidden, residual = x, None
        for i, layer in enumerate(layers):
            hidden, residual = self._run_layer(layer, hidden, residual)
            flipped = self.layer_is_flipped(i)
            if i in take:
                if source == "mixer":
                    y = hidden
                elif norm:
                    y, _ = add_norm(hidden, residual, self.norm_f, self.residual_in_fp32)
                else:
                    y = (residual + hidden).to(hidden.dtype)
                if flipped:
                    y = y.flip(1)
                y, prefix = _split_class_token(y, class_token_index(grid[0] * grid[1], self.class_token))
                if output_fmt == "NCHW":
                    y = y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
                prefixes.append(prefix)
            if self.flip_every_layer and i < last:
                hidden, residual = hidden.flip(1), residual.flip(1)
        if return_prefix_tokens and self.class_token is not None:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual, self.layer_is_flipped(last)), intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last one `indices` needs (and norm_f / the head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VisionMamba) -> Dict[str, torch.Tensor]:
    """Adapt a reference (or our own) checkpoint to `model`.

    Unwraps `{'model': ...}` / `{'state_dict': ...}` and DDP / torch.compile prefixes, and resamples
    `pos_embed` to the model's patch grid when the checkpoint was trained at another image size
    (the class token's entry is kept, at the class token's position).
    """
    state_dict = unwrap_state_dict(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 3 and pos_embed.shape != model.pos_embed.shape:
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = resample_pos_embed(
            pos_embed.float(), model.patch_embed.grid_size, None, model.class_token
        ).to(pos_embed.dtype)
    return state_dict


# ---------------------------------------------------------------------- timm registration
def _cfg(**kwargs) -> Dict[str, Any]:
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
        "license": "apache-2.0",
        **kwargs,
    }


_LBVIM_PAPER = dict(paper_ids="arXiv:2506.15976", paper_name="LBMamba: Locally Bi-directional Mamba")
_VIM_PAPER = dict(paper_ids="arXiv:2401.09417", paper_name="Vision Mamba")

VIM_ALIASES = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_patch16_224",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_patch16_224",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base_patch16_224",
}

default_cfgs = generate_default_cfgs(
    {
        "lbvim_tiny_patch16_224": _cfg(**_LBVIM_PAPER),
        "lbvim_300_patch16_224": _cfg(**_LBVIM_PAPER),
        "lbvim_small_patch16_224": _cfg(**_LBVIM_PAPER),
        "lbvim_528_patch16_224_atthead": _cfg(classifier="head.1", **_LBVIM_PAPER),
        "uvim_tiny_patch16_224": _cfg(**_LBVIM_PAPER),
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


def _build(variant: str, base: Dict[str, Any], pretrained: bool, **kwargs) -> VisionMamba:
    return build_with_cfg(VisionMamba, variant, pretrained, checkpoint_filter_fn, dict(base, **kwargs))


@register_model
def lbvim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-T: width 192, depth 24, LB scan (window auto), flips, mean pooling (6.4 M params)."""
    return _build("lbvim_tiny_patch16_224", dict(LBVIM_ARGS, embed_dim=192), pretrained, **kwargs)


@register_model
def lbvim_300_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-300: width 300 (14.9 M params)."""
    return _build("lbvim_300_patch16_224", dict(LBVIM_ARGS, embed_dim=300), pretrained, **kwargs)


@register_model
def lbvim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-S: width 384 (23.9 M params)."""
    return _build("lbvim_small_patch16_224", dict(LBVIM_ARGS, embed_dim=384), pretrained, **kwargs)


@register_model
def lbvim_528_patch16_224_atthead(pretrained: bool = False, **kwargs) -> VisionMamba:
    """LBVim-528 with the attention-pooling head (6 heads) (44.8 M params)."""
    args = dict(LBVIM_ARGS, embed_dim=528, global_pool="attn", attn_pool_heads=6)
    return _build("lbvim_528_patch16_224_atthead", args, pretrained, **kwargs)


@register_model
def uvim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """uVim-T: LBVim-T with window 1 (a plain forward Mamba scan per layer, still flipped every layer)."""
    return _build("uvim_tiny_patch16_224", dict(LBVIM_ARGS, embed_dim=192, window=1), pretrained, **kwargs)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-T: width 192, bidirectional v2 mixer (/2), middle class token (7 M params)."""
    return _build("vim_tiny_patch16_224", dict(VIM_ARGS, embed_dim=192), pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: width 384 (26 M params)."""
    return _build("vim_small_patch16_224", dict(VIM_ARGS, embed_dim=384), pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: width 768 (98 M params)."""
    return _build("vim_base_patch16_224", dict(VIM_ARGS, embed_dim=768), pretrained, **kwargs)


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
