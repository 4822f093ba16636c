"""Building the model a command names: timm names checked with suggestions, the classifier of a config, and
initial weights from a checkpoint."""

from __future__ import annotations

import difflib
import warnings
from typing import Any, List, Mapping, Optional

import torch.nn as nn

from ..models import CheckpointMismatchError, load_checkpoint
from .errors import UserError
from .runs import note

__all__ = ["suggest_model_names", "check_model_name", "create_classifier", "load_initial_weights"]


def suggest_model_names(name: str, n: int = 3) -> List[str]:
    import timm

    family = timm.list_models("*vim*") + timm.list_models("*mamba*")
    close = difflib.get_close_matches(name, family, n=n, cutoff=0.5)
    if len(close) < n:
        close += [m for m in difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6) if m not in close]
    return close[:n]


def check_model_name(name: Optional[str]) -> str:
    """`name` when timm knows it; UserError with suggestions otherwise."""
    import timm

    if not name:
        raise UserError("no model given (set --model NAME)")
    if not timm.is_model(name):
        close = suggest_model_names(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vim*')"
        raise UserError(f"unknown model {name!r}{hint}")
    return name


def create_classifier(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """timm.create_model(cfg['model'], num_classes, in_chans, img_size, drop_path_rate, **model_kwargs)."""
    import timm

    name = check_model_name(cfg.get("model"))
    kwargs = dict(cfg.get("model_kwargs") or {})
    kwargs["num_classes"] = num_classes
    kwargs.setdefault("in_chans", cfg.get("in_chans") or 3)
    if cfg.get("drop_path"):
        kwargs.setdefault("drop_path_rate", cfg["drop_path"])
    if cfg.get("img_size"):
        kwargs.setdefault("img_size", cfg["img_size"])
    try:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            if "img_size" in str(exc) and "img_size" not in (cfg.get("model_kwargs") or {}):
                kwargs.pop("img_size")  # a model without a fixed input size (CNNs)
                return timm.create_model(name, pretrained=False, **kwargs)
            raise
    except TypeError as exc:
        raise UserError(f"model {name!r} does not accept these arguments ({exc}); check model_kwargs") from exc
    except ValueError as exc:
        raise UserError(f"model {name!r}: {exc}") from exc


def load_initial_weights(model: nn.Module, path: str, partial: bool = False) -> None:
    """init_checkpoint into the new model: all of it, or (init_partial) what fits, saying what did not."""
    try:
        with warnings.catch_warnings():  # a partial load is reported below, in a few lines
            warnings.simplefilter("ignore")
            result = load_checkpoint(model, path, strict=not partial)
    except CheckpointMismatchError as exc:
        raise UserError(f"init_checkpoint: {exc}; set init_partial=true to load only what fits") from exc
    if not result.ok:
        kept = result.missing_keys + [k for k, _, _ in result.mismatched_keys]

        def some(keys):
            return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")

        note(f"init_checkpoint: {len(model.state_dict()) - len(kept)} of {len(model.state_dict())} model tensors "
             f"loaded from {path}; {len(kept)} keep their initialisation ({some(kept)}), "
             f"{len(result.unexpected_keys)} checkpoint tensors unused ({some(result.unexpected_keys)})")
