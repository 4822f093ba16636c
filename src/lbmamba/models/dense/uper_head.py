"""UperNet's decode head and the FCN auxiliary head, in plain PyTorch with mmsegmentation's parameter names.

Where each name comes from:

* `UPerHead` (a segmentor's `decode_head.*`): mmseg decode_heads/uper_head.py with psp_head.py's `PPM`
  (`psp_modules.{i}.1.*`), `bottleneck`, `lateral_convs.{i}`, `fpn_convs.{i}`, `fpn_bottleneck`;
  `FCNHead` (`auxiliary_head.*`): fcn_head.py (`convs.{i}`, `conv_cat` when concat_input); both end in
  decode_head.py's `dropout` (Dropout2d) and `conv_seg` (1x1 conv with bias). Every conv block is
  mmcv's `ConvModule` with BatchNorm: `conv` (no bias, as bias='auto' gives under a norm), `bn`, ReLU.

Facts the defaults follow (read from the reference configs):

* LBMamba (segmentation/configs/_base_/models/upernet_vim.py and lbmamba/uppernet_biVim_*): UPerHead
  channels 512, pool scales (1, 2, 3, 6), FCNHead on in_index 2 with channels 256, num_convs 1,
  concat_input False, dropout 0.1 in both heads, SyncBN, align_corners False.
* Vim (seg/configs/vim/upernet/upernet_vim_tiny_24_512_slide_60k.py): the same heads with UPerHead
  channels 192 (tiny) / 384 (small).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_int

__all__ = ["resize", "ConvModule", "PPM", "UPerHead", "FCNHead"]


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """mmseg's `resize` as the heads call it: bilinear, align_corners=False (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


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
        return [resize(stage(x), x.shape[2:]) for stage in self]


class _DecodeHead(nn.Module):
    """mmseg's BaseDecodeHead end: Dropout2d then the 1x1 `conv_seg` (normal std 0.01, bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        check_int("num_classes", num_classes)
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
        super().__init__(check_int("head_channels", channels), num_classes, dropout)
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
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """The auxiliary head (mmseg fcn_head.FCNHead) on map `in_index`: `num_convs` 3x3 ConvModules."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2, num_convs: int = 1,
                 concat_input: bool = False, dropout: float = 0.1, kernel_size: int = 3):
        super().__init__(check_int("aux_channels", channels), num_classes, dropout)
        check_int("num_convs", num_convs)
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
