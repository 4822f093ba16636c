"""Optimizers and their parameter groups: every reference rule lbmamba reproduces, in one place, by name.

A rule says which parameters train without weight decay and, for layer-wise decay, each parameter's lr
scale. Models give only timm's hooks (`no_weight_decay()`, the `_no_weight_decay` marks on SSM parameters)
and their depth (`num_layers` of the dense models); the rules below read parameter names the way each
reference does, quirks included. A task picks a preset from its config (`preset_for`):

==================  ==========================================================================================
preset              the reference rule
==================  ==========================================================================================
vim_imagenet        LBVim / Vim ImageNet (timm's `param_groups_weight_decay`): no decay on 1-d parameters,
                    biases and `no_weight_decay()` (pos_embed, cls_token); A_log is 2-d and decayed. With
                    `no_decay_ssm` the SSM matrices marked `_no_weight_decay` are exempt too. Any timm optimizer.
lbmamba_seg         LBMamba's segmentation (mmseg paramwise_cfg custom_keys, matched as substrings of the full
                    name): no decay on names holding pos_embed, cls_token, norm, A_log, D. AdamW.
vim_seg             Vim's segmentation layer-decay constructor: no decay on 1-d parameters and biases (its
                    extra name test compares full `backbone.` names and never matches). AdamW.
lbmamba_det         LBMamba's detection LayerDecayOptimizerConstructor as run: no decay on names holding
                    pos_embed and on ViT-block norms; lr scale decay^(12 + 1 - layer id) with the Mamba-layer
                    branch of its `get_layer_id_for_vit` commented out, so the patch and position embeddings
                    get decay^13 and every other parameter 1. AdamW.
per_layer_det       the same with the intended per-layer decay (layer i of n: decay^(n - i)). AdamW.
off_det             the same weight-decay rule, no layer-wise decay. AdamW.
mambamil            MambaMIL's: torch.optim.Adam with L2 weight decay on every parameter.
mambamil_adamw      AdamW, no decay on the model's `no_weight_decay()` names (biases, norms, A_log, D).
==================  ==========================================================================================

Segmentation's presets also take `layer_decay` (Vim's recipe: 0.92), with `segmentation_layer_id`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn

from .errors import UserError

__all__ = ["PRESETS", "preset_for", "param_groups", "create_optimizer", "grouped", "segmentation_layer_id",
           "detection_layer_id", "detection_lr_scale", "detection_no_weight_decay",
           "segmentation_no_weight_decay"]

PRESETS = ("vim_imagenet", "lbmamba_seg", "vim_seg", "lbmamba_det", "per_layer_det", "off_det", "mambamil",
           "mambamil_adamw")
#: the mmdet config's num_layers, which LBMamba's detection run keeps whatever the backbone's depth
_LBMAMBA_DET_NUM_LAYERS = 12
_LBMAMBA_SEG_NO_DECAY_KEYS = ("pos_embed", "cls_token", "norm", "A_log", "D")
_EMBEDDING_NAMES = ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed")


def preset_for(task: str, cfg: Mapping[str, Any]) -> str:
    """The preset a task's config keys choose (the keys each task has always had)."""
    if task == "classification":
        return "vim_imagenet"
    if task == "segmentation":
        return f"{cfg['decay_rule']}_seg"
    if task == "detection":
        return f"{cfg['layer_decay_mode']}_det"
    if task == "mil":
        return "mambamil" if cfg["opt"] == "adam" else "mambamil_adamw"
    raise ValueError(f"unknown task {task!r}")


# ----------------------------------------------------------------------------------------------- name rules
def named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) pairs with the parameters' state-dict names, the names the references' rules read (a
    wrapper such as the dense backbone adapter may map its module names to them)."""
    key = {id(p): name for name, p in model.state_dict(keep_vars=True).items() if isinstance(p, nn.Parameter)}
    return [(key.get(id(p), name), p) for name, p in model.named_parameters()]


def segmentation_no_weight_decay(model: nn.Module, rule: str) -> Set[str]:
    """Full names of a segmentor's parameters trained without weight decay under `rule` ("lbmamba" or "vim";
    see the table above). The heads' BatchNorms are named `bn` and keep weight decay under "lbmamba", as in
    LBMamba's runs."""
    names = set()
    for name, param in named_parameters(model):
        if rule == "lbmamba":
            hit = any(key in name for key in _LBMAMBA_SEG_NO_DECAY_KEYS)
        elif rule == "vim":
            hit = param.dim() == 1 or name.endswith(".bias")
        else:
            raise ValueError(f"rule must be 'lbmamba' or 'vim', got {rule!r}")
        if hit:
            names.add(name)
    return names


def segmentation_layer_id(name: str, num_layers: int) -> int:
    """Layer of a segmentor's parameter for layer-wise lr decay, as Vim's VimLayerDecayOptimizerConstructor
    (`get_num_layer_for_vit`): 0 for the embeddings (cls_token, mask_token, pos_embed, patch_embed), i + 1 for
    backbone layer (or block) i, num_layers + 1 for everything else (norms, neck, heads). The lr scale is then
    decay ** (num_layers + 1 - layer_id)."""
    if name in _EMBEDDING_NAMES or name.startswith("backbone.patch_embed"):
        return 0
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "backbone" and parts[1] in ("layers", "blocks") and parts[2].isdigit():
        return int(parts[2]) + 1
    return num_layers + 1


def _detection_reference_name(name: str) -> str:
    """A detector parameter's name as LBMamba's mmdet model spells it: `backbone.body.X` -> `backbone.X`,
    `backbone.fpn.X` -> `neck.X` (the other names are kept)."""
    if name.startswith("backbone.body."):
        return "backbone." + name[len("backbone.body."):]
    if name.startswith("backbone.fpn."):
        return "neck." + name[len("backbone.fpn."):]
    return name


