"""Semantic segmentation: UperNet over LBVim / Vim / uVim backbones (or any timm model with
`forward_intermediates`), in plain PyTorch with mmsegmentation's parameter names.

An mmseg-format state dict (`{'state_dict': ...}` or `{'model': ...}`) loads with `strict=True`. Where
each name comes from:

* `Segmentor`: mmseg's `EncoderDecoder` (mmseg/models/segmentors/encoder_decoder.py): submodules
  `backbone`, `decode_head`, `auxiliary_head`. There is no `neck` module: Vim's four resampling
  branches live inside its backbone (hustvl/Vim seg/backbone/vim.py, `VisionMambaSeg.fpn1..fpn4`),
  so their keys are `backbone.fpn1.*` as in Vim's checkpoints.
* `BackboneAdapter` (`backbone.*`): the wrapped model's own names at the top level (`patch_embed.*`,
  `pos_embed`, `cls_token`, `layers.{i}.*` as `VisionMamba` names them, i.e. as the reference
  classification code does); the per-output LayerNorms `outnorm_{i}` of LBMamba's
  `Backbone_BiVisionMamba` (cvlab-stonybrook/LBMamba segmentation/model.py); Vim's `fpn1`..`fpn4`
  (`fpn1` = ConvTranspose2d, BatchNorm, GELU, ConvTranspose2d: keys `fpn1.0.*`, `fpn1.1.*`, `fpn1.3.*`).
  The classifier and the final norm are removed, as both references delete them (`del self.head`,
  `del self.norm_f`).
* `UPerHead` (`decode_head.*`): mmseg decode_heads/uper_head.py with psp_head.py's `PPM`
  (`psp_modules.{i}.1.*`), `bottleneck`, `lateral_convs.{i}`, `fpn_convs.{i}`, `fpn_bottleneck`;
  `FCNHead` (`auxiliary_head.*`): fcn_head.py (`convs.{i}`, `conv_cat` when concat_input); both end in
  decode_head.py's `dropout` (Dropout2d) and `conv_seg` (1x1 conv with bias). Every conv block is
  mmcv's `ConvModule` with BatchNorm: `conv` (no bias, as bias='auto' gives under a norm), `bn`, ReLU.

Facts the defaults follow (read from the reference configs):

* LBMamba (segmentation/configs/_base_/models/upernet_vim.py and lbmamba/uppernet_biVim_*): neck None
  (four stride-16 maps), UPerHead channels 512, pool scales (1, 2, 3, 6), FCNHead on in_index 2 with
  channels 256, num_convs 1, concat_input False, dropout 0.1 in both heads, SyncBN, align_corners
  False, loss weights 1.0 / 0.4; backbone out_indices (5, 11, 17, 23), LayerNorm (`rms_norm=False`),
  features = the block's `hidden_states` (the mixer output), flipped back to image order.
* Vim (seg/configs/vim/upernet/upernet_vim_tiny_24_512_slide_60k.py): the same heads with UPerHead
  channels 192 (tiny) / 384 (small), RMSNorm, no class token (`if_cls_token=False`), mixer-output
  features (`use_residual_as_feature=False`), `fpn1..4`, and no per-output norms.

Cross-entropy is mmseg's default (`avg_non_ignore=False`): the per-pixel losses, ignored pixels counting
zero, averaged over all pixels of the mask.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (
    CheckpointMismatchError,
    _mismatch_message,
    compare_state_dict,
    load_checkpoint,
    read_checkpoint,
    unwrap_state_dict,
)
from .lbvim import VisionMamba, checkpoint_filter_fn, class_token_index

__all__ = [
    "FEATURE_SOURCES",
    "NECKS",
    "PREDICT_MODES",
    "NO_DECAY_RULES",
    "BACKBONE_NORMS",
    "ConvModule",
    "PPM",
    "UPerHead",
    "FCNHead",
    "BackboneAdapter",
    "Segmentor",
    "BackboneLoadReport",
    "build_segmentor",
    "default_out_indices",
    "predict_logits",
    "load_backbone_weights",
    "load_adapter_weights",
    "load_whole_weights",
]

FEATURE_SOURCES = ("mixer", "residual")
NECKS = ("none", "vim")
PREDICT_MODES = ("whole", "slide")
#: "lbmamba": mmengine custom_keys of LBMamba's configs (substring match on the full name: pos_embed,
#: cls_token, norm, A_log, D); "vim": the layer-decay constructor's rule (1-D parameters and biases)
NO_DECAY_RULES = ("lbmamba", "vim")
BACKBONE_NORMS = ("layernorm", "rmsnorm")
_LBMAMBA_NO_DECAY_KEYS = ("pos_embed", "cls_token", "norm", "A_log", "D")
_EMBEDDING_NAMES = ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed")


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """mmseg's `resize` as the heads call it: bilinear, align_corners=False."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- heads
class ConvModule(nn.Module):
    """mmcv's ConvModule with a BatchNorm: conv (no bias) -> bn -> ReLU, keys `conv.weight`, `bn.*`.

    Initialised as mmcv does: Kaiming-normal (fan_out, ReLU) conv weights, BN weight 1 and bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 inplace: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=inplace)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _is_synchronised(bn: nn.Module) -> bool:
    """Whether `bn` pools its batch statistics over more than one process."""
    if not isinstance(bn, nn.SyncBatchNorm):
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(bn.process_group or torch.distributed.group.WORLD) > 1


class PPM(nn.ModuleList):
    """Pooling pyramid of PSPNet (mmseg psp_head.PPM): per scale, adaptive average pooling and a 1x1
    ConvModule, upsampled back to the input's size. Keys `{i}.1.conv.weight`, `{i}.1.bn.*`."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int):
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1)) for scale in pool_scales
        )
        self.pool_scales = tuple(pool_scales)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.training and x.shape[0] == 1 and 1 in self.pool_scales:
            # A 1x1 pooled map of one image gives BatchNorm one value per channel. torch refuses it (so
            # does mmseg, whose answer is "use a batch of 2 or more"); SyncBatchNorm over several
            # processes sees one value per process and works.
            bn = self[self.pool_scales.index(1)][1].bn
            if not _is_synchronised(bn):
                raise ValueError(
                    "training on a batch of 1 image: the pyramid pooling's 1x1 pooled map gives BatchNorm a "
                    "single value per channel; train with at least 2 images per process (drop the last "
                    "incomplete batch), or with SyncBatchNorm across several processes"
                )
        return [_resize(stage(x), x.shape[2:]) for stage in self]


