"""Reading checkpoint files safely and loading them into models.

`read_file(path)` reads a `.safetensors` file or anything `torch.save` wrote with
`torch.load(..., weights_only=True, map_location='cpu')`: never by unpickling arbitrary objects.
`load_checkpoint(model, path)` unwraps what it read (`{'model': state_dict}`, `{'state_dict': ...}`,
DDP / torch.compile prefixes), lets the model adapt it (a model that defines
`checkpoint_filter(state_dict)` resizes its position embedding there, for instance) and loads it,
raising `CheckpointMismatchError` with the missing / unexpected / mis-shaped keys when it does not fit.
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "read_file",
    "read_checkpoint",
    "load_checkpoint",
    "unwrap_state_dict",
    "compare_state_dict",
    "CheckpointReadError",
    "CheckpointMismatchError",
    "LoadResult",
]

#: wrappers a state dict may sit in, in order of preference: the EMA weights are taken only when a file
#: holds nothing else ({'model_ema': ...} in timm / VMamba / Adventurer files, {'ema_model': ...} in LocalMamba's)
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_ema", "ema_model")
_PREFIXES = ("module.", "_orig_mod.")
_LIST_AT_MOST = 20


class CheckpointReadError(ValueError):
    """A checkpoint file is missing, is not one, is truncated, or holds objects `weights_only` refuses."""


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
    """The state dict inside `checkpoint`: `{'model': sd}` / `{'state_dict': sd}` (else the EMA weights)
    unwrapped (repeatedly),
    DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes removed, non-tensor entries dropped."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointReadError(
            f"a checkpoint must be a dict (a state dict or {{'model': state_dict}}), got {type(checkpoint).__name__}"
        )
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_file(path: "str | os.PathLike") -> Any:
    """What `path` holds, read onto the CPU: a `.safetensors` file, or a `torch.save` file through
    `torch.load(weights_only=True)` (DeiT-style files that also saved their `argparse.Namespace` of
    arguments are accepted). Raises `CheckpointReadError` with the reason when it cannot."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if zipfile.is_zipfile(path):
            detail = ("it holds Python objects besides tensors and plain values, which torch.load(weights_only=True) "
                      "refuses to unpickle; re-save only the weights, e.g. torch.save({'model': ckpt['model']}, "
                      "new_path), in a trusted session")
        else:
            detail = "it is not a checkpoint (neither a file torch.save wrote nor a .safetensors file)"
        raise CheckpointReadError(f"cannot read checkpoint {path}: {detail}") from exc
    except Exception as exc:  # truncated zip, safetensors header errors, ...: all mean "not a readable checkpoint"
        if not path.endswith(".safetensors") and not zipfile.is_zipfile(path):
            # torch.load's own words for such a file are an internal number ("KeyError: 229")
            raise CheckpointReadError(f"cannot read checkpoint {path}: it is not a checkpoint (neither a file "
                                      "torch.save wrote nor a .safetensors file)") from exc
        raise CheckpointReadError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc


def read_checkpoint(path: "str | os.PathLike") -> Dict[str, torch.Tensor]:
    """The state dict in the checkpoint file at `path` (see `read_file` and `unwrap_state_dict`)."""
    raw = read_file(path)
    try:
        return unwrap_state_dict(raw)
    except CheckpointReadError as exc:
        raise CheckpointReadError(f"{os.fspath(path)}: {exc}") from exc


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


def _mismatch_message(model: nn.Module, source: str, result: LoadResult) -> str:
    parts = [f"the checkpoint {source} does not fit {type(model).__name__}:"]
    if result.missing_keys:
        parts.append(_listing("missing keys (in the model, not in the checkpoint)", result.missing_keys))
    if result.unexpected_keys:
        parts.append(_listing("unexpected keys (in the checkpoint, not in the model)", result.unexpected_keys))
    if result.mismatched_keys:
        rows = [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in result.mismatched_keys]
        parts.append(_listing("mis-shaped keys", rows))
    parts.append("Check that the model name / width / depth / num_classes match the checkpoint.")
    return "\n".join(parts)


def load_checkpoint(
    model: nn.Module,
    checkpoint: "str | os.PathLike | Mapping[str, Any]",
    strict: bool = True,
    filter_fn: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
    source: Optional[str] = None,
) -> LoadResult:
    """Load a checkpoint into `model` and return what did not fit.

    `checkpoint` is a file (`torch.save({'model': state_dict, ...})` files, the reference code bases'
    format, plain state dicts and .safetensors files, always read with `weights_only=True` onto the CPU)
    or what such a file held, already read (`source` then names it in messages). The state dict goes
    through `filter_fn`, or the model's own `checkpoint_filter` when it has one (VisionMamba resamples
    `pos_embed` there when the patch grid differs).

    Args:
        strict: raise `CheckpointMismatchError`, listing missing / unexpected / mis-shaped keys, unless
            everything fits; with strict=False the fitting keys are loaded, the rest reported (warning).
    """
    if isinstance(checkpoint, Mapping):
        source = source or "given"
        state_dict = unwrap_state_dict(checkpoint)
    else:
        source = source or os.fspath(checkpoint)
        state_dict = read_checkpoint(checkpoint)
    filter_fn = filter_fn or getattr(model, "checkpoint_filter", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict)
        except (ValueError, RuntimeError) as exc:  # e.g. a position embedding of no grid this model knows
            raise CheckpointMismatchError(
                f"the checkpoint {source} does not fit {type(model).__name__}: {_first_line(exc)}"
            ) from exc
    result = compare_state_dict(model, state_dict)
    if not result.ok:
        message = _mismatch_message(model, source, result)
        if strict:
            raise CheckpointMismatchError(message)
        warnings.warn(message, stacklevel=2)
    bad = {k for k, _, _ in result.mismatched_keys}
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in bad}, strict=False)
    return result
