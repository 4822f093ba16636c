"""PlainMamba (arXiv 2403.17695) and LB-PlainMamba: a plain vision Mamba with four zig-zag scans per layer.

    image -> ConvPatchEmbed (conv 7x7 s2 + BN + ReLU, [conv 3x3 + BN + ReLU] x n, conv p/2 s p/2)
          -> + pos_embed -> 24 / 36 layers `x = x + drop_path(mamba(LayerNorm(x)))`
             (layer 0 of L1 then passes the stream through depthwise 3x3 conv + BN + GELU, no skip)
          -> LayerNorm (eps 1e-6) -> mean over tokens -> head.fc

The mixer is `lbmamba.nn.PlainMamba2D` (four continuous zig-zag scans sharing one set of SSM
parameters, plus a learned embedding of each token's arrival direction added to B). The original
PlainMamba runs the vanilla Mamba-1 scan (window 1); LB-PlainMamba the LB scan (window "auto": W = 8 for
the 196 tokens of a 224 px image, 16 beyond 256 tokens). Both have the same parameters, so one
checkpoint loads into either.

Reproducing the official code: `official_quirks=True` (the default) keeps its two quirks, with which
the released checkpoints were trained: only u is put in scan order (delta, B, C stay in raster order),
and the dt bias is applied twice (see `lbmamba.nn.plain_mamba`). `official_quirks=False` reorders
everything and applies the bias once; `reorder_only_u` / `dt_bias_twice` set each one alone.

State dict: the official module names without mmcls' `backbone.` prefix (`patch_embed.stem.0.weight`,
`layers.3.mamba.A_log`, `ln1.weight`, `head.fc.weight`, ...). The model keeps timm's layout (top-level
`patch_embed`, `layers`, a `head` holding the classifier) like every other family here, so timm's
tools (`pretrained_cfg['first_conv']`, group matchers, `features_only`) see the usual names; the
checkpoint filter strips `backbone.` from the official `{'state_dict': ...}` files (and drops their
EMA-hook buffers `ema_*`), which then load with strict=True.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..nn.plain_mamba import PlainMamba2D
from ._build import LBMAMBA_PAPER, build_with_cfg, checkpoint_filter_fn, default_cfg
from ._family import PlainModelMixin, check_intermediates_args, layer_feature_info, tokens_to_map
from .checkpoint import unwrap_state_dict

__all__ = ["PlainMamba", "PlainMambaLayer", "ConvPatchEmbed", "checkpoint_filter_fn"]


def _pair(value) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class ConvPatchEmbed(nn.Module):
    """PlainMamba's convolutional patch embedding.

    stem: conv 7x7 stride 2 (in_chans -> 64, no bias) + BN + ReLU; convs: `num_convs` x (conv 3x3
    64 -> 64, no bias, + BN + ReLU) (absent when 0); the stem's output is padded at the bottom / right to
    a multiple of patch_size / 2 (mmcv's "corner" adaptive padding); projection: conv with kernel and
    stride patch_size / 2 (64 -> embed_dim, with bias). Any input size works: the grid is
    ceil(ceil(H / 2) / (patch_size / 2)) x the same for W.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 192, patch_size: int = 16, num_convs: int = 1,
                 stem_dim: int = 64):
        super().__init__()
        if patch_size % 2 != 0:
            raise ValueError(f"patch_size must be even (the stem halves the image), got {patch_size}")
        self.patch_size = (patch_size, patch_size)  # as timm's PatchEmbed: the stride of the token grid
        self.proj_size = patch_size // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_dim),
            nn.ReLU(inplace=True),
        )
        convs = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(stem_dim, stem_dim, 3, padding=1, bias=False), nn.BatchNorm2d(stem_dim),
                      nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs) if convs else None
        self.projection = nn.Conv2d(stem_dim, embed_dim, kernel_size=self.proj_size, stride=self.proj_size)

    def grid_size(self, img_size) -> Tuple[int, int]:
        """The token grid (H', W') for an image of size img_size = (H, W)."""
        h, w = _pair(img_size)
        half = self.proj_size
        return (math.ceil(math.ceil(h / 2) / half), math.ceil(math.ceil(w / 2) / half))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, H' W', embed_dim) in raster order, and (H', W')."""
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        pad_h, pad_w = (-x.shape[-2]) % self.proj_size, (-x.shape[-1]) % self.proj_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.projection(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class PlainMambaLayer(nn.Module):
    """`x + drop_path(mamba(norm(x)))`, then (with_dwconv) depthwise 3x3 conv + BN + GELU on the grid (no skip)."""

    def __init__(self, dim: int, drop_path: float = 0.0, with_dwconv: bool = False, norm_eps: float = 1e-5,
                 **mamba_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mamba = PlainMamba2D(dim, **mamba_kwargs)
        self.dw = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.GELU()
        ) if with_dwconv else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.mamba(self.norm(x), hw_shape))
        if self.dw is not None:
            batch, _, channels = x.shape
            x = x.transpose(1, 2).reshape(batch, channels, hw_shape[0], hw_shape[1])
            x = self.dw(x).flatten(2).transpose(1, 2)
        return x


class ClsHead(nn.Module):
    """mmcls' LinearClsHead as a module: the classifier is `fc` (so its keys are `head.fc.*`)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.fc, nn.Linear):  # LinearClsHead's init: normal, std 0.01, zero bias
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class PlainMamba(PlainModelMixin, nn.Module):
    """PlainMamba / LB-PlainMamba.

    Args:
        img_size: image size the position embedding is built for (any size runs: the embedding is
            resampled on the fly, bicubic, as the official code does).
        patch_size: tokens cover patch_size x patch_size pixels (16).  in_chans, num_classes: as in timm.
        embed_dim, depth: width and number of layers (L1 192 / 24, L2 384 / 24, L3 448 / 36).
        num_convs_patch_embed: 3x3 convs after the stem (L1 1, L2 / L3 2).
        layers_with_dwconv: layers followed by depthwise 3x3 + BN + GELU (L1: (0,); L2 / L3: none).
        d_state, expand, conv_size: mixer sizes (16, 2, 7).
        scan: "lb" (the LB scan with `window`) or "forward" (window 1, the original PlainMamba).
        window: LB window of each scan, "auto" (default) or an int; window=1 is the vanilla scan.
        official_quirks: reproduce the official code's two quirks (default True: what its released
            checkpoints compute); False reorders delta / B / C with u and applies the dt bias once.
        reorder_only_u, dt_bias_twice: set one quirk alone (None: follow `official_quirks`).
        global_pool: "mean" ("avg") or "" (the head gets the tokens).
        drop_rate: dropout before the classifier (not in PlainMamba).  pos_drop_rate: dropout after the
            position embedding (the official `drop_rate`).
        drop_path_rate: stochastic depth; layer i gets linspace(0, rate, depth)[i] (official recipes:
            0.2 for L1 and L2, 0.4 for L3).
        norm_eps: LayerNorm eps in the layers (1e-5); final_norm_eps: the final `ln1` (1e-6).
    """

    global_pools = ("", "mean")
    pos_embed_antialias = False  # mmcls' resize_pos_embed: bicubic, no antialiasing
    stem_pattern = r"^pos_embed|^patch_embed"
    final_norm = "ln1"
    #: pos_embed, A_log, D, direction_Bs (the official recipe; norms and biases are 1-d, which timm's
    #: optimizer factory exempts anyway)
    no_weight_decay_names = ("pos_embed",)

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "mean",
        embed_dim: int = 192,
        depth: int = 24,
        num_convs_patch_embed: int = 1,
        layers_with_dwconv: Sequence[int] = (0,),
        d_state: int = 16,
        expand: int = 2,
        conv_size: int = 7,
        scan: str = "lb",
        window="auto",
        official_quirks: bool = True,
        reorder_only_u: Optional[bool] = None,
        dt_bias_twice: Optional[bool] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        final_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if scan not in ("lb", "forward"):
            raise ValueError(f"scan must be 'lb' or 'forward', got {scan!r}")
        self.num_classes = num_classes
        self.global_pool = self._check_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.depth = depth
        self.scan = scan
        self.window = window if scan == "lb" else 1
        self.official_quirks = official_quirks
        self.reorder_only_u = official_quirks if reorder_only_u is None else bool(reorder_only_u)
        self.dt_bias_twice = official_quirks if dt_bias_twice is None else bool(dt_bias_twice)
        self.layers_with_dwconv = tuple(int(i) for i in layers_with_dwconv)
        self.dynamic_img_size = True

        self.patch_embed = ConvPatchEmbed(in_chans, embed_dim, patch_size, num_convs_patch_embed)
        self.patch_size = patch_size
        self.grid_size = self.patch_embed.grid_size(img_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        mamba_kwargs = dict(d_state=d_state, expand=expand, conv_size=conv_size, bias=True, conv_bias=True,
                            window=self.window, reorder_only_u=self.reorder_only_u, dt_bias_twice=self.dt_bias_twice)
        self.layers = nn.ModuleList([
            PlainMambaLayer(embed_dim, drop_path=dpr[i], with_dwconv=i in self.layers_with_dwconv, norm_eps=norm_eps,
                            **mamba_kwargs)
            for i in range(depth)
        ])
        self.ln1 = nn.LayerNorm(embed_dim, eps=final_norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = ClsHead(embed_dim, num_classes)
        self.feature_info = layer_feature_info(depth, embed_dim, patch_size)
        self.init_weights()

    @property
    def pos_embed_grid(self) -> Tuple[int, int]:
        return tuple(self.grid_size)

    def init_weights(self):
        """The official training initialisation (mmcls ImageClassifier's init_cfg, then the head's own):
        every Linear trunc-normal std 0.02 with zero bias, dt_proj included (its Mamba init is
        overwritten); LayerNorm weight 1, bias 0; head.fc normal std 0.01, zero bias; pos_embed
        trunc-normal 0.02; direction_Bs trunc-normal 0.02, A_log = log(1..N), D = 1 (the mixer's own);
        convolutions and BatchNorm PyTorch's defaults."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.head.fc, nn.Linear):
            nn.init.normal_(self.head.fc.weight, std=0.01)
        trunc_normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.head = ClsHead(self.embed_dim, num_classes).to(self.pos_embed.device)

    def checkpoint_filter(self, state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Adapt an official PlainMamba checkpoint (or one of ours) to this model (hook used by
        `lbmamba.load_checkpoint` and timm's pretrained loading).

        Unwraps `{'state_dict': ...}` / `{'model': ...}` and DDP / torch.compile prefixes; in mmcls' layout
        (keys `backbone.*`, `head.fc.*`) strips `backbone.` and drops the EMA hook's buffers (`ema_*`: the
        L2 / L3 recipes register them on the whole classifier; the regular keys hold the evaluated weights);
        resamples `pos_embed` to the model's grid (bicubic, like mmcls) when it was trained at another size.
        """
        state_dict = unwrap_state_dict(state_dict)
        if any(k.startswith("backbone.") for k in state_dict):
            state_dict = {
                (k[len("backbone."):] if k.startswith("backbone.") else k): v
                for k, v in state_dict.items()
                if not k.startswith("ema_")
            }
        return self._filter_pos_embed(state_dict)

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, grid = self.patch_embed(x)
        return self._add_pos_embed(x, grid), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, H' W', embed_dim) in raster order."""
        x, grid = self._embed(x)
        for layer in self.layers:
            x = self._checkpointed(layer, x, grid)
        return self.ln1(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the output of each requested layer (after layer 0's dw block in L1),
        normalised with `ln1` when `norm`, as (B, C, H', W') ("NCHW") or (B, H' W', C) ("NLC").

        Args:
            indices: last n layers if int, all if None, else the listed layers (negative from the end).
            stop_early: stop after the last requested layer (the final output then covers those layers).
        Returns:
            (final normalised tokens as forward_features gives them, intermediates) or the list alone.
        """
        check_intermediates_args(output_fmt)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        take = set(take_indices)
        x, grid = self._embed(x)
        layers = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        for i, layer in enumerate(layers):
            x = self._checkpointed(layer, x, grid)
            if i in take:
                y = self.ln1(x) if norm else x
                if output_fmt == "NCHW":
                    y = tokens_to_map(y, grid)
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.ln1(x), intermediates


# ---------------------------------------------------------------------- timm registration
_cfg = partial(default_cfg, first_conv="patch_embed.stem.0", classifier="head.fc", paper_ids="arXiv:2403.17695",
               paper_name="PlainMamba: Improving Non-Hierarchical Mamba in Visual Recognition")

# No download locations: the original README links its ImageNet checkpoints (l1.pth, l2.pth, l3.pth on the
# authors' Hugging Face page), mmcls `{'meta', 'state_dict'}` files that `lbmamba.load_checkpoint` reads
# through checkpoint_filter_fn (or timm with pretrained_cfg_overlay=dict(file=...)). The LB names have none of
# their own: an original checkpoint loads into them and needs fine-tuning.
default_cfgs = generate_default_cfgs(
    {
        "plainmamba_l1": _cfg(),
        "plainmamba_l2": _cfg(),
        "plainmamba_l3": _cfg(),
        "lb_plainmamba_l1": _cfg(**LBMAMBA_PAPER),
        "lb_plainmamba_l2": _cfg(**LBMAMBA_PAPER),
        "lb_plainmamba_l3": _cfg(**LBMAMBA_PAPER),
    }
)

#: the official `arch_zoo`
PLAINMAMBA_ARCHS = {
    "l1": dict(embed_dim=192, depth=24, num_convs_patch_embed=1, layers_with_dwconv=(0,)),
    "l2": dict(embed_dim=384, depth=24, num_convs_patch_embed=2, layers_with_dwconv=()),
    "l3": dict(embed_dim=448, depth=36, num_convs_patch_embed=2, layers_with_dwconv=()),
}


def _create(variant: str, arch: str, lb: bool, pretrained: bool = False, **kwargs) -> PlainMamba:
    args = dict(PLAINMAMBA_ARCHS[arch], patch_size=16, d_state=16, expand=2, conv_size=7,
                scan="lb" if lb else "forward", window="auto" if lb else 1)
    return build_with_cfg(PlainMamba, variant, pretrained, args, **kwargs)


@register_model
def plainmamba_l1(pretrained: bool = False, **kwargs) -> PlainMamba:
    """PlainMamba-L1: width 192, 24 layers, vanilla scans (7.55 M params with the 1000-class head)."""
    return _create("plainmamba_l1", "l1", False, pretrained, **kwargs)


@register_model
def plainmamba_l2(pretrained: bool = False, **kwargs) -> PlainMamba:
    """PlainMamba-L2: width 384, 24 layers, vanilla scans."""
    return _create("plainmamba_l2", "l2", False, pretrained, **kwargs)


@register_model
def plainmamba_l3(pretrained: bool = False, **kwargs) -> PlainMamba:
    """PlainMamba-L3: width 448, 36 layers, vanilla scans."""
    return _create("plainmamba_l3", "l3", False, pretrained, **kwargs)


@register_model
def lb_plainmamba_l1(pretrained: bool = False, **kwargs) -> PlainMamba:
    """LB-PlainMamba-L1: PlainMamba-L1 with LB scans (window auto); the same parameters."""
    return _create("lb_plainmamba_l1", "l1", True, pretrained, **kwargs)


@register_model
def lb_plainmamba_l2(pretrained: bool = False, **kwargs) -> PlainMamba:
    """LB-PlainMamba-L2: PlainMamba-L2 with LB scans (window auto)."""
    return _create("lb_plainmamba_l2", "l2", True, pretrained, **kwargs)


@register_model
def lb_plainmamba_l3(pretrained: bool = False, **kwargs) -> PlainMamba:
    """LB-PlainMamba-L3: PlainMamba-L3 with LB scans (window auto)."""
    return _create("lb_plainmamba_l3", "l3", True, pretrained, **kwargs)
