"""How every task feeds its model: samplers, loader workers, the unreadable-sample rule and the batch plan.

* `ShardSampler`: evaluation shares without padding, so figures summed over ranks stay exact under DDP;
* `IterationSampler` + `SeededSamples`: the endless training draws of iteration-counted runs, a function of
  (seed, pass over the data, rank, position), so a run resumed at any iteration draws (and augments) what an
  uninterrupted one draws;
* `loader_workers`, `bad_sample_limit`, `batch_plan`: the rules the config keys `workers`,
  `max_bad_images` / `max_bad_fraction` and `batch_size` / `global_batch_size` / `grad_accum` / `lr` follow.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Iterator, Mapping, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import DistInfo
from .errors import UserError
from .rng import derive_seed, seed_worker

__all__ = ["ShardSampler", "IterationSampler", "SeededSamples", "iteration_loader", "loader_workers",
           "bad_sample_limit", "too_many_bad_samples", "check_bad_samples", "batch_plan"]


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... (no padding: evaluation figures stay exact under DDP)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededSamples(Dataset):
    """A dataset read with (index, seed) keys: Python's, numpy's and torch's generators are seeded from the
    sample's seed before its augmentation, so what a sample draws depends on its place in the run, not on
    which worker loads it or whether the run was resumed. In the main process (workers=0) the generators'
    states are put back afterwards: training's own draws (drop path) continue undisturbed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class IterationSampler(Sampler):
    """The training draws of a run from draw `start` (micro-batches) on, for one rank: pass p over the data is
    a permutation drawn from (seed, p), split into equal shares per rank, cut to whole batches; each draw
    comes with its own augmentation seed (seed, p, rank, position). Endless: the loop stops it."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int, start: int = 0):
        self.n, self.batch, self.seed, self.rank, self.world, self.start = n, batch, seed, rank, world, start
        self.batches_per_pass = (n // world) // batch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        per_rank = self.n // self.world
        p, skip = divmod(self.start, self.batches_per_pass)
        while True:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, p))
            share = torch.randperm(self.n, generator=generator)[self.rank::self.world][:per_rank].tolist()
            for position in range(skip * self.batch, self.batches_per_pass * self.batch):
                yield share[position], derive_seed(self.seed, p, self.rank, position)
            p, skip = p + 1, 0

    def __len__(self) -> int:  # one pass (the sampler itself never ends)
        return self.batches_per_pass * self.batch


def loader_workers(cfg: Mapping[str, Any], dist: DistInfo, in_process: bool = False) -> int:
    """workers, or when null: 0 for small data read in this process (the digits), else min(8, cores per
    local process)."""
    if cfg.get("workers") is not None:
        return cfg["workers"]
    if in_process or str(cfg.get("data")).lower() == "digits":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(dist.local_world_size, 1)))


def iteration_loader(dataset: Dataset, cfg: Mapping[str, Any], dist: DistInfo, start_iter: int, accum: int,
                     collate: Callable, in_process: bool) -> DataLoader:
    """The endless training loader of a run resumed at iteration `start_iter` (0 for a new run) with `accum`
    micro-batches per iteration."""
    sampler = IterationSampler(len(dataset), cfg["batch_size"], cfg["seed"], dist.rank, dist.world_size,
                               start_iter * accum)
    generator = torch.Generator().manual_seed(derive_seed(cfg["seed"], start_iter, dist.rank))
    return DataLoader(SeededSamples(dataset), batch_size=cfg["batch_size"], sampler=sampler,
                      num_workers=loader_workers(cfg, dist, in_process=in_process), collate_fn=collate,
                      worker_init_fn=seed_worker, generator=generator, pin_memory=dist.device.type == "cuda")


def bad_sample_limit(cfg: Mapping[str, Any], total: float) -> float:
    """Unreadable samples tolerated among `total`: a count or a fraction, whichever is larger."""
    return max(cfg["max_bad_images"], cfg["max_bad_fraction"] * total)


def too_many_bad_samples(bad: int, total: int, cfg: Mapping[str, Any], what: str, where: str,
                         so_far: bool = False) -> UserError:
    """The error of a run or an evaluation that met more unreadable `what` (images, image / mask pairs) than
    `bad_sample_limit` allows. `so_far`: `total` counts the samples a training run has drawn until now (its
    loader workers read ahead, so their warnings may already name more files than `bad`)."""
    drawn = (" drawn so far; the data-loader workers read ahead, so warnings may name more files"
             if so_far else "")
    return UserError(
        f"too many unreadable {what}{' ' + where if where else ''}: {bad} of {total}{drawn} (more than max_bad_images "
        f"{cfg['max_bad_images']} "
        f"and max_bad_fraction {cfg['max_bad_fraction']}); fix or remove them, or raise max_bad_fraction"
    )


def check_bad_samples(bad: int, total: int, cfg: Mapping[str, Any], what: str, where: str) -> None:
    """Raise `too_many_bad_samples` when `bad` of `total` is more than `bad_sample_limit` allows."""
    if bad > bad_sample_limit(cfg, total):
        raise too_many_bad_samples(bad, total, cfg, what, where)


def batch_plan(cfg: Mapping[str, Any], world_size: int) -> Tuple[int, int, float]:
    """(grad_accum, global batch, peak lr) for `world_size` processes: `global_batch_size` when set decides
    grad_accum; a null `lr` is base_lr scaled by the global batch over lr_base_size."""
    batch = cfg["batch_size"]
    if cfg.get("global_batch_size"):
        per_step = batch * world_size
        if cfg["global_batch_size"] % per_step:
            raise UserError(
                f"global_batch_size {cfg['global_batch_size']} is not a multiple of batch_size x world size "
                f"({batch} x {world_size} = {per_step}); change batch_size or the number of processes"
            )
        accum = cfg["global_batch_size"] // per_step
    else:
        accum = cfg["grad_accum"]
    global_batch = batch * world_size * accum
    lr = cfg["lr"] if cfg.get("lr") else cfg["base_lr"] * global_batch / cfg["lr_base_size"]
    return accum, global_batch, lr