class _DecodeHead(nn.Module):
    """mmseg's BaseDecodeHead end: Dropout2d then the 1x1 `conv_seg` (normal std 0.01, bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        _check_int("num_classes", num_classes)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(feat))


class UPerHead(_DecodeHead):
    """UPerNet's decode head (mmseg uper_head.UPerHead): PPM on the last map, FPN fusion of all of them.

    Args:
        in_channels: channels of the input maps (finest first).
        channels: the head's width (512 in LBMamba's configs, 192 / 384 in Vim-T / -S's).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(_check_int("head_channels", channels), num_classes, dropout)
        in_channels = list(in_channels)
        if len(in_channels) < 2:
            raise ValueError(f"UPerHead needs at least 2 input maps, got in_channels={in_channels}")
        if not pool_scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pool_scales):
            raise ValueError(f"pool_scales must be positive ints, got {pool_scales!r}")
        self.in_channels = in_channels
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, inplace=False) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvModule(channels, channels, 3, padding=1, inplace=False) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[len(self.in_channels) - 1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """The auxiliary head (mmseg fcn_head.FCNHead) on map `in_index`: `num_convs` 3x3 ConvModules."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2, num_convs: int = 1,
                 concat_input: bool = False, dropout: float = 0.1, kernel_size: int = 3):
        super().__init__(_check_int("aux_channels", channels), num_classes, dropout)
        _check_int("num_convs", num_convs)
        self.in_index = in_index
        self.concat_input = concat_input
        pad = kernel_size // 2
        self.convs = nn.Sequential(
            ConvModule(in_channels, channels, kernel_size, padding=pad),
            *(ConvModule(channels, channels, kernel_size, padding=pad) for _ in range(num_convs - 1)),
        )
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=pad)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs[self.in_index]
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)


# ---------------------------------------------------------------------------------------------- backbone
def default_out_indices(depth: int) -> Tuple[int, ...]:
    """Four evenly spaced layers ending with the last: (5, 11, 17, 23) for 24 layers."""
    _check_int("depth", depth, 4)
    return tuple((k + 1) * depth // 4 - 1 for k in range(4))


def _vim_neck(dim: int, patch: int) -> List[nn.Module]:
    """Vim's fpn1..fpn4: strides 4 / 8 / 16 / 32 from a stride-`patch` map (patch 16 or 8, as Vim)."""
    def up2():
        return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)

    if patch == 16:
        return [nn.Sequential(up2(), nn.BatchNorm2d(dim), nn.GELU(), up2()), nn.Sequential(up2()), nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2)]
    if patch == 8:
        return [nn.Sequential(up2()), nn.Identity(), nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2)),
                nn.Sequential(nn.MaxPool2d(kernel_size=4, stride=4))]
    raise ValueError(f"neck='vim' resamples stride-16 or stride-8 maps (patch 16 or 8, as Vim's fpn1..fpn4); "
                     f"this backbone's maps have stride {patch}")


