"""Feature pyramids for the detectors: ViTDet's simple feature pyramid over one map of a plain backbone,
and an FPN over a staged backbone's four maps. Both return torchvision's pyramid format: an OrderedDict
"0", "1", "2", "3", "pool" of maps at strides 4, 8, 16, 32, 64.

Facts they follow:

* LBMamba (detection/configs/lbmamba/vitdet_cascade_mask-rcnn_bivim_tiny_norope_rms_lsj-300e.py): neck
  ViTDet `SimpleFPN` (backbone_channel 192, in_channels [48, 96, 192, 192], 256 out, num_outs 5, LN2d).
* mmdetection (projects/ViTDet/vitdet/simple_fpn.py): fpn1 = ConvTranspose2d(C, C/2, 2, 2), LN2d, GELU,
  ConvTranspose2d(C/2, C/4, 2, 2); fpn2 = ConvTranspose2d(C, C/2, 2, 2); fpn3 = identity; fpn4 =
  MaxPool2d(2); per level a 1x1 and a 3x3 ConvModule with the norm and no activation; the 5th level is
  `max_pool2d(outs[-1], 1, stride=2)`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from ._checks import check_int

__all__ = ["PYRAMID_STRIDES", "PYRAMID_NAMES", "LN2D_EPS", "SimpleFeaturePyramid", "HierarchicalFeaturePyramid"]

PYRAMID_STRIDES = (4, 8, 16, 32, 64)
PYRAMID_NAMES = ("0", "1", "2", "3", "pool")
LN2D_EPS = 1e-6  # mmdet's ViTDet LN2d


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv ConvModule with LN2d and no activation: conv (no bias, as under a norm) then LayerNorm2d."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(out_channels, eps=LN2D_EPS),
    )


def _pyramid_dict(outs: List[torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    outs = outs + [F.max_pool2d(outs[-1], kernel_size=1, stride=2)]  # mmdet's extra level (num_outs 5)
    return OrderedDict(zip(PYRAMID_NAMES, outs))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (mmdet SimpleFPN) from one map of a plain backbone.

    From a (B, C, H/s, W/s) map, four maps at strides 4, 8, 16, 32 with C/4, C/2, C, C channels (for s=16:
    two 2x2 stride-2 transposed convs with LayerNorm2d + GELU between, one transposed conv, identity,
    2x2 max-pool; for other strides the same branches by scale factor), each then a 1x1 and a 3x3 conv
    with LayerNorm2d to `out_channels`, plus the stride-64 level max-pooled from the last. Returns an
    OrderedDict "0", "1", "2", "3", "pool" as torchvision's heads take it.
    """

    def __init__(self, in_channels: int, in_stride: int = 16, out_channels: int = 256):
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("out_channels", out_channels)
        if in_stride not in (4, 8, 16, 32, 64):
            raise ValueError(f"the backbone map's stride must be 4, 8, 16, 32 or 64 (a power of 2 the pyramid can "
                             f"resample to strides 4..32), got {in_stride!r}")
        c = in_channels
        self.in_channels, self.in_stride, self.out_channels = c, in_stride, out_channels
        self.strides = PYRAMID_STRIDES
        branches, widths = [], []
        for target, width in zip((4, 8, 16, 32), (c // 4, c // 2, c, c)):
            branch, width = self._branch(c, in_stride, target, width)
            branches.append(branch)
            widths.append(width)
        self.branches = nn.ModuleList(branches)
        self.lateral_convs = nn.ModuleList(_conv_norm(w, out_channels, 1) for w in widths)
        self.output_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3) for _ in widths)
        self.branch_channels = widths

    @staticmethod
    def _branch(c: int, in_stride: int, target: int, width: int) -> Tuple[nn.Module, int]:
        if target == in_stride:
            return nn.Identity(), c
        if target > in_stride:
            k = target // in_stride
            return nn.MaxPool2d(kernel_size=k, stride=k), c
        ups = (in_stride // target).bit_length() - 1  # number of 2x upsamplings
        if ups == 1:
            return nn.ConvTranspose2d(c, max(width, 1), 2, stride=2), max(width, 1)
        layers: List[nn.Module] = []
        ch = c
        for i in range(ups):
            out = max(ch // 2, 1)
            layers.append(nn.ConvTranspose2d(ch, out, 2, stride=2))
            if i < ups - 1:
                layers += [LayerNorm2d(out, eps=LN2D_EPS), nn.GELU()]
            ch = out
        return nn.Sequential(*layers), ch

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SimpleFeaturePyramid takes (B, {self.in_channels}, H, W) maps, got {tuple(x.shape)}")
        outs = [out(lat(branch(x))) for branch, lat, out in zip(self.branches, self.lateral_convs, self.output_convs)]
        return _pyramid_dict(outs)


class HierarchicalFeaturePyramid(nn.Module):
    """FPN over a hierarchical backbone's four stages (VMamba: strides 4, 8, 16, 32): per stage a 1x1
    conv with LayerNorm2d, the top-down path (nearest 2x upsampling, summed), a 3x3 conv with
    LayerNorm2d, `out_channels` each, plus the stride-64 level max-pooled from the last."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) != 4:
            raise ValueError(f"HierarchicalFeaturePyramid takes 4 stages, got in_channels={in_channels}")
        self.in_channels, self.out_channels, self.strides = in_channels, out_channels, PYRAMID_STRIDES
        self.lateral_convs = nn.ModuleList(_conv_norm(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        if len(feats) != 4:
            raise ValueError(f"HierarchicalFeaturePyramid takes 4 maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        return _pyramid_dict([conv(x) for conv, x in zip(self.output_convs, laterals)])
