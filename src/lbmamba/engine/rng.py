"""Randomness a run can replay: seeds derived from (seed, epoch, rank, ...), and every generator's state
captured into (and restored from) a `weights_only` checkpoint.

A task seeds the process at the start of every epoch from its coordinates (`seed_everything(seed,
epoch, rank)`), so a run resumed at an epoch boundary draws exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

__all__ = ["derive_seed", "seed_everything", "seed_worker", "capture_rng_state", "restore_rng_state"]


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (no collisions like seed * 1000 + fold)."""
    entropy = [int(p) % 2**63 for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0]) & 0x7FFFFFFF


def seed_everything(*parts: int) -> int:
    """Seed Python's, numpy's and torch's global generators from `derive_seed(*parts)`; returns it."""
    seed = derive_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: numpy and Python follow the worker's torch seed (which the loader's
    generator decides)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as tensors and plain values."""
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
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.set_state((npy["name"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:  # a different number of GPUs: restore the current device's state only
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)].cpu())