class BackboneAdapter(nn.Module):
    """Four NCHW feature maps from a plain backbone, for the segmentation heads.

    Wraps a `VisionMamba` (LBVim / Vim / uVim) or any timm model with `forward_intermediates`. The
    outputs of layers `out_indices` come back in image token order whatever the flips did, without the
    class token, each through its own LayerNorm (`outnorm_{i}`) when `out_norm`, then through Vim's
    `fpn1..fpn4` when `neck="vim"`. Any input size divisible by the patch runs: VisionMamba resizes its
    position embedding to the patch grid, and the LB scan's window "auto" is resolved from each call's
    token count (4 / 8 / 16 up to 128 / 256 / more tokens).

    The wrapped model's parameters, buffers and submodules are this module's own (one shared registry,
    so its state-dict keys are the model's keys, and module swaps such as
    `nn.SyncBatchNorm.convert_sync_batchnorm` reach the model's forward); its classifier and final
    norm are removed, and so are the layers after the last of `out_indices`.

    Args:
        model: the backbone.
        out_indices: 4 layer indices (negative from the end); default `default_out_indices(depth)`.
        feature_source: "mixer" (the block's mixer output, as LBMamba and Vim; backbones whose
            forward_intermediates takes `source`) or "residual" (the residual stream; any model).
        neck: "none" (the four maps as they are) or "vim" (strides 4 / 8 / 16 / 32).
        out_norm: a LayerNorm per output (LBMamba's `outnorm_{i}`); Vim's backbone has none.
        norm_eps: their eps (nn.LayerNorm's default, as LBMamba).
    """

    def __init__(self, model: nn.Module, *, out_indices: Optional[Sequence[int]] = None,
                 feature_source: str = "mixer", neck: str = "none", out_norm: bool = True, norm_eps: float = 1e-5):
        super().__init__()
        if not callable(getattr(model, "forward_intermediates", None)):
            raise TypeError(f"the backbone must have timm's forward_intermediates(); {type(model).__name__} has not")
        _check_choice("feature_source", feature_source, FEATURE_SOURCES)
        _check_choice("neck", neck, NECKS)
        # backbones whose forward_intermediates can return the mixer outputs say so with a `source` argument
        # (LBVim / Vim / uVim, LocalVim); the others give their blocks' outputs, the residual stream
        self.takes_source = "source" in inspect.signature(model.forward_intermediates).parameters
        if feature_source == "mixer" and not self.takes_source:
            raise ValueError(
                f"feature_source='mixer' needs a backbone that returns its blocks' mixer outputs (LBVim / Vim / "
                f"uVim, LocalVim); {type(model).__name__} gives only its blocks' outputs (the residual stream) "
                "through forward_intermediates: use feature_source='residual'"
            )
        info = getattr(model, "feature_info", None)
        if not isinstance(info, (list, tuple)) or not info:
            raise TypeError(f"{type(model).__name__} has no feature_info list to take layer widths / strides from")
        depth = len(info)
        self.out_indices = self._check_indices(out_indices, depth)
        self.feature_source = feature_source
        self.neck = neck
        self.out_norm = bool(out_norm)
        channels = [int(info[i]["num_chs"]) for i in self.out_indices]
        strides = [int(info[i]["reduction"]) for i in self.out_indices]
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        self.size_divisor = tuple(patch) if patch is not None else (max(strides), max(strides))
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        self.in_chans = int(proj.in_channels) if isinstance(proj, nn.Conv2d) else None

        full_keys = set(model.state_dict())
        if callable(getattr(model, "prune_intermediate_layers", None)):
            # the references delete the classifier and the final norm; layers after the last output are
            # never run and would only hold unused (DDP-unfriendly) parameters
            model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
            self.num_layers = max(self.out_indices) + 1
        else:
            self.num_layers = depth
        kept = set(model.state_dict())
        #: checkpoint keys of the classification model that the segmentation backbone drops
        self.removed_keys = full_keys - kept
        self.removed_modules = {k.rsplit(".", 1)[0] for k in self.removed_keys}

        # adopt the model's registries: one set of parameters / buffers / submodules for both
        object.__setattr__(self, "_wrapped", model)
        for registry in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, registry, getattr(model, registry))
        own = [f"outnorm_{i}" for i in range(4)] + [f"fpn{i}" for i in range(1, 5)]
        taken = [name for name in own if name in self._modules or name in self._parameters]
        if taken:
            raise ValueError(f"{type(model).__name__} already has attributes named {taken}")

        if self.out_norm:
            for i, c in enumerate(channels):
                self.add_module(f"outnorm_{i}", nn.LayerNorm(c, eps=norm_eps))
        if neck == "vim":
            if len(set(channels)) != 1 or len(set(strides)) != 1:
                raise ValueError(f"neck='vim' needs four maps of one width and stride (a plain backbone); got "
                                 f"channels {channels}, strides {strides}")
            for i, module in enumerate(_vim_neck(channels[0], strides[0]), start=1):
                self.add_module(f"fpn{i}", module)
            strides = [4, 8, 16, 32]
        self.out_channels: List[int] = channels
        self.out_strides: List[int] = strides

    @staticmethod
    def _check_indices(out_indices, depth: int) -> Tuple[int, ...]:
        if out_indices is None:
            if depth < 4:
                raise ValueError(f"the backbone has {depth} layers; four outputs need at least 4")
            return default_out_indices(depth)
        values = list(out_indices)
        if len(values) != 4 or any(isinstance(i, bool) or not isinstance(i, int) for i in values):
            raise ValueError(f"out_indices must be 4 ints (layer indices, negative from the end), got {out_indices!r}")
        if any(not -depth <= i < depth for i in values):
            raise ValueError(f"out_indices must lie in [{-depth}, {depth - 1}] for a {depth}-layer backbone, "
                             f"got {out_indices!r}")
        values = [i % depth for i in values]
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"out_indices must name 4 different layers in increasing order, got {out_indices!r}")
        return tuple(values)

    @property
    def model(self) -> nn.Module:
        """The wrapped backbone (sharing this module's parameters)."""
        return self._wrapped

    def train(self, mode: bool = True):
        super().train(mode)
        self._wrapped.training = mode  # not a registered child: keep its own flag in step
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if callable(getattr(self._wrapped, "set_grad_checkpointing", None)):
            self._wrapped.set_grad_checkpointing(enable)

    def intermediates(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The chosen layers' outputs, NCHW, image order, class token removed (no norms, no neck)."""
        kwargs = dict(indices=list(self.out_indices), norm=False, stop_early=True, output_fmt="NCHW",
                      intermediates_only=True)
        if self.takes_source:
            kwargs["source"] = self.feature_source
        return list(self._wrapped.forward_intermediates(x, **kwargs))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        ph, pw = self.size_divisor
        if x.dim() != 4 or x.shape[-2] % ph or x.shape[-1] % pw:
            raise ValueError(f"the backbone takes (batch, channels, H, W) images with H, W divisible by the patch "
                             f"{ph}x{pw}; got shape {tuple(x.shape)}")
        feats = self.intermediates(x)
        if self.out_norm:
            feats = [getattr(self, f"outnorm_{i}")(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
                     for i, f in enumerate(feats)]
        if self.neck == "vim":
            feats = [getattr(self, f"fpn{i + 1}")(f) for i, f in enumerate(feats)]
        return feats


# ---------------------------------------------------------------------------------------------- segmentor
def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """mmseg's CrossEntropyLoss (avg_non_ignore=False): ignored pixels count 0 in a mean over all pixels."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return loss.sum() / max(target.numel(), 1)


class Segmentor(nn.Module):
    """UperNet: backbone (`BackboneAdapter`) -> `decode_head` (UPerHead) + `auxiliary_head` (FCNHead).

    Args:
        backbone: the adapter giving four maps.
        num_classes: K.
        head_channels / aux_channels: widths of the two heads.
        aux_in_index: the map the auxiliary head reads (the third).
        aux_weight: the auxiliary loss weight.
        dropout: Dropout2d before both classifiers.
        pool_scales: the PPM's scales.
        ignore_index: the label value the losses skip.
    """

    def __init__(self, backbone: BackboneAdapter, num_classes: int, *, head_channels: int = 512,
                 aux_channels: int = 256, aux_in_index: int = 2, aux_weight: float = 0.4, dropout: float = 0.1,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), ignore_index: int = 255):
        super().__init__()
        _check_int("num_classes", num_classes)
        if not isinstance(backbone, BackboneAdapter):
            raise TypeError(f"backbone must be a BackboneAdapter, got {type(backbone).__name__}")
        n_maps = len(backbone.out_channels)
        if isinstance(aux_in_index, bool) or not isinstance(aux_in_index, int) or not 0 <= aux_in_index < n_maps:
            raise ValueError(f"aux_in_index must be an int in [0, {n_maps - 1}], got {aux_in_index!r}")
        if float(aux_weight) < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (num_classes {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = float(aux_weight)
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.out_channels, head_channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(backbone.out_channels[aux_in_index], aux_channels, num_classes,
                                      in_index=aux_in_index, dropout=dropout)

    @property
    def num_layers(self) -> int:
        """The backbone's depth (the layers it runs)."""
        return self.backbone.num_layers

    # ------------------------------------------------------------------ forward and losses
    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (batch, channels, H, W), got {got}")
        chans = self.backbone.in_chans
        if chans is not None and images.shape[1] != chans:
            raise ValueError(f"images must have {chans} channels (the backbone's in_chans), got shape "
                             f"{tuple(images.shape)}")

    def _encode_decode(self, images: torch.Tensor, aux: bool):
        """Logits of the decode head (and of the auxiliary head) at the images' size.

        Images whose sides are not multiples of the patch are padded at the bottom / right with zeros (as
        mmseg's ViT pads in its patch embedding) and the logits cropped back.
        """
        self._check_images(images)
        height, width = images.shape[-2:]
        ph, pw = self.backbone.size_divisor
        pad_h, pad_w = -height % ph, -width % pw
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        feats = self.backbone(x)
        size = x.shape[-2:]
        logits = _resize(self.decode_head(feats), size)[..., :height, :width]
        if not aux:
            return logits, None
        return logits, _resize(self.auxiliary_head(feats), size)[..., :height, :width]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, K, H, W) logits of the decode head."""
        return self._encode_decode(images, aux=False)[0]

    def _check_masks(self, masks, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(masks, torch.Tensor) or masks.is_floating_point() or masks.is_complex():
            raise ValueError(f"masks must be an integer tensor (batch, H, W), got "
                             f"{masks.dtype if isinstance(masks, torch.Tensor) else type(masks).__name__}")
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.dim() != 3 or masks.shape[0] != images.shape[0]:
            raise ValueError(f"masks must have shape (batch, H, W) with the images' batch {images.shape[0]}, got "
                             f"{tuple(masks.shape)}")
        masks = masks.long()
        bad = (masks != self.ignore_index) & ((masks < 0) | (masks >= self.num_classes))
        if bool(bad.any()):
            values = sorted(set(masks[bad].unique()[:10].tolist()))
            raise ValueError(f"mask values must be class indices 0..{self.num_classes - 1} or the ignore index "
                             f"{self.ignore_index}; found {values}")
        return masks

    def losses(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"loss", "loss_decode", "loss_aux"}: cross-entropy (mmseg's) of both heads, logits resized to the
        masks' size; loss_aux is already weighted by aux_weight and loss = loss_decode + loss_aux."""
        masks = self._check_masks(masks, images)
        logits, aux = self._encode_decode(images, aux=True)
        size = masks.shape[-2:]
        loss_decode = _cross_entropy(_resize(logits, size), masks, self.ignore_index)
        loss_aux = self.aux_weight * _cross_entropy(_resize(aux, size), masks, self.ignore_index)
        return {"loss": loss_decode + loss_aux, "loss_decode": loss_decode, "loss_aux": loss_aux}

    # ------------------------------------------------------------------ optimiser helpers
    def no_weight_decay(self, rule: str = "lbmamba") -> Set[str]:
        """Full names of the parameters trained without weight decay.

        rule "lbmamba": LBMamba's paramwise_cfg custom_keys (pos_embed, cls_token, norm, A_log, D), which
            mmengine matches as substrings of the full name: the position embedding, class token, every
            backbone norm (`layers.i.norm`, `outnorm_i`), `A_log` and `D` (and Vim's `D_b`, not
            `A_b_log`). The heads' BatchNorms are named `bn` and keep weight decay, as in LBMamba's runs.
        rule "vim": the layer-decay constructor of Vim's recipe (as LBMamba's copy,
            VimLayerDecayOptimizerConstructor): every 1-D parameter and every bias (its extra test
            `name in ('pos_embed', 'cls_token')` compares full `backbone.` names and never matches).
        """
        _check_choice("rule", rule, NO_DECAY_RULES)
        names = set()
        for name, param in self.named_parameters():
            if rule == "lbmamba":
                hit = any(key in name for key in _LBMAMBA_NO_DECAY_KEYS)
            else:
                hit = param.dim() == 1 or name.endswith(".bias")
            if hit:
                names.add(name)
        return names

    def layer_id(self, name: str) -> int:
        """Layer of parameter `name` for layer-wise lr decay, as LBMamba's VimLayerDecayOptimizerConstructor
        (`get_num_layer_for_vit`): 0 for the embeddings (cls_token, mask_token, pos_embed, patch_embed),
        i + 1 for backbone layer (or block) i, num_layers + 1 for everything else (norms, neck, heads).
        The lr scale is then decay ** (num_layers + 1 - layer_id)."""
        if name in _EMBEDDING_NAMES or name.startswith("backbone.patch_embed"):
            return 0
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "backbone" and parts[1] in ("layers", "blocks") and parts[2].isdigit():
            return int(parts[2]) + 1
        return self.num_layers + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def dense_backbone(backbone: Union[str, nn.Module], drop_path: float, backbone_kwargs: Optional[Dict[str, Any]],
                   timm_kwargs: Dict[str, Any], vision_mamba_kwargs: Dict[str, Any]) -> nn.Module:
    """The backbone of a segmentor or detector: a built model as it is, or a timm model name built without
    a classifier, with `timm_kwargs`, then `vision_mamba_kwargs` for the LBVim / Vim / uVim families, then
    the user's `backbone_kwargs` (which win)."""
    import timm

    if isinstance(backbone, nn.Module):
        if backbone_kwargs:
            raise ValueError("backbone_kwargs apply when the backbone is a model name, not a built model")
        return backbone
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        raise ValueError(f"unknown backbone {backbone!r} (not a timm model name); similar: {close}")
    kwargs = {**timm_kwargs, "drop_path_rate": float(drop_path), "num_classes": 0}
    if timm.models.is_model_in_modules(backbone, ["lbvim"]):
        # the entrypoint itself: timm.create_model drops None arguments, and class_token=None (Vim's
        # segmentation backbone, LBMamba's detection backbone) must reach the model
        kwargs = {**kwargs, **vision_mamba_kwargs, **(backbone_kwargs or {})}
        return timm.models.model_entrypoint(backbone)(pretrained=False, **kwargs)
    return timm.create_model(backbone, **{**kwargs, **(backbone_kwargs or {})})


def build_segmentor(
    backbone: Union[str, nn.Module] = "lbvim_tiny_patch16_224",
    num_classes: int = 150,
    *,
    img_size: int = 512,
    neck: str = "none",
    head_channels: int = 512,
    aux_channels: int = 256,
    aux_weight: float = 0.4,
    dropout: float = 0.1,
    feature_source: str = "mixer",
    out_indices: Optional[Sequence[int]] = None,
    backbone_norm: str = "layernorm",
    in_chans: int = 3,
    drop_path: float = 0.0,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    ignore_index: int = 255,
    out_norm: Optional[bool] = None,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
) -> Segmentor:
    """UperNet on a timm backbone.

    Args:
        backbone: a timm model name (LBVim / Vim / uVim, or any timm model with forward_intermediates) or
            a built model.
        img_size: the size the position embedding is built for (other sizes are resampled on the fly);
            VisionMamba families only: give other timm models their size arguments in backbone_kwargs.
        neck: "none" (LBMamba) or "vim".
        backbone_norm: "layernorm" (LBMamba's segmentation backbones) or "rmsnorm" (Vim's, and the
            classification models'); VisionMamba families only.
        drop_path: the backbone's stochastic depth rate.
        backbone_kwargs: more arguments for timm.create_model (e.g. embed_dim, depth, class_token=None).
        out_norm: per-output LayerNorms; None = as the neck's reference (LBMamba "none": yes, Vim "vim": no).
        The rest: see `Segmentor` and `BackboneAdapter`.
    """
    _check_choice("neck", neck, NECKS)
    _check_choice("feature_source", feature_source, FEATURE_SOURCES)
    _check_choice("backbone_norm", backbone_norm, BACKBONE_NORMS)
    _check_int("img_size", img_size)
    _check_int("in_chans", in_chans)
    if not 0.0 <= float(drop_path) < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    model = dense_backbone(backbone, drop_path, backbone_kwargs, dict(in_chans=in_chans),
                           dict(img_size=img_size, norm_layer=backbone_norm, global_pool=""))
    adapter = BackboneAdapter(model, out_indices=out_indices, feature_source=feature_source, neck=neck,
                              out_norm=(neck == "none") if out_norm is None else out_norm)
    return Segmentor(adapter, num_classes, head_channels=head_channels, aux_channels=aux_channels,
                     aux_weight=aux_weight, dropout=dropout, pool_scales=pool_scales, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------- inference
def _pair(name: str, value) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _check_int(name, value[0]), _check_int(name, value[1])
    if isinstance(value, int) and not isinstance(value, bool):
        _check_int(name, value)
        return value, value
    raise ValueError(f"{name} must be an int >= 1 or a pair (height, width) of them, got {value!r}")


def _slide(model: Segmentor, images: torch.Tensor, crop: Tuple[int, int], stride: Tuple[int, int]) -> torch.Tensor:
    """mmseg's slide_inference: a grid of crops (the last row / column flush with the image's edge),
    logits summed and divided by how many crops cover each pixel. A side shorter than the crop is taken
    whole, without padding."""
    batch, _, height, width = images.shape
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = images.new_zeros((batch, model.num_classes, height, width))
    count = images.new_zeros((1, 1, height, width))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            preds[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def predict_logits(model: Segmentor, images: torch.Tensor, *, mode: str = "whole", crop=512, stride=341,
                   flip: bool = False, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """(B, K, H, W) class scores at the images' size, with mmseg's test-time semantics (the model in eval
    mode; runs without gradients).

    mode "whole": one pass over each image. mode "slide": crops of `crop` every `stride` pixels (int or
    (h, w)), overlapping logits averaged. flip: also the horizontally flipped images, their output flipped
    back. scales: the images resized by each factor (bilinear), run, and the output resized back.

    One pass (no flip, one scale) returns its logits. With several passes mmseg averages the passes'
    softmax probabilities; this returns the log of that average, so softmax / argmax of the output are
    mmseg's probabilities / prediction in both cases.
    """
    if not isinstance(model, Segmentor):
        raise TypeError(f"model must be a Segmentor, got {type(model).__name__}")
    if model.training:
        raise ValueError("predict_logits needs the model in eval mode (model.eval()): in training mode BatchNorm "
                         "would normalise with, and update its statistics from, the test images")
    model._check_images(images)
    _check_choice("mode", mode, PREDICT_MODES)
    crop, stride = _pair("crop", crop), _pair("stride", stride)
    if mode == "slide" and (stride[0] > crop[0] or stride[1] > crop[1]):
        raise ValueError(f"stride {stride} must not exceed crop {crop} (the crops would leave gaps)")
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    if isinstance(scales, (int, float)) or not scales or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    height, width = images.shape[-2:]

    def run(x: torch.Tensor) -> torch.Tensor:
        return _slide(model, x, crop, stride) if mode == "slide" else model(x)

    total, passes = None, 0
    with torch.no_grad():
        for scale in scales:
            x = images
            if scale != 1:
                size = (max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1))
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flipped in ((False, True) if flip else (False,)):
                out = run(x.flip(-1)).flip(-1) if flipped else run(x)
                out = _resize(out, (height, width))
                passes += 1
                if len(scales) == 1 and not flip:
                    return out
                probs = out.float().softmax(dim=1)
                total = probs if total is None else total + probs
    return (total / passes).log()


# ---------------------------------------------------------------------------------------------- weights
@dataclass
class BackboneLoadReport:
    """What `load_backbone_weights` did. Names are the segmentor's (`backbone.*`) except `unexpected_keys`,
    which are the checkpoint's own."""

    source: str
    #: "backbone" (a classification checkpoint into the backbone), "segmentor" / "detector" (a whole state dict)
    kind: str
    loaded: List[str] = field(default_factory=list)
    #: left as initialised: the per-output norms and the neck (and, for a backbone checkpoint, the heads)
    missing_keys: List[str] = field(default_factory=list)
    #: LayerNorm biases absent from an RMSNorm checkpoint, set to zero
    zeroed_biases: List[str] = field(default_factory=list)
    #: checkpoint entries not loaded: the classifier, the final norm, pruned layers, a dropped class token
    unexpected_keys: List[str] = field(default_factory=list)
    #: (name, shape in the checkpoint, shape in the model); only with strict=False
    mismatched_keys: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    #: adaptations made, in words (position embedding resized, class-token entry removed)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source} into the {self.kind}"]
        if self.zeroed_biases:
            parts.append(f"{len(self.zeroed_biases)} LayerNorm biases absent from the checkpoint (RMSNorm) set to 0")
        if self.missing_keys:
            parts.append(f"{len(self.missing_keys)} new tensors left as initialised")
        if self.unexpected_keys:
            parts.append(f"{len(self.unexpected_keys)} checkpoint tensors not used")
        if self.mismatched_keys:
            parts.append(f"{len(self.mismatched_keys)} mis-shaped tensors skipped")
        return "; ".join(parts + self.notes)


def _is_head_or_neck_key(key: str) -> bool:
    return key.startswith(("outnorm_", "fpn"))


def _drop_class_token(state_dict: Dict[str, torch.Tensor], wrapped: VisionMamba, notes: List[str],
                      dropped: List[str]) -> None:
    """A class-token checkpoint (Vim's middle token) into a backbone without one, as Vim's segmentation
    backbone (`if_cls_token=False`): drop the token and its position-embedding entry."""
    if "cls_token" in state_dict:
        del state_dict["cls_token"]
        dropped.append("cls_token")
    pos = state_dict.get("pos_embed")
    if isinstance(pos, torch.Tensor) and pos.dim() == 3:
        n = pos.shape[1]
        side = int(round((n - 1) ** 0.5))
        if side * side == n - 1:
            index = class_token_index(n - 1, "middle")
            state_dict["pos_embed"] = torch.cat([pos[:, :index], pos[:, index + 1:]], dim=1)
            notes.append(f"the class token's position-embedding entry (index {index}) removed")


def _backbone_filter(adapter: BackboneAdapter) -> Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
    """The wrapped model's checkpoint adaptation (position-embedding resize): VisionMamba's, or the
    timm module's `checkpoint_filter_fn` for other models."""
    wrapped = adapter.model
    if isinstance(wrapped, VisionMamba):
        return lambda sd: checkpoint_filter_fn(sd, wrapped)
    module_filter = getattr(sys.modules.get(type(wrapped).__module__), "checkpoint_filter_fn", None)
    if callable(module_filter):
        return lambda sd: module_filter(sd, wrapped)
    return lambda sd: sd


def _read(checkpoint) -> Tuple[Dict[str, torch.Tensor], str]:
    if isinstance(checkpoint, Mapping):
        return unwrap_state_dict(checkpoint), "the given state dict"
    return read_checkpoint(checkpoint), os.fspath(checkpoint)


def load_backbone_weights(model: Segmentor, checkpoint, *, strict: bool = True) -> BackboneLoadReport:
    """Initialise `model` from a checkpoint file (or an already read dict) and say what was loaded.

    * A segmentor state dict (keys `decode_head.*`, e.g. an mmseg checkpoint `{'state_dict': ...}`) loads
      whole, `backbone.pos_embed` resized to the model's grid.
    * A classification checkpoint (ours or a reference `{'model': ...}`, or a backbone-only dict with
      `backbone.` prefixes) loads into `model.backbone`: the classifier (`head.*`), final norm and layers
      the backbone does not run are dropped, the position embedding is resized (a class token the
      backbone does not have is dropped with its entry), and RMSNorm weights load into a LayerNorm
      backbone with the missing biases set to zero (listed in `zeroed_biases`).

    Raises `CheckpointMismatchError` (naming the keys) when backbone tensors are missing (other than the
    new per-output norms / neck), or, with `strict`, when checkpoint tensors fit nowhere or have other
    shapes; `CheckpointReadError` when the file cannot be read.
    """
    if not isinstance(model, Segmentor):
        raise TypeError(f"model must be a Segmentor, got {type(model).__name__}")
    state_dict, source = _read(checkpoint)
    if any(k.startswith("decode_head.") for k in state_dict):
        return load_whole_weights(model, model.backbone, state_dict, source, strict=strict)
    return load_adapter_weights(model.backbone, state_dict, source, strict=strict)


def load_adapter_weights(adapter: BackboneAdapter, state_dict: Dict[str, torch.Tensor], source: str, *,
                         strict: bool = True, prefix: str = "backbone.") -> BackboneLoadReport:
    """A classification state dict into a `BackboneAdapter` (see `load_backbone_weights`); the report names
    the adapter's tensors with `prefix`, their place in the dense model."""
    if state_dict and all(k.startswith("backbone.") for k in state_dict):  # a backbone-only dict
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items()}
    state_dict = dict(state_dict)
    notes: List[str] = []
    dropped = [k for k in state_dict if k.startswith("head.") or k in adapter.removed_keys
               or k.rsplit(".", 1)[0] in adapter.removed_modules]
    for key in dropped:
        del state_dict[key]
    wrapped = adapter.model
    if isinstance(wrapped, VisionMamba) and wrapped.class_token is None and "cls_token" in state_dict:
        _drop_class_token(state_dict, wrapped, notes, dropped)
    expected = adapter.state_dict()
    pos = state_dict.get("pos_embed")
    try:
        state_dict = _backbone_filter(adapter)(state_dict)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointMismatchError(f"the checkpoint {source} does not fit the backbone: "
                                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    new_pos = state_dict.get("pos_embed")
    if isinstance(pos, torch.Tensor) and isinstance(new_pos, torch.Tensor) and pos.shape != new_pos.shape:
        notes.append(f"pos_embed resized from {list(pos.shape)} to {list(new_pos.shape)}")

    # RMSNorm checkpoints into LayerNorm modules: the weight loads, the bias starts at zero
    zeroed = []
    for name, module in adapter.named_modules():
        if isinstance(module, nn.LayerNorm) and module.bias is not None:
            if f"{name}.weight" in state_dict and f"{name}.bias" not in state_dict:
                state_dict[f"{name}.bias"] = torch.zeros_like(expected[f"{name}.bias"])
                zeroed.append(f"{name}.bias")

    result = compare_state_dict(adapter, state_dict)
    bad_missing = [k for k in result.missing_keys if not _is_head_or_neck_key(k)]
    if bad_missing or (strict and (result.unexpected_keys or result.mismatched_keys)):
        result.missing_keys = bad_missing
        if not strict:
            result.unexpected_keys, result.mismatched_keys = [], []
        message = _mismatch_message(adapter, source, result)
        if any(k.endswith(".bias") and k.rsplit(".", 1)[0].endswith("norm") for k in result.unexpected_keys):
            message += ("\nThe checkpoint's norms have biases (LayerNorm) and the backbone's do not (RMSNorm): "
                        "build the model with backbone_norm='layernorm'.")
        raise CheckpointMismatchError(message)
    bad = {k for k, _, _ in result.mismatched_keys}
    usable = {k: v for k, v in state_dict.items() if k in expected and k not in bad}
    adapter.load_state_dict(usable, strict=False)
    return BackboneLoadReport(
        source=source,
        kind="backbone",
        loaded=[f"{prefix}{k}" for k in usable if k not in zeroed],
        missing_keys=[f"{prefix}{k}" for k in result.missing_keys],
        zeroed_biases=[f"{prefix}{k}" for k in zeroed],
        unexpected_keys=dropped + result.unexpected_keys,
        mismatched_keys=[(f"{prefix}{k}", c, m) for k, c, m in result.mismatched_keys],
        notes=notes,
    )


def load_whole_weights(model: nn.Module, adapter: BackboneAdapter, state_dict: Dict[str, torch.Tensor],
                       source: str, *, strict: bool = True, prefix: str = "backbone.",
                       kind: str = "segmentor") -> BackboneLoadReport:
    """A whole dense model's state dict into `model` (its backbone `adapter` under `prefix`), the position
    embedding resized to the model's grid."""
    notes: List[str] = []
    key = f"{prefix}pos_embed"
    pos = state_dict.get(key)
    own = model.state_dict().get(key)
    if isinstance(pos, torch.Tensor) and isinstance(own, torch.Tensor) and pos.shape != own.shape:
        backbone_part = _backbone_filter(adapter)({"pos_embed": pos})
        state_dict = dict(state_dict, **{key: backbone_part["pos_embed"]})
        notes.append(f"{key} resized from {list(pos.shape)} to {list(own.shape)}")
    result = load_checkpoint(model, state_dict, strict=strict, filter_fn=lambda sd: sd, source=source)
    bad = {k for k, _, _ in result.mismatched_keys}
    return BackboneLoadReport(
        source=source, kind=kind,
        loaded=[k for k in state_dict if k not in result.unexpected_keys and k not in bad],
        missing_keys=result.missing_keys, unexpected_keys=result.unexpected_keys,
        mismatched_keys=result.mismatched_keys, notes=notes,
    )
