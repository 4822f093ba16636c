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

import math
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

try:  # timm >= 1.0.12
    from timm.models import checkpoint
except ImportError:  # pragma: no cover
    from torch.utils.checkpoint import checkpoint as _torch_checkpoint

    def checkpoint(function, *args, **kwargs):
        return _torch_checkpoint(function, *args, use_reentrant=False, **kwargs)

from ..nn.block import Block
from ..nn.local_scan import V_REVERSE, as_direction_lists
from ..nn.multi_mamba import MultiMamba
from ..nn.norm import RMSNorm, add_norm
from ..nn.rope import GridRope, resize_grid_table
from ._build import build_with_cfg
from .checkpoint import unwrap_state_dict

__all__ = ["LocalVisionMamba", "checkpoint_filter_fn", "resize_pos_embed", "LOCALVIM_TINY_DIRECTIONS",
           "LOCALVIM_SMALL_DIRECTIONS"]

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

CLASS_TOKEN_POSITIONS = (None, "middle")
GLOBAL_POOLS = ("", "mean", "token")
#: what `forward_intermediates` returns per layer: the residual stream or the mixer output
INTERMEDIATE_SOURCES = ("residual", "mixer")


def _split_middle(x: torch.Tensor, has_token: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(patch tokens, class token (B, 1, C) or None) of a (B, N (+1), C) sequence with the token at (N) // 2."""
    if not has_token:
        return x, None
    c = (x.shape[1] - 1) // 2
    return torch.cat([x[:, :c], x[:, c + 1:]], dim=1), x[:, c:c + 1]


def _insert_middle(patches: torch.Tensor, token: Optional[torch.Tensor]) -> torch.Tensor:
    if token is None:
        return patches
    c = patches.shape[1] // 2
    return torch.cat([patches[:, :c], token, patches[:, c:]], dim=1)


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Tuple[int, int],
    old_grid: Optional[Tuple[int, int]] = None,
    class_token: Optional[str] = None,
) -> torch.Tensor:
    """Resize a (1, tokens, C) position embedding to `new_grid` as the official code does (bicubic,
    align_corners False, no antialiasing). With `class_token="middle"` the token's entry (index
    (tokens - 1) // 2) is kept and re-inserted in the middle of the new sequence. `old_grid` defaults to
    a square grid."""
    has_token = class_token is not None
    num_old = pos_embed.shape[1] - int(has_token)
    if old_grid is None:
        side = int(round(math.sqrt(num_old)))
        if side * side != num_old:
            raise ValueError(f"cannot infer the grid of a position embedding of {num_old} patch tokens (not a "
                             f"square); pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    patches, token = _split_middle(pos_embed, has_token)
    return _insert_middle(resize_grid_table(patches, old_grid, new_grid), token)


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


class LocalVisionMamba(nn.Module):
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
        if class_token not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token must be one of {CLASS_TOKEN_POSITIONS}, got {class_token!r}")
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
        self.grad_checkpointing = False
        self.directions = _layer_directions(directions, depth)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False, dynamic_img_pad=True)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token is not None else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.rope = GridRope(embed_dim, self.patch_embed.grid_size, rope_pt_seq_len, rope_theta) if rope else None

        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # [0] + linspace(0, rate, depth)
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
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
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
            raise ValueError("global_pool='token' needs a class token: set class_token='middle'")
        return global_pool

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
            stem=r"^cls_token|^pos_embed|^patch_embed|^rope",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool, self.class_token)
        head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.head = head.to(self.pos_embed.device)

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Hook used by `lbmamba.load_checkpoint`: unwrap, resize pos_embed / RoPE tables for this model."""
        return checkpoint_filter_fn(state_dict, self)

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = _insert_middle(x, self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1))
        pos_embed = resize_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, self.class_token)
        return self.pos_drop(x + pos_embed.to(x.dtype)), grid

    def _rope_tables(self, grid):
        return None if self.rope is None else self.rope.tables(grid)

    def _run_layer(self, i: int, layer: nn.Module, hidden, residual, grid, rope):
        if rope is not None:
            hidden = GridRope.rotate(hidden, *rope)
            if residual is not None and self.rope_residual:
                residual = GridRope.rotate(residual, *rope)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(layer, hidden, residual, grid)
        return layer(hidden, residual, grid)

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

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "":
            return x
        patches, token = _split_middle(x, self.class_token is not None)
        if self.global_pool == "token":
            return token[:, 0]
        return patches.mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

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
        rope = self._rope_tables(grid)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates, prefixes = [], []
        hidden, residual = x, None
        for i, layer in enumerate(layers):
            hidden, residual = self._run_layer(i, layer, hidden, residual, grid, rope)
            if i in take:
                if source == "mixer":
                    y = hidden
                elif norm:
                    y, _ = add_norm(hidden, residual, self.norm_f, self.residual_in_fp32)
                else:
                    y = (residual + hidden).to(hidden.dtype)
                y, prefix = _split_middle(y, self.class_token is not None)
                if output_fmt == "NCHW":
                    y = y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
                prefixes.append(prefix)
        if return_prefix_tokens and self.class_token is not None:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual), intermediates

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


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: LocalVisionMamba) -> Dict[str, torch.Tensor]:
    """Adapt an official (or our own) LocalVim checkpoint to `model`.

    Unwraps `{'model': ...}` (the official training checkpoints, which also hold 'ema_model' and
    'optimizer') / `{'state_dict': ...}` (their converted files) and `module.` / `_orig_mod.` prefixes.
    When the checkpoint was trained on another grid, `pos_embed` (the middle class token's entry kept) and
    `rope.freqs_cos` / `rope.freqs_sin` are resized bicubically to the model's grid, as the official dense
    backbone does. A checkpoint without the RoPE tables gets the model's own (they are not learned).
    """
    state_dict = dict(unwrap_state_dict(state_dict))
    grid = tuple(model.patch_embed.grid_size)
    pos_embed = state_dict.get("pos_embed")
    if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 3 and pos_embed.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resize_pos_embed(pos_embed.float(), grid, None, model.class_token).to(pos_embed.dtype)
    if model.rope is not None:
        for name in ("freqs_cos", "freqs_sin"):
            key, own = f"rope.{name}", getattr(model.rope, name)
            table = state_dict.get(key)
            if table is None:
                state_dict[key] = own.detach().clone()
            elif table.dim() == 2 and table.shape != own.shape:
                side = int(round(math.sqrt(table.shape[0])))
                if side * side != table.shape[0]:
                    raise ValueError(f"cannot infer the grid of {key} with {table.shape[0]} tokens (not a square)")
                state_dict[key] = resize_grid_table(table.float(), (side, side), grid).to(table.dtype)
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


_LOCALMAMBA_PAPER = dict(paper_ids="arXiv:2403.09338",
                         paper_name="LocalMamba: Visual State Space Model with Windowed Selective Scan")
_LBMAMBA_PAPER = dict(paper_ids="arXiv:2506.15976", paper_name="LBMamba: Locally Bi-directional Mamba")

default_cfgs = generate_default_cfgs(
    {
        "localvim_tiny": _cfg(**_LOCALMAMBA_PAPER),
        "lb_localvim_tiny": _cfg(**_LBMAMBA_PAPER),
        "localvim_tiny_middle_cls_token": _cfg(**_LOCALMAMBA_PAPER),
        "lb_localvim_tiny_middle_cls_token": _cfg(**_LBMAMBA_PAPER),
        "localvim_small": _cfg(**_LOCALMAMBA_PAPER),
        "lb_localvim_small": _cfg(**_LBMAMBA_PAPER),
    }
)

TINY_ARGS = dict(patch_size=16, embed_dim=192, depth=20, directions=LOCALVIM_TINY_DIRECTIONS, rope=True,
                 rope_residual=True, class_token=None)
TINY_MIDDLE_CLS_ARGS = dict(TINY_ARGS, rope=False, rope_residual=False, class_token="middle")
SMALL_ARGS = dict(TINY_ARGS, embed_dim=384, directions=LOCALVIM_SMALL_DIRECTIONS)


def _create(variant: str, base: Dict[str, Any], window, pretrained: bool, **kwargs) -> LocalVisionMamba:
    return build_with_cfg(LocalVisionMamba, variant, pretrained, checkpoint_filter_fn,
                          dict(base, window=window, **kwargs))


@register_model
def localvim_tiny(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-T (official `local_vim_tiny`): width 192, 20 layers of searched directions, RoPE, vanilla scans
    (7,994,152 params)."""
    return _create("localvim_tiny", TINY_ARGS, kwargs.pop("window", 1), pretrained, **kwargs)


@register_model
def lb_localvim_tiny(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-T with every scan an LB scan (window "auto")."""
    return _create("lb_localvim_tiny", TINY_ARGS, kwargs.pop("window", "auto"), pretrained, **kwargs)


@register_model
def localvim_tiny_middle_cls_token(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-T with a middle class token and no RoPE (official `local_vim_tiny_middle_cls_token`)."""
    return _create("localvim_tiny_middle_cls_token", TINY_MIDDLE_CLS_ARGS, kwargs.pop("window", 1), pretrained,
                   **kwargs)


@register_model
def lb_localvim_tiny_middle_cls_token(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """The middle-class-token LocalVim-T with LB scans (window "auto")."""
    return _create("lb_localvim_tiny_middle_cls_token", TINY_MIDDLE_CLS_ARGS, kwargs.pop("window", "auto"),
                   pretrained, **kwargs)


@register_model
def localvim_small(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-S (official `local_vim_small`, its second definition): width 384, (h, h_flip, w2, w2_flip) in
    all 20 layers, RoPE, vanilla scans."""
    return _create("localvim_small", SMALL_ARGS, kwargs.pop("window", 1), pretrained, **kwargs)


@register_model
def lb_localvim_small(pretrained: bool = False, **kwargs) -> LocalVisionMamba:
    """LocalVim-S with LB scans (window "auto")."""
    return _create("lb_localvim_small", SMALL_ARGS, kwargs.pop("window", "auto"), pretrained, **kwargs)
