"""Semantic segmentation: UperNet over LBVim / Vim / uVim backbones (or any timm model with
`forward_intermediates`), in plain PyTorch with mmsegmentation's parameter names.

An mmseg-format state dict (`{'state_dict': ...}` or `{'model': ...}`) loads with `strict=True`: the
`Segmentor` is mmseg's `EncoderDecoder` (mmseg/models/segmentors/encoder_decoder.py), submodules
`backbone` (a `BackboneAdapter`, backbone.py, whose keys are the reference backbones'), `decode_head`
(`UPerHead`) and `auxiliary_head` (`FCNHead`, both uper_head.py).

Facts the defaults follow (LBMamba's configs, segmentation/configs/_base_/models/upernet_vim.py): the
auxiliary head reads the third map, loss weights 1.0 / 0.4. Cross-entropy is mmseg's default
(`avg_non_ignore=False`): the per-pixel losses, ignored pixels counting zero, averaged over all pixels of
the mask.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_choice, check_int
from .backbone import BACKBONE_NORMS, FEATURE_SOURCES, NECKS, BackboneAdapter, dense_backbone
from .uper_head import FCNHead, UPerHead, resize

__all__ = ["Segmentor", "build_segmentor"]


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
        check_int("num_classes", num_classes)
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
        """The backbone's depth (the layers it runs; the layer-wise lr decay of engine/optim.py counts them)."""
        return self.backbone.num_layers

    # ------------------------------------------------------------------ forward and losses
    def check_images(self, images) -> None:
        """Raise a ValueError naming what is wrong unless `images` is a float (B, in_chans, H, W) tensor."""
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
        self.check_images(images)
        height, width = images.shape[-2:]
        ph, pw = self.backbone.size_divisor
        pad_h, pad_w = -height % ph, -width % pw
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        feats = self.backbone(x)
        size = x.shape[-2:]
        logits = resize(self.decode_head(feats), size)[..., :height, :width]
        if not aux:
            return logits, None
        return logits, resize(self.auxiliary_head(feats), size)[..., :height, :width]

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
        loss_decode = _cross_entropy(resize(logits, size), masks, self.ignore_index)
        loss_aux = self.aux_weight * _cross_entropy(resize(aux, size), masks, self.ignore_index)
        return {"loss": loss_decode + loss_aux, "loss_decode": loss_decode, "loss_aux": loss_aux}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


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
    check_choice("neck", neck, NECKS)
    check_choice("feature_source", feature_source, FEATURE_SOURCES)
    check_choice("backbone_norm", backbone_norm, BACKBONE_NORMS)
    check_int("img_size", img_size)
    check_int("in_chans", in_chans)
    if not 0.0 <= float(drop_path) < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    model = dense_backbone(backbone, drop_path, backbone_kwargs, dict(in_chans=in_chans),
                           dict(img_size=img_size, norm_layer=backbone_norm, global_pool=""))
    adapter = BackboneAdapter(model, out_indices=out_indices, feature_source=feature_source, neck=neck,
                              out_norm=(neck == "none") if out_norm is None else out_norm)
    return Segmentor(adapter, num_classes, head_channels=head_channels, aux_channels=aux_channels,
                     aux_weight=aux_weight, dropout=dropout, pool_scales=pool_scales, ignore_index=ignore_index)
