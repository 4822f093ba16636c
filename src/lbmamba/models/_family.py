"""What the timm model families share: timm's model API as two mixins, and small construction helpers.

`TimmModelMixin` holds the API every family gives the same way (`forward`, `forward_head`,
`set_grad_checkpointing`, `get_classifier`, `no_weight_decay`, `prune_intermediate_layers`,
`checkpoint_filter`, the `global_pool` check); `PlainModelMixin` adds what the plain (non-hierarchical)
families share: patch tokens with an absolute position embedding, resampled to any grid, an optional
class token at the family's place (see `lbmamba.nn.pos_embed`), the usual group matcher and a linear
head. A family sets the class attributes below and overrides what is its own.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices

try:  # timm >= 1.0.12
    from timm.models import checkpoint
except ImportError:  # pragma: no cover
    from torch.utils.checkpoint import checkpoint as _torch_checkpoint

    def checkpoint(function, *args, **kwargs):
        return _torch_checkpoint(function, *args, use_reentrant=False, **kwargs)

from ..nn.norm import add_norm
from ..nn.pos_embed import check_class_token, insert_class_token, resample_pos_embed, split_class_token
from .checkpoint import unwrap_state_dict

__all__ = ["TimmModelMixin", "PlainModelMixin", "INTERMEDIATE_SOURCES", "checkpoint", "check_intermediates_args",
           "residual_stream_output", "tokens_to_map", "linear_head", "layer_feature_info", "layer_drop_path_rates",
           "rescale_out_proj"]

#: what `forward_intermediates` of a residual-stream model (LBVim, LocalVim) returns per layer: the
#: residual stream or the mixer output
INTERMEDIATE_SOURCES = ("residual", "mixer")


class TimmModelMixin:
    """timm's model API, as every family here gives it. Mix in before nn.Module.

    A family sets `global_pools` (its values of `global_pool`; "avg" and "mean" name its average, whichever
    it lists), `final_norm` (the name of the norm `prune_norm` removes), `no_weight_decay_names` and
    `no_weight_decay_marked`, and defines `layers`, `head` (or overrides `get_classifier`), `head_drop`,
    `pool` and `forward_features`.
    """

    global_pools: Tuple[str, ...] = ("avg", "")
    #: the class token's place (see lbmamba.nn.pos_embed), None without one; the places the family offers
    class_token: Optional[str] = None
    class_token_places: Tuple[Optional[str], ...] = (None,)
    final_norm: str = "norm_f"
    #: names `no_weight_decay()` always gives
    no_weight_decay_names: Tuple[str, ...] = ()
    #: whether `no_weight_decay()` also gives every parameter a mixer marks `_no_weight_decay` (A_log, D, ...)
    no_weight_decay_marked: bool = True
    grad_checkpointing: bool = False

    @classmethod
    def _check_pool(cls, global_pool: Optional[str], class_token: Optional[str] = None) -> str:
        average = "mean" if "mean" in cls.global_pools else "avg"
        global_pool = {None: "", "avg": average, "mean": average}.get(global_pool, global_pool)
        if global_pool not in cls.global_pools:
            raise ValueError(f"global_pool must be one of {cls.global_pools} ('avg' and 'mean' both name the "
                             f"average), got {global_pool!r}")
        if global_pool == "token" and class_token is None:
            places = " or ".join(repr(p) for p in cls.class_token_places if p is not None)
            raise ValueError(f"global_pool='token' needs a class token: set class_token={places}")
        return global_pool

    def _checkpointed(self, function, *args):
        """`function(*args)`, through activation checkpointing when `set_grad_checkpointing` is on."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(function, *args)
        return function(*args)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        names = set(self.no_weight_decay_names)
        if self.no_weight_decay_marked:
            names.update(name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False))
        return names

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def checkpoint_filter(self, state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Hook used by `lbmamba.load_checkpoint` and timm's pretrained loading: unwrap `{'model': ...}` /
        `{'state_dict': ...}` and DDP / torch.compile prefixes."""
        return unwrap_state_dict(state_dict)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last one `indices` needs (and the final norm / the head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            parent, _, name = self.final_norm.rpartition(".")
            setattr(self.get_submodule(parent), name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


class PlainModelMixin(TimmModelMixin):
    """The timm API of a plain model: `patch_embed` (timm's PatchEmbed unless `_embed` is overridden), a
    `pos_embed` (1, patches (+ 1), C) for the grid `pos_embed_grid`, an optional `cls_token` at
    `class_token`, `pos_drop`, and a linear `head` (`head_drop` before it).

    `pos_embed_antialias` is the resampler's antialias (timm's True; False for the mmcls / mmseg resize).
    """

    pos_embed_antialias: bool = True
    stem_pattern: str = r"^cls_token|^pos_embed|^patch_embed"
    no_weight_decay_names = ("pos_embed", "cls_token")

    @classmethod
    def _check_class_token(cls, class_token: Optional[str]) -> Optional[str]:
        return check_class_token(class_token, cls.class_token_places)

    @property
    def pos_embed_grid(self) -> Tuple[int, int]:
        """The patch grid `pos_embed` is laid out on."""
        return tuple(self.patch_embed.grid_size)

    def _pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """`pos_embed` resampled to `grid` (itself on its own grid)."""
        if tuple(grid) == self.pos_embed_grid:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, self.pos_embed_grid, self.class_token,
                                  antialias=self.pos_embed_antialias)

    def _add_pos_embed(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Insert the class token into the (B, patches, C) tokens, add the position embedding, dropout."""
        if self.class_token is not None:
            x = insert_class_token(x, self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), self.class_token)
        return self.pos_drop(x + self._pos_embed_for(grid).to(x.dtype))

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, C, H, W) -> (tokens with position embedding, patch grid)."""
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        return self._add_pos_embed(self.patch_embed(x), grid), grid

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, C) -> the class token ("token"), the mean of the patch tokens ("mean" / "avg"), or
        the tokens as they are ("")."""
        if self.global_pool == "":
            return x
        patches, token = split_class_token(x, self.class_token)
        return token[:, 0] if self.global_pool == "token" else patches.mean(dim=1)

    def _filter_pos_embed(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """`state_dict` with its `pos_embed` resampled to this model's grid when its shape differs (the class
        token's entry kept, at the class token's place); the grid of the checkpoint's is taken as square."""
        pos_embed = state_dict.get("pos_embed")
        if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 3 and pos_embed.shape != self.pos_embed.shape:
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = resample_pos_embed(
                pos_embed.float(), self.pos_embed_grid, None, self.class_token, antialias=self.pos_embed_antialias
            ).to(pos_embed.dtype)
        return state_dict

    def checkpoint_filter(self, state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Hook used by `lbmamba.load_checkpoint` and timm's pretrained loading: unwrap `{'model': ...}` /
        `{'state_dict': ...}` and DDP / torch.compile prefixes, and resample `pos_embed` to this model's
        patch grid when the checkpoint was trained at another image size."""
        return self._filter_pos_embed(unwrap_state_dict(state_dict))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=self.stem_pattern,
                    blocks=[(r"^layers\.(\d+)", None), (rf"^{self.final_norm}", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool, self.class_token)
        self.head = linear_head(self.num_features, num_classes).to(self.pos_embed.device)


# ---------------------------------------------------------------------- helpers
def check_intermediates_args(output_fmt: str, source: Optional[str] = None, norm: bool = False,
                             formats: Tuple[str, ...] = ("NCHW", "NLC")) -> None:
    """Check `forward_intermediates`' output_fmt (one of `formats`) and, for a residual-stream model, its
    `source` (one of INTERMEDIATE_SOURCES; `norm` only with the residual stream)."""
    if output_fmt not in formats:
        raise ValueError(f"output_fmt must be {' or '.join(map(repr, formats))}, got {output_fmt!r}")
    if source is None:
        return
    if source not in INTERMEDIATE_SOURCES:
        raise ValueError(f"source must be one of {INTERMEDIATE_SOURCES}, got {source!r}")
    if norm and source == "mixer":
        raise ValueError("norm=True normalises the residual stream with norm_f; it does not apply to "
                         "source='mixer' (the mixer output)")


def residual_stream_output(hidden: torch.Tensor, residual: torch.Tensor, source: str,
                           norm_f: Optional[nn.Module] = None, residual_in_fp32: bool = True) -> torch.Tensor:
    """A layer's output for `forward_intermediates` of an Add -> Norm -> Mixer model: the mixer output
    (`source="mixer"`), or the residual stream residual + hidden (drop path not applied), through `norm_f`
    when one is given."""
    if source == "mixer":
        return hidden
    if norm_f is not None:
        return add_norm(hidden, residual, norm_f, residual_in_fp32)[0]
    return (residual + hidden).to(hidden.dtype)


def tokens_to_map(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, H * W, C) raster-order tokens -> a (B, C, H, W) map."""
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()


def linear_head(in_features: int, num_classes: int) -> nn.Module:
    """Linear(in_features, num_classes) with weights trunc-normal(0.02) and zero bias; Identity for 0 classes."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(in_features, num_classes)
    trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def layer_feature_info(depth: int, num_chs: int, reduction: int) -> List[Dict[str, Any]]:
    """timm's feature_info of a plain model: every layer `layers.{i}`, all at one width and stride."""
    return [dict(module=f"layers.{i}", num_chs=num_chs, reduction=reduction) for i in range(depth)]


def layer_drop_path_rates(rate: float, depth: int) -> List[float]:
    """[0] + linspace(0, rate, depth): layer i's drop-path rate is entry i (layers 0 and 1 get 0; entry
    `depth`, `rate`, is left for a final add), the schedule of Vim's code and the models built on it."""
    return [0.0] + [rate * i / max(depth - 1, 1) for i in range(depth)]


def rescale_out_proj(layers: nn.ModuleList, depth: int) -> None:
    """Each layer's `mixer.out_proj.weight`: kaiming-uniform(a = sqrt 5), then divided by sqrt(depth)
    (GPT-2's residual rescaling, as mamba_ssm's `_init_weights`)."""
    for layer in layers:
        weight = layer.mixer.out_proj.weight
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        with torch.no_grad():
            weight.div_(math.sqrt(depth))
