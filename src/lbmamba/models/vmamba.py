"""VMamba (arXiv 2401.10166) and LB-VMamba: a four-stage hierarchical vision Mamba, registered with timm.

One class, `VMamba`, builds both: the original runs VMamba's vanilla selective scan (window 1),
the LB version the LB scan (window "auto") in every SS2D mixer, with the same parameters, so an
original checkpoint loads into either.

Structure (VMamba's ``v05_noz`` models, channels-first throughout)::

    patch_embed   conv 3x3 s2 (in -> dims[0] / 2), LayerNorm2d, GELU, conv 3x3 s2 (-> dims[0]), LayerNorm2d
    layers.{i}    blocks: depths[i] x VSSBlock(dims[i]); downsample (not after the last stage):
                  conv 3x3 s2 (dims[i] -> dims[i + 1]), LayerNorm2d
    classifier    norm (LayerNorm2d), global average pool, head (Linear)

    VSSBlock:  x = x + drop_path(op(norm(x)));  x = x + drop_path(mlp(norm2(x)))
               op = SS2D (lbmamba.nn.SS2D), mlp = 1x1 fc1 (4x), GELU, 1x1 fc2

State-dict names and shapes are the official ones, so the authors' checkpoints (`{'model': ...,
'model_ema': ...}` files) load unchanged through `lbmamba.load_checkpoint`; `checkpoint_filter_fn`
also renames VMamba's old v0 keys and accepts 1x1 conv weights, (out, in, 1, 1), for the Linear2d
projections. The stage outputs (strides 4, 8, 16, 32) are the dense features
(`forward_intermediates`, `features_only=True`), so a dense head uses them as a pyramid.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..nn.ss2d import SS2D, LayerNorm2d, Linear2d
from ._build import build_with_cfg, checkpoint_filter_fn, default_cfg
from ._family import TimmModelMixin, check_intermediates_args, checkpoint, linear_head
from .checkpoint import unwrap_state_dict

__all__ = ["VMamba", "VSSBlock", "checkpoint_filter_fn"]


class Mlp2d(nn.Module):
    """fc1 (1x1) -> GELU -> dropout -> fc2 (1x1) -> dropout on (B, C, H, W) maps (VMamba's channels-first Mlp)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class VSSBlock(nn.Module):
    """VMamba's block: ``x + drop_path(op(norm(x)))`` then ``x + drop_path(mlp(norm2(x)))`` (pre-norm)."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, mlp_drop_rate: float = 0.0,
                 **ssm_kwargs):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, **ssm_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp2d(dim, int(dim * mlp_ratio), mlp_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VMambaStage(nn.Module):
    """`blocks` (nn.Sequential of VSSBlock) then `downsample` (conv 3x3 s2 + LayerNorm2d, or Identity)."""

    def __init__(self, blocks: nn.Sequential, downsample: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample


class VMambaClassifier(nn.Module):
    """`norm` (LayerNorm2d on the last map), global average pooling, dropout and `head` (Linear)."""

    def __init__(self, num_features: int, num_classes: int, global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.norm = LayerNorm2d(num_features)
        self.global_pool = global_pool
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.global_pool == "avg" else x


def _downsample(dim: int, out_dim: int) -> nn.Sequential:
    # VMamba's "v3" downsample, channels-first: indices 1 (conv) and 3 (norm) hold the parameters
    return nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1),
                         nn.Identity(), LayerNorm2d(out_dim))


def _patch_embed(in_chans: int, dim: int) -> nn.Sequential:
    # VMamba's "v2" patch embedding, channels-first: parameters at indices 0, 2, 5, 7
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1), nn.Identity(), LayerNorm2d(dim // 2),
        nn.Identity(), nn.GELU(),
        nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1), nn.Identity(), LayerNorm2d(dim),
    )


class VMamba(TimmModelMixin, nn.Module):
    """VMamba / LB-VMamba (VMamba's ``VSSM`` with forward type ``v05_noz``, patch embed "v2", downsample "v3").

    Args:
        img_size: accepted for timm's API and recorded; the model has no position embedding, so any
            input size runs (the stride-2 convolutions round odd sizes up, as VMamba's do).
        in_chans, num_classes: as in timm.
        depths, dims: blocks and widths of the four stages (an int `dims` doubles per stage).
        d_state: SSM state size N (1 in VMamba-T / -S).  ssm_ratio: d_inner / width.
        dt_rank: "auto" = ceil(width / 16).  d_conv, conv_bias: the depthwise conv in each SS2D.
        window: the selective scan's window: 1 (VMamba's vanilla scan, the default of the original
            names) or "auto" / a positive int (the LB scan, "auto" in the `lb_` names).
        mlp_ratio: hidden width of the block MLP (4).  mlp_drop_rate: its dropout.
        drop_rate: dropout before the classifier head.  drop_path_rate: stochastic depth, linear from 0
            to the rate over all blocks, as VMamba.
        global_pool: "avg" (default) or "" (no pooling: forward_head returns the map).
    """

    global_pools = ("avg", "")
    final_norm = "classifier.norm"
    #: the A_logs and Ds of every SS2D (marked `_no_weight_decay`, as in VMamba)
    no_weight_decay_names = ()

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Union[int, Sequence[int]] = 96,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank="auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        window=1,
        mlp_ratio: float = 4.0,
        mlp_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        global_pool: str = "avg",
    ):
        super().__init__()
        depths = list(depths)
        if isinstance(dims, int):
            dims = [dims * 2**i for i in range(len(depths))]
        dims = list(dims)
        if len(dims) != len(depths):
            raise ValueError(f"dims and depths need one entry per stage, got {dims} and {depths}")
        self.global_pool = self._check_pool(global_pool)
        self.img_size = img_size
        self.num_classes = num_classes
        self.depths, self.dims = depths, dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.window = window

        self.patch_embed = _patch_embed(in_chans, dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        ssm = dict(d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias,
                   window=window)
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            blocks = nn.Sequential(*[
                VSSBlock(dims[i], drop_path=dpr[start + j], mlp_ratio=mlp_ratio, mlp_drop_rate=mlp_drop_rate, **ssm)
                for j in range(depth)
            ])
            downsample = _downsample(dims[i], dims[i + 1]) if i < len(depths) - 1 else nn.Identity()
            self.layers.append(VMambaStage(blocks, downsample))
        self.classifier = VMambaClassifier(self.num_features, num_classes, self.global_pool, drop_rate)
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}.blocks") for i in range(len(depths))
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        """VMamba's: Linear (and Linear2d) weights trunc-normal 0.02 with zero bias; LayerNorms 1 / 0; convs
        and the SS2D parameters keep their own initialisation."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (99999,)),
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^classifier\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self.classifier.global_pool = self._check_pool(global_pool)
        device = self.classifier.norm.weight.device if isinstance(self.classifier.norm, nn.LayerNorm) else None
        head = linear_head(self.num_features, num_classes)
        self.classifier.head = head.to(device) if device is not None else head

    def checkpoint_filter(self, state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Adapt an official VMamba (or our own) checkpoint to this model (hook used by
        `lbmamba.load_checkpoint` and timm's pretrained loading).

        * unwraps `{'model': ...}` / `{'state_dict': ...}` (a file holding only `{'model_ema': ...}`
          gives its EMA weights) and DDP / torch.compile prefixes;
        * renames VMamba's old v0 keys as VMamba's own loader does: `patch_embed.proj` -> `patch_embed.0`,
          `patch_embed.norm` -> `patch_embed.2`, `ln_1` -> `norm`, `self_attention` -> `op`, `norm` ->
          `classifier.norm`, `head` -> `classifier.head`;
        * reshapes 1x1 convolution weights (out, in, 1, 1) of the Linear2d projections (in_proj,
          out_proj, mlp.fc1 / fc2) to the stored (out, in).

        VMamba's v05 models have no position embedding, so nothing depends on the image size.
        """
        if isinstance(state_dict, dict) and "model" not in state_dict and isinstance(state_dict.get("model_ema"), dict):
            state_dict = state_dict["model_ema"]
        state_dict = {_rename_v0(k): v for k, v in unwrap_state_dict(state_dict).items()}
        expected = self.state_dict()
        for key, value in state_dict.items():
            target = expected.get(key)
            if (target is not None and value.dim() == 4 and target.dim() == 2 and value.shape[2:] == (1, 1)
                    and value.shape[:2] == target.shape):
                state_dict[key] = value.reshape(target.shape)
        return state_dict

    # ------------------------------------------------------------------ forward
    def _blocks(self, stage: VMambaStage, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in stage.blocks:
                x = checkpoint(block, x)
            return x
        return stage.blocks(x)  # through the stage's own call, so hooks on `layers.{i}.blocks` see it

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the last stage's map after `classifier.norm`, (B, dims[-1], H/32, W/32)."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage.downsample(self._blocks(stage, x))
        return self.classifier.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (global_pool "avg") and classify; without pooling the head runs at every position
        and gives a (B, num_classes, H, W) map."""
        x = self.classifier.drop(self.classifier.pool(x))
        if pre_logits:
            return x
        if x.dim() == 4:
            return self.classifier.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.classifier.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stage outputs: the maps after each stage's blocks, before its
        downsample, at strides 4, 8, 16, 32 (what VMamba's detection / segmentation backbone takes).

        Args:
            indices: last n stages if int, all if None, else the listed stages (negative from the end).
            norm: apply `classifier.norm` to the last stage's map (the other stages have no norm of
                their own in the classification model).
            stop_early: stop after the last requested stage.
            output_fmt: "NCHW" only (the maps are images).
            intermediates_only: return only the list.
        Returns:
            (forward_features' output, intermediates) or the list alone.
        """
        check_intermediates_args(output_fmt, formats=("NCHW",))  # the maps are images
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        intermediates = []
        x = self.patch_embed(x)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        for i, stage in enumerate(stages):
            x = self._blocks(stage, x)
            if i in take_indices:
                intermediates.append(self.classifier.norm(x) if norm and i == last else x)
            x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return self.classifier.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one `indices` needs, and the downsample after it (and
        classifier.norm / the head if asked)."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        self.layers[-1].downsample = nn.Identity()
        return take_indices


# ---------------------------------------------------------------------- checkpoints
#: VMamba's renames of its old (v0) checkpoint keys, applied as prefixes
_V0_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)ln_1\."), r"\1norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)self_attention\."), r"\1op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)


def _rename_v0(key: str) -> str:
    for pattern, replacement in _V0_RENAMES:
        key = pattern.sub(replacement, key)
    return key


# ---------------------------------------------------------------------- timm registration
def _cfg(**kwargs) -> Dict[str, Any]:
    return default_cfg(pool_size=(7, 7), first_conv="patch_embed.0", classifier="classifier.head", license="mit",
                       paper_ids="arXiv:2401.10166", paper_name="VMamba: Visual State Space Model", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "vmamba_tiny_s1l8": _cfg(),
        "lb_vmamba_tiny_s1l8": _cfg(),
        "vmamba_small_s2l15": _cfg(),
        "lb_vmamba_small_s2l15": _cfg(),
    }
)

#: vmamba_tiny_s1l8 in VMamba's code (config vmambav2v_tiny_224.yaml): 82.6 % top-1, 30.2 M parameters
TINY_ARGS = dict(depths=(2, 2, 8, 2), dims=96, d_state=1, ssm_ratio=1.0, dt_rank="auto", d_conv=3, conv_bias=False,
                 mlp_ratio=4.0, drop_path_rate=0.2)
#: vmamba_small_s2l15 in VMamba's code (config vmambav2_small_224.yaml): 83.6 % top-1, 50 M parameters
SMALL_ARGS = dict(depths=(2, 2, 15, 2), dims=96, d_state=1, ssm_ratio=2.0, dt_rank="auto", d_conv=3,
                  conv_bias=False, mlp_ratio=4.0, drop_path_rate=0.3)


def _create_vmamba(variant: str, base: Dict[str, Any], pretrained: bool = False, **kwargs) -> VMamba:
    return build_with_cfg(VMamba, variant, pretrained, base, default_out_indices=(0, 1, 2, 3), **kwargs)


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T: depths (2, 2, 8, 2), widths 96-768, d_state 1, ssm_ratio 1, vanilla scan (30.2 M params)."""
    return _create_vmamba("vmamba_tiny_s1l8", dict(TINY_ARGS, window=1), pretrained, **kwargs)


@register_model
def lb_vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> VMamba:
    """LB-VMamba-T: VMamba-T with the LB scan (window "auto") in every SS2D, per route."""
    return _create_vmamba("lb_vmamba_tiny_s1l8", dict(TINY_ARGS, window="auto"), pretrained, **kwargs)


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S: depths (2, 2, 15, 2), widths 96-768, d_state 1, ssm_ratio 2, vanilla scan (50 M params)."""
    return _create_vmamba("vmamba_small_s2l15", dict(SMALL_ARGS, window=1), pretrained, **kwargs)


@register_model
def lb_vmamba_small_s2l15(pretrained: bool = False, **kwargs) -> VMamba:
    """LB-VMamba-S: VMamba-S with the LB scan (window "auto") in every SS2D, per route."""
    return _create_vmamba("lb_vmamba_small_s2l15", dict(SMALL_ARGS, window="auto"), pretrained, **kwargs)
