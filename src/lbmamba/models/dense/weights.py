"""Initialising the dense models from checkpoints: a whole segmentor / detector state dict (mmseg's
`{'state_dict': ...}`, ours), or a classification checkpoint (ours, or the references' `{'model': ...}`)
into the backbone, with a report of what was loaded, adapted and left as initialised."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from ...nn.pos_embed import class_token_index
from ..checkpoint import (
    CheckpointMismatchError,
    compare_state_dict,
    load_checkpoint,
    read_checkpoint,
    unwrap_state_dict,
)
from ..lbvim import VisionMamba
from .backbone import BackboneAdapter
from .detector import Detector
from .segmentor import Segmentor

__all__ = [
    "BackboneLoadReport",
    "load_backbone_weights",
    "load_adapter_weights",
    "load_whole_weights",
    "load_detector_weights",
]


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
    """The wrapped model's checkpoint adaptation (position-embedding resize): the `checkpoint_filter` of our
    families, or the timm module's `checkpoint_filter_fn` for other models."""
    wrapped = adapter.model
    if callable(getattr(wrapped, "checkpoint_filter", None)):
        return wrapped.checkpoint_filter
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
    for module_name, module in adapter.named_modules():
        name = adapter.state_dict_key(module_name)
        if isinstance(module, nn.LayerNorm) and module.bias is not None:
            if f"{name}.weight" in state_dict and f"{name}.bias" not in state_dict:
                state_dict[f"{name}.bias"] = torch.zeros_like(expected[f"{name}.bias"])
                zeroed.append(f"{name}.bias")

    result = compare_state_dict(adapter, state_dict)
    bad = {k for k, _, _ in result.mismatched_keys}
    usable = {k: v for k, v in state_dict.items() if k in expected and k not in bad}
    # The new per-output norms and neck (and, with strict=False, the mis-shaped tensors) keep their
    # initialisation: given their own values, only the backbone's tensors must come from the checkpoint
    # (and, with strict, nothing else may be there).
    keep = [k for k in result.missing_keys if _is_head_or_neck_key(k)] + ([] if strict else sorted(bad))
    own = {k: expected[k].clone() for k in keep}
    try:
        load_checkpoint(adapter, {**(state_dict if strict else usable), **own}, strict=True,
                        filter_fn=lambda sd: sd, source=source)
    except CheckpointMismatchError as exc:
        if strict and any(k.endswith(".bias") and k.rsplit(".", 1)[0].endswith("norm")
                          for k in result.unexpected_keys):
            raise CheckpointMismatchError(
                f"{exc}\nThe checkpoint's norms have biases (LayerNorm) and the backbone's do not (RMSNorm): "
                "build the model with backbone_norm='layernorm'.") from None
        raise
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


def load_detector_weights(model: Detector, checkpoint, *, strict: bool = True) -> BackboneLoadReport:
    """Initialise `model` from a checkpoint file (or an already read dict) and say what was loaded: a whole
    detector state dict (ours: keys `rpn.*` / `roi_heads.*`) loads whole, the position embedding resized to
    the model's grid; a classification checkpoint loads into the backbone as `load_backbone_weights` does
    for a segmentor (the pyramid and heads keep their initialisation). Raises `CheckpointMismatchError`."""
    if not isinstance(model, Detector):
        raise TypeError(f"model must be a Detector, got {type(model).__name__}")
    state_dict, source = _read(checkpoint)
    body = model.backbone.body
    if any(k.startswith(("rpn.", "roi_heads.")) for k in state_dict):
        return load_whole_weights(model, body, state_dict, source, strict=strict, prefix="backbone.body.",
                                  kind="detector")
    return load_adapter_weights(body, state_dict, source, strict=strict, prefix="backbone.body.")