def detection_layer_id(name: str, num_layers: int, *, per_layer: bool = False) -> int:
    """Layer of a detector's parameter, as LBMamba's `get_layer_id_for_vit`: 0 for names holding patch_embed /
    pos_embed, i + 1 for ViT blocks `backbone.blocks.i`, num_layers + 1 for everything else. Its branch for
    the Mamba layers (`backbone.layers.i`) is commented out, so they get num_layers + 1 too; `per_layer=True`
    restores it (i + 1)."""
    ref = _detection_reference_name(name)
    if not ref.startswith("backbone"):
        return num_layers + 1
    if "patch_embed" in ref or "pos_embed" in ref:
        return 0
    if ".blocks." in ref or (per_layer and ".layers." in ref):
        return int(ref.split(".")[2]) + 1
    return num_layers + 1


def detection_lr_scale(name: str, decay_rate: float, depth: int, *, per_layer: bool = False) -> float:
    """decay_rate ** (num_layers + 1 - layer_id), as LBMamba's LayerDecayOptimizerConstructor: as run
    (num_layers 12 from its config) or, `per_layer`, the intended decay over the backbone's `depth`."""
    if not 0.0 < float(decay_rate) <= 1.0:
        raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate!r}")
    num_layers = depth if per_layer else _LBMAMBA_DET_NUM_LAYERS
    return float(decay_rate) ** (num_layers + 1 - detection_layer_id(name, num_layers, per_layer=per_layer))


def detection_no_weight_decay(model: nn.Module) -> Set[str]:
    """Full names of the detector parameters LBMamba's constructor trains without weight decay: names holding
    `pos_embed`, and norms of ViT blocks (`backbone.blocks.*norm*`). Everything else, the Mamba layers' norms,
    biases, A_log and D included, gets the weight decay there."""
    names = set()
    for name, _ in named_parameters(model):
        ref = _detection_reference_name(name)
        if (ref.startswith("backbone.blocks") and "norm" in ref) or "pos_embed" in ref:
            names.add(name)
    return names


# ----------------------------------------------------------------------------------------------- groups
def grouped(model: nn.Module, weight_decay: float, no_decay: Set[str],
            lr_scale: Optional[Callable[[str], float]] = None) -> List[Dict[str, Any]]:
    """Parameter groups by (decayed, lr scale) of the parameters' state-dict names, in the order parameters
    first appear; each group carries its
    `lr_scale` (the iteration schedules multiply it in). Frozen parameters are left out."""
    groups: Dict[Tuple[bool, float], Dict[str, Any]] = {}
    for name, param in named_parameters(model):
        if not param.requires_grad:
            continue
        decay = name not in no_decay
        scale = 1.0 if lr_scale is None else lr_scale(name)
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def _ssm_marked(model: nn.Module) -> Set[str]:
    """The SSM matrices a mixer marks `_no_weight_decay` (A_log, A_b_log; D is 1-d)."""
    return {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False) and p.ndim > 1}


def param_groups(model: nn.Module, preset: str, weight_decay: float, *, layer_decay: Optional[float] = None,
                 no_decay_ssm: bool = False) -> List[Dict[str, Any]]:
    """The parameter groups of `preset` (see the module's table)."""
    if preset == "vim_imagenet":
        from timm.optim import param_groups_weight_decay

        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        if no_decay_ssm:
            skip |= _ssm_marked(model)
        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    if preset in ("lbmamba_seg", "vim_seg"):
        skip = segmentation_no_weight_decay(model, preset[: -len("_seg")])
        scale = None
        if layer_decay is not None:
            scale = lambda name: layer_decay ** (model.num_layers + 1 - segmentation_layer_id(name, model.num_layers))
        return grouped(model, weight_decay, skip, scale)
    if preset in ("lbmamba_det", "per_layer_det", "off_det"):
        scale = None
        if preset != "off_det":
            per_layer = preset == "per_layer_det"
            scale = lambda name: detection_lr_scale(name, layer_decay, model.num_layers, per_layer=per_layer)
        return grouped(model, weight_decay, detection_no_weight_decay(model), scale)
    if preset == "mambamil":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    if preset == "mambamil_adamw":
        groups = grouped(model, weight_decay, set(model.no_weight_decay()))
        for group in groups:
            del group["lr_scale"]
        return sorted(groups, key=lambda g: g["weight_decay"] == 0.0)  # decayed first, as MambaMIL's copy
    raise ValueError(f"unknown optimizer preset {preset!r} (one of {', '.join(PRESETS)})")


def create_optimizer(preset: str, groups: List[Dict[str, Any]], lr: float,
                     cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of `preset` over `groups`: timm's `create_optimizer_v2(cfg['opt'])` for the classification
    preset, torch's Adam (L2) for MambaMIL's, torch's AdamW (the config's betas where it has them) otherwise."""
    if preset == "vim_imagenet":
        from timm.optim import create_optimizer_v2

        try:
            return create_optimizer_v2(groups, opt=cfg["opt"], lr=lr, weight_decay=cfg["weight_decay"],
                                       momentum=cfg["momentum"], eps=cfg["opt_eps"])
        except (AssertionError, ValueError) as exc:
            raise UserError(f"opt {cfg['opt']!r}: {exc}") from exc
    if preset == "mambamil":
        return torch.optim.Adam(groups, lr=lr, weight_decay=cfg["weight_decay"])
    betas = tuple(cfg["betas"]) if "betas" in cfg else (0.9, 0.999)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=cfg["weight_decay"])
