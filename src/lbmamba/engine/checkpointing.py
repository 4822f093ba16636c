"""Training checkpoints: atomic writes, RNG states as tensors, config fingerprints, safe loading.

A training checkpoint is `torch.save` of a dict of tensors and plain Python values, so it loads with
`torch.load(..., weights_only=True)`:

    model            the weights (a reference-style `{'model': state_dict}` file, for `lbmamba eval`
                     and `lbmamba.load_checkpoint`)
    model_ema        EMA weights (when model_ema is on)
    optimizer, scheduler, scaler    their state dicts
    epoch            completed epochs
    rng              python / numpy / torch CPU / CUDA generator states
    fingerprint      the model-defining and trajectory-defining config entries
    config, model_name, model_kwargs, num_classes, class_names, best_top1, metrics
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from .config import MODEL_KEYS
from .errors import UserError

__all__ = [
    "atomic_save",
    "load_training_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "check_fingerprint",
]


def atomic_save(obj: Any, path: str) -> None:
    """torch.save `obj` to `path` so that `path` is always either the old or the new complete file.

    Written to a temporary file in the same directory, flushed and fsync'ed, then os.replace'd over
    `path` (atomic on POSIX and Windows) and the directory entry fsync'ed.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # e.g. Windows, some network file systems
        pass


def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as tensors / plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Optional[Mapping[str, Any]]) -> None:
    if not state:
        return
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        npy = state["numpy"]
        np.random.set_state(
            (npy["name"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"]))
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:  # a different number of GPUs: restore the current device's state only
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)].cpu())


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """torch.load(path, weights_only=True) onto the CPU, with clear errors for missing / foreign files."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if zipfile.is_zipfile(path):
            detail = ("it holds Python objects besides tensors and plain values; re-save only the weights, e.g. "
                      "torch.save({'model': ckpt['model']}, new_path), in a trusted session")
        else:
            detail = "it is not a file torch.save wrote"
        raise UserError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {detail}") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} is not a dict (got {type(ckpt).__name__})")
    return ckpt


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys) -> list:
    out = []
    for key in keys:
        if key not in saved and key not in current:
            continue
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r} vs now {current.get(key)!r}")
    return out


def check_fingerprint(ckpt: Mapping[str, Any], fingerprint: Mapping[str, Any], path: str, allow_config_change: bool = False) -> None:
    """Refuse to resume from a checkpoint of another model (always) or another config (unless allowed)."""
    saved = ckpt.get("fingerprint")
    if not isinstance(saved, Mapping):
        raise UserError(
            f"cannot resume from {path}: it is not an lbmamba training checkpoint (no config fingerprint); "
            "to start from its weights use init_checkpoint=PATH instead"
        )
    model_diff = _differences(saved, fingerprint, MODEL_KEYS)
    if model_diff:
        raise UserError(f"cannot resume from {path}: it holds another model ({'; '.join(model_diff)})")
    other = [k for k in set(saved) | set(fingerprint) if k not in MODEL_KEYS]
    config_diff = _differences(saved, fingerprint, sorted(other))
    if config_diff and not allow_config_change:
        raise UserError(
            f"cannot resume from {path}: it was trained with another config ({'; '.join(config_diff)}); "
            "use the same config, or set allow_config_change=true"
        )
