"""Backbones for the dense models: any timm model with `forward_intermediates` (LBVim / Vim / uVim, the
other vision Mambas, timm's ViTs) turned into a feature extractor, as torchvision's backbone_utils does.

* `BackboneAdapter`: a plain backbone's chosen layers as NCHW maps, image order, each with its own
  LayerNorm, optionally through Vim's resampling branches; the backbone of a `Segmentor`.
* `DetectionBackbone`: a `BackboneAdapter` (`body`) and a feature pyramid (`fpn`); the backbone of a
  `Detector`.
* `dense_backbone`: the timm model either one wraps, built from a model name.

State-dict keys (the reference checkpoints' names, which load with `strict=True`): the adapter keeps the
wrapped model as its submodule `model` and maps its keys to the top level (`model.layers.3.mixer.A_log`
is saved and loaded as `layers.3.mixer.A_log`); in a segmentor, `backbone.*`:

* the wrapped model's own names (`patch_embed.*`, `pos_embed`, `cls_token`, `layers.{i}.*` as
  `VisionMamba` names them, i.e. as the reference classification code does); the classifier and the
  final norm are removed, as both references delete them (`del self.head`, `del self.norm_f`);
* the per-output LayerNorms `outnorm_{i}` of LBMamba's `Backbone_BiVisionMamba` (cvlab-stonybrook/LBMamba
  segmentation/model.py);
* Vim's `fpn1`..`fpn4` (hustvl/Vim seg/backbone/vim.py, `VisionMambaSeg.fpn1..fpn4`: `fpn1` =
  ConvTranspose2d, BatchNorm, GELU, ConvTranspose2d: keys `fpn1.0.*`, `fpn1.1.*`, `fpn1.3.*`). There is
  no `neck` module in mmseg's sense: Vim's four resampling branches live inside its backbone, so their
  keys are `backbone.fpn1.*` as in Vim's checkpoints.

Facts the defaults follow (read from the reference configs):

* LBMamba segmentation (segmentation/configs/_base_/models/upernet_vim.py and lbmamba/uppernet_biVim_*):
  neck None (four stride-16 maps), backbone out_indices (5, 11, 17, 23), LayerNorm (`rms_norm=False`),
  features = the block's `hidden_states` (the mixer output), flipped back to image order.
* Vim segmentation (seg/configs/vim/upernet/upernet_vim_tiny_24_512_slide_60k.py): RMSNorm, no class
  token (`if_cls_token=False`), mixer-output features (`use_residual_as_feature=False`), `fpn1..4`, and
  no per-output norms.
* LBMamba detection (detection/configs/lbmamba/vitdet_cascade_mask-rcnn_bivim_tiny_norope_rms_lsj-300e.py,
  detection/model.py): backbone BiVim-T with RMSNorm, no class token, drop path 0.1, img_size 1024,
  out_indices [23]: the last layer's mixer output (`hidden_states`) in image token order through one
  LayerNorm `outnorm_0`, then ViTDet's simple feature pyramid (see feature_pyramid.py).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from ._checks import check_choice, check_int
from .feature_pyramid import HierarchicalFeaturePyramid, SimpleFeaturePyramid

__all__ = [
    "FEATURE_SOURCES",
    "NECKS",
    "BACKBONE_NORMS",
    "WRAPPED",
    "default_out_indices",
    "dense_backbone",
    "BackboneAdapter",
    "DetectionBackbone",
]

FEATURE_SOURCES = ("mixer", "residual")
NECKS = ("none", "vim")
BACKBONE_NORMS = ("layernorm", "rmsnorm")
#: the submodule a `BackboneAdapter` keeps the wrapped model under; its state-dict keys drop this prefix
WRAPPED = "model"


def default_out_indices(depth: int) -> Tuple[int, ...]:
    """Four evenly spaced layers ending with the last: (5, 11, 17, 23) for 24 layers."""
    check_int("depth", depth, 4)
    return tuple((k + 1) * depth // 4 - 1 for k in range(4))


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


# ---------------------------------------------------------------------------------------------- state-dict keys
# The wrapped model is an ordinary submodule (`model`), so `named_parameters()` names its tensors
# `model.*` (`state_dict_key` gives a name's key), and parameter moves, module swaps (SyncBatchNorm), DDP
# and torch.compile see an ordinary module tree. Only the state dict is mapped, by torch's public
# state-dict hooks, so that its keys are the reference checkpoints': saving strips `model.` (keeping the
# keys' order), loading puts it back on every key that does not belong to the adapter's own modules
# (`outnorm_{i}`, `fpn{i}`), and the missing / unexpected keys torch reports are given back in the saved
# form. (The modules' version metadata stays under their module names.)
def _own_names(adapter: nn.Module) -> Set[str]:
    return {name for name, _ in adapter.named_children() if name != WRAPPED}


def _save_wrapped_at_top_level(adapter: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    inner = prefix + WRAPPED + "."
    items = list(state_dict.items())
    state_dict.clear()  # rebuilt in place, in the same order
    for key, value in items:
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value


def _load_wrapped_from_top_level(adapter: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                                 unexpected_keys, error_msgs) -> None:
    own = _own_names(adapter)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".", 1)[0] not in own:
            state_dict[f"{prefix}{WRAPPED}.{rest}"] = state_dict.pop(key)
    adapter._loading_prefix = prefix  # for the report below, which torch calls without it


def _report_at_top_level(adapter: nn.Module, incompatible_keys) -> None:
    prefix = getattr(adapter, "_loading_prefix", None)
    if prefix is None:
        return
    del adapter._loading_prefix
    inner = prefix + WRAPPED + "."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + k[len(inner):] if k.startswith(inner) else k for k in keys]


# ---------------------------------------------------------------------------------------------- adapter
class BackboneAdapter(nn.Module):
    """Four NCHW feature maps from a plain backbone, for the segmentation heads.

    Wraps a `VisionMamba` (LBVim / Vim / uVim) or any timm model with `forward_intermediates`, which
    gives the layers' outputs. The outputs of layers `out_indices` come back in image token order
    whatever the flips did, without the class token, each through its own LayerNorm (`outnorm_{i}`) when
    `out_norm`, then through Vim's `fpn1..fpn4` when `neck="vim"`. Any input size divisible by the patch
    runs: VisionMamba resizes its position embedding to the patch grid, and the LB scan's window "auto" is
    resolved from each call's token count (4 / 8 / 16 up to 128 / 256 / more tokens).

    The wrapped model is the submodule `model` (parameter names `model.*`); the state dict holds its keys
    at the top level, beside `outnorm_{i}` / `fpn{i}` (see the module docstring; `state_dict_key` maps a
    name to its key). Its classifier and final norm are removed, and so are the layers after the last of
    `out_indices`.

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
        check_choice("feature_source", feature_source, FEATURE_SOURCES)
        check_choice("neck", neck, NECKS)
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

        # the model's keys and the adapter's own share the top level of the state dict
        top_level = {k.split(".", 1)[0] for k in kept} | {name for name, _ in model.named_children()}
        taken = [name for name in [f"outnorm_{i}" for i in range(4)] + [f"fpn{i}" for i in range(1, 5)]
                 if name in top_level]
        if taken:
            raise ValueError(f"{type(model).__name__} already has attributes named {taken}")
        self.model = model
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
        self.register_state_dict_post_hook(_save_wrapped_at_top_level)
        self.register_load_state_dict_pre_hook(_load_wrapped_from_top_level)
        self.register_load_state_dict_post_hook(_report_at_top_level)

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

    @staticmethod
    def state_dict_key(name: str) -> str:
        """The state-dict key of the tensor this module names `name` (as `named_parameters()` /
        `named_buffers()` give it): `model.layers.3.mixer.A_log` -> `layers.3.mixer.A_log`; the adapter's
        own names (`outnorm_0.weight`, `fpn1.0.weight`) and keys are returned as they are."""
        inner = WRAPPED + "."
        return name[len(inner):] if name.startswith(inner) else name

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if callable(getattr(self.model, "set_grad_checkpointing", None)):
            self.model.set_grad_checkpointing(enable)

    def intermediates(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The chosen layers' outputs, NCHW, image order, class token removed (no norms, no neck)."""
        kwargs = dict(indices=list(self.out_indices), norm=False, stop_early=True, output_fmt="NCHW",
                      intermediates_only=True)
        if self.takes_source:
            kwargs["source"] = self.feature_source
        return list(self.model.forward_intermediates(x, **kwargs))

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


class _LastLayerAdapter(BackboneAdapter):
    """BackboneAdapter taking only the last layer (LBMamba's detection backbone: out_indices [23],
    one `outnorm_0`): the layer's output in image order, class token removed, through the LayerNorm."""

    @staticmethod
    def _check_indices(out_indices, depth: int) -> Tuple[int, ...]:
        return (depth - 1,)


# ---------------------------------------------------------------------------------------------- detection
class DetectionBackbone(nn.Module):
    """Backbone + pyramid: images -> OrderedDict of 5 maps ("0".."3", "pool") at strides 4..64.

    `body` is a `BackboneAdapter` (its state-dict keys are the wrapped timm model's, under `body.`);
    `fpn` is a `SimpleFeaturePyramid` (plain backbones: one stride for every layer) or a
    `HierarchicalFeaturePyramid` (VMamba and other staged backbones).
    """

    def __init__(self, model: nn.Module, *, feature_source: Optional[str] = None, out_channels: int = 256):
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not isinstance(info, (list, tuple)) or not info:
            raise TypeError(f"{type(model).__name__} has no feature_info list to take layer widths / strides from")
        if not callable(getattr(model, "forward_intermediates", None)):
            raise TypeError(f"the backbone must have timm's forward_intermediates(); {type(model).__name__} has not")
        strides = [int(i["reduction"]) for i in info]
        if feature_source is None:
            takes = "source" in inspect.signature(model.forward_intermediates).parameters
            feature_source = "mixer" if takes else "residual"
        check_choice("feature_source", feature_source, FEATURE_SOURCES)
        self.hierarchical = len(set(strides)) > 1
        if self.hierarchical:
            if len(info) < 4 or strides[-4:] != [4, 8, 16, 32]:
                raise ValueError(f"a staged backbone needs its last four stages at strides 4, 8, 16, 32; "
                                 f"{type(model).__name__} has strides {strides}")
            n = len(info)
            self.body = BackboneAdapter(model, out_indices=tuple(range(n - 4, n)), feature_source=feature_source,
                                        neck="none", out_norm=True)
            self.fpn: nn.Module = HierarchicalFeaturePyramid(self.body.out_channels, out_channels)
        else:
            self.body = _LastLayerAdapter(model, feature_source=feature_source, neck="none", out_norm=True)
            self.fpn = SimpleFeaturePyramid(self.body.out_channels[0], self.body.out_strides[0], out_channels)
        self.out_channels = out_channels  # torchvision's heads read this
        self.feature_source = feature_source
        self.size_divisor = self.body.size_divisor

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(feats if self.hierarchical else feats[0])
