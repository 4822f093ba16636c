"""Loading checkpoints into models: `{'model': state_dict}` .pth files, plain state dicts, .safetensors.

`load_checkpoint(model, path)` reads the file safely (`torch.load(..., weights_only=True,
map_location='cpu')` or safetensors), unwraps it, lets the model adapt it (a model that defines
`checkpoint_filter(state_dict)` resizes its position embedding there, for instance) and loads it,
raising `CheckpointMismatchError` with the missing / unexpected / mis-shaped keys when it does not fit.
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["load_checkpoint", "read_checkpoint", "unwrap_state_dict", "CheckpointMismatchError", "LoadResult"]

_WRAPPER_KEYS = ("model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
_LIST_AT_MOST = 20


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model (the message lists them)."""


@dataclass
class LoadResult:
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    #: (name, shape in the checkpoint, shape in the model)
    mismatched_keys: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The state dict inside `checkpoint`: `{'model': sd}` / `{'state_dict': sd}` unwrapped (repeatedly),
    DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes removed, non-tensor entries dropped."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a dict (a state dict or {{'model': state_dict}}), got {type(checkpoint).__name__}")
    state_dict = checkpoint
    for _ in range(3):
        inner = next((state_dict[k] for k in _WRAPPER_KEYS if isinstance(state_dict.get(k), Mapping)), None)
        if inner is None:
            break
        state_dict = inner
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _torch_load(path: str):
    safe = [argparse.Namespace]  # DeiT-style training scripts save their `args` next to the weights
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:
            return torch.load(path, weights_only=True, map_location="cpu")
        with safe_globals(safe):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(
            f"{path} holds Python objects besides tensors that torch.load(weights_only=True) refuses to "
            f"unpickle; lbmamba never loads checkpoints with weights_only=False. Re-save only the weights, e.g. "
            f"torch.save({{'model': ckpt['model']}}, new_path) in a trusted session. Original error: {exc}"
        ) from exc


def read_checkpoint(path: "str | os.PathLike") -> Dict[str, torch.Tensor]:
    """Read `path` (.safetensors, or anything torch.save wrote) onto the CPU and unwrap its state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw = load_file(path, device="cpu")
    else:
        raw = _torch_load(path)
    return unwrap_state_dict(raw)


def _listing(title: str, items: List[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_LIST_AT_MOST])
    more = f"\n    ... and {len(items) - _LIST_AT_MOST} more" if len(items) > _LIST_AT_MOST else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadResult:
    expected = model.state_dict()
    result = LoadResult()
    result.missing_keys = [k for k in expected if k not in state_dict]
    result.unexpected_keys = [k for k in state_dict if k not in expected]
    result.mismatched_keys = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    return result


def mismatch_message(model: nn.Module, source: str, result: LoadResult) -> str:
    parts = [f"the checkpoint {source} does not fit {type(model).__name__}:"]
    if result.missing_keys:
        parts.append(_listing("missing keys (in the model, not in the checkpoint)", result.missing_keys))
    if result.unexpected_keys:
        parts.append(_listing("unexpected keys (in the checkpoint, not in the model)", result.unexpected_keys))
    if result.mismatched_keys:
        rows = [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in result.mismatched_keys]
        parts.append(_listing("mis-shaped keys", rows))
    parts.append("Check that the model name / width / depth / num_classes match the checkpoint, or pass strict=False "
                 "to load only the keys that fit.")
    return "\n".join(parts)


def load_checkpoint(
    model: nn.Module,
    path: "str | os.PathLike",
    strict: bool = True,
    filter_fn: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
) -> LoadResult:
    """Load the weights at `path` into `model` and return what did not fit.

    Accepts `torch.save({'model': state_dict, ...})` files (the reference code bases' format), plain
    state dicts and .safetensors files, always read with `weights_only=True` onto the CPU. The state dict
    then goes through `filter_fn`, or the model's own `checkpoint_filter` when it has one (VisionMamba
    resamples `pos_embed` there when the patch grid differs).

    Args:
        strict: raise `CheckpointMismatchError`, listing missing / unexpected / mis-shaped keys, unless
            everything fits; with strict=False the fitting keys are loaded, the rest reported (warning).
    """
    state_dict = read_checkpoint(path)
    filter_fn = filter_fn or getattr(model, "checkpoint_filter", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict)
    result = compare_state_dict(model, state_dict)
    if not result.ok:
        message = mismatch_message(model, os.fspath(path), result)
        if strict:
            raise CheckpointMismatchError(message)
        warnings.warn(message, stacklevel=2)
    bad = {k for k, _, _ in result.mismatched_keys}
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in bad}, strict=False)
    return result
