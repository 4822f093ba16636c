"""Iteration-based training shared by `seg train` and `det train` (mmsegmentation / mmdetection count
iterations, not epochs), and the pieces their `eval` / `predict` commands share.

* exact resume: the training order is a function of (seed, pass over the data, rank) and every sample's
  augmentation is seeded from (seed, pass, rank, position), so a run resumed from its last.pth draws
  exactly what an uninterrupted run draws; the checkpoint also holds every RNG state;
* `last.pth` written atomically every `save_every` iterations and at every evaluation, `best.pth` at the
  best validation score;
* the loss is checked every iteration on every rank: NaN / inf stops the run before any checkpoint is
  touched;
* unreadable or inconsistent samples are skipped and counted under `max_bad_fraction`.

A task hands `train_iterations` a `Loop`: its model, a module whose forward returns the losses (what
DistributedDataParallel wraps), the loader, and an `evaluate(iteration)` giving the row of validation
figures and the score to maximise.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import __version__
from .classification import bad_image_limit, loader_workers
from .config import ConfigTable
from .device import autocast, grad_scaler
from .distributed import DistInfo, all_reduce_sum, barrier
from .errors import TrainingDivergedError, UserError
from .files import atomic_save, jsonable
from .records import RunRecord, progress
from .rng import capture_rng_state, derive_seed, restore_rng_state, seed_worker
from .runs import LAST, Run, load_training_checkpoint, note

__all__ = ["SCHEDULES", "lr_factor", "SeededSamples", "IterationSampler", "LossModule", "Loop", "LoopEnd",
           "train_iterations", "run_result", "Start", "start_run", "finished_summary", "iteration_loader",
           "config_from_checkpoint", "input_images", "IMAGE_SUFFIXES"]

SCHEDULES = ("warmup_then_poly", "poly_with_warmup", "warmup_then_step")


# ----------------------------------------------------------------------------------------------- schedule
def lr_factor(cfg: Mapping[str, Any], iteration: int) -> float:
    """The learning rate at `iteration` (0-based) over the peak, as mmsegmentation's / mmdetection's
    schedulers give it.

    warmup_then_poly (mmseg 1.x LinearLR then PolyLR, LBMamba): the factor rises linearly from warmup_ratio to
    1 over warmup_iters, then decays as (1 - t / T)^power from the peak to min_lr over the remaining T
    iterations. poly_with_warmup (mmcv 1.x poly policy, Vim): the poly decay runs over all iterations and the
    warm-up multiplies it by 1 - (1 - i / warmup_iters)(1 - warmup_ratio). warmup_then_step (mmdet 3.x LinearLR
    then MultiStepLR, LBMamba's detection): the same linear warm-up multiplied by lr_gamma for each of
    `lr_steps` reached."""
    schedule, warmup, ratio = cfg["schedule"], cfg["warmup_iters"], cfg["warmup_ratio"]
    warm = ratio + (1.0 - ratio) * iteration / warmup if iteration < warmup else 1.0
    if schedule == "warmup_then_step":
        return warm * cfg["lr_gamma"] ** bisect_right(sorted(cfg["lr_steps"]), iteration)
    peak, floor, iters, power = cfg["lr"], cfg["min_lr"], cfg["iters"], cfg["poly_power"]
    if schedule == "warmup_then_poly":
        if iteration < warmup:
            return warm
        done = min(iteration - warmup, iters - warmup) / (iters - warmup)
        return ((peak - floor) * (1.0 - done) ** power + floor) / peak
    regular = ((peak - floor) * (1.0 - min(iteration, iters) / iters) ** power + floor) / peak
    if iteration < warmup:
        return regular * (1.0 - (1.0 - iteration / warmup) * (1.0 - ratio))
    return regular


# ----------------------------------------------------------------------------------------------- data order
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


# ----------------------------------------------------------------------------------------------- the loop
class LossModule(nn.Module):
    """`model` with its losses as its forward, `losses(model, *inputs)` -> {"loss": total, part: value}: what
    DistributedDataParallel wraps (its gradient hooks follow the forward it runs)."""

    def __init__(self, model: nn.Module, losses: Callable[..., Dict[str, torch.Tensor]]):
        super().__init__()
        self.model = model
        self.losses = losses

    def forward(self, *inputs) -> Dict[str, torch.Tensor]:
        return self.losses(self.model, *inputs)


@dataclass
class Start:
    """Where a run starts: its optimizer and loss scaler (loaded from last.pth when resumed), the iteration,
    the best score so far and its record."""

    optimizer: torch.optim.Optimizer
    scaler: Any
    record: RunRecord
    iteration: int = 0
    best_score: float = -1.0
    best_iter: int = -1

    def where(self, run: Run) -> str:
        """The end of the run's first line: where it writes, or where it resumes."""
        return f"resuming at iteration {self.iteration + 1} in {run.dir}" if self.iteration else f"output {run.dir}"


def start_run(run: Run, model: nn.Module, groups: List[Dict[str, Any]], lr: float, title: str,
              curves: Sequence, shown: Sequence[str]) -> Start:
    """AdamW over `groups` (the config's betas and weight decay), the loss scaler of `amp`, and the record of
    the run; a resumed run's last.pth loaded into the model, optimizer, scaler and RNGs (then let go)."""
    cfg = run.cfg
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    scaler = grad_scaler(run.dist.device, cfg["amp"])
    start = Start(optimizer, scaler, record=None)
    ckpt = run.checkpoint
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt.get("rng"))
        start.iteration = int(ckpt["iter"])
        start.best_score = float(ckpt.get("best_score", ckpt.get("best_mIoU", -1.0)))  # best_mIoU: older seg runs
        start.best_iter = int(ckpt.get("best_iter", -1))
        run.checkpoint = None
    begun = start.iteration
    start.record = RunRecord(run.dir, curves, title, shown=shown, enabled=run.dist.is_main, log=cfg["log"], x="iter",
                             keep=(lambda r: r.get("iter", 0) <= begun) if run.resumed else None)
    return start


@dataclass
class Loop:
    """What `train_iterations` needs from a task.

    model: what checkpoints hold. step: forward(*inputs) -> {"loss": total, part: ...} (a `LossModule`).
    start: the optimizer, scaler, record and starting point (`start_run`). loader: endless batches
    (*inputs, n_bad), from `iteration_loader`. to_device: inputs -> inputs on the device. loss_parts: the parts
    recorded as train_<part>. evaluate(iteration) -> (validation row, score to maximise). too_many_bad(bad,
    drawn, where) -> the error to raise. state: extra entries of every checkpoint. min_batch: draw more when bad
    samples leave fewer than this in a micro-batch (BatchNorm needs 2)."""

    run: Run
    model: nn.Module
    step: nn.Module
    start: Start
    loader: DataLoader
    to_device: Callable[[Tuple], Tuple]
    loss_parts: Sequence[str]
    evaluate: Callable[[int], Tuple[Dict[str, Any], float]]
    too_many_bad: Callable[[int, int, str], Exception]
    accum: int
    lr: float
    state: Dict[str, Any] = field(default_factory=dict)
    min_batch: int = 1


@dataclass
class LoopEnd:
    iteration: int
    scores: Dict[str, Any]  # the last validation row
    best_score: float
    best_iter: int
    bad: int
    stopped_early: bool
    train_loss: Optional[float]


def finished_summary(run: Run, command: str) -> Optional[Dict[str, Any]]:
    """The saved summary of a resumed run that already did all its iterations (said once), else None."""
    ckpt = run.checkpoint
    if ckpt is None or int(ckpt["iter"]) < run.cfg["iters"]:
        return None
    saved = run.saved_summary()
    if saved is not None and run.dist.is_main:
        note(f"lbmamba {command}: the run in {run.dir} already finished ({ckpt['iter']} of {run.cfg['iters']} "
             "iterations); nothing to do")
    return saved


def train_iterations(loop: Loop) -> LoopEnd:
    """Run the optimizer steps from loop.start.iteration to cfg["iters"] (or stop_after_iters of them): lr from
    `lr_factor`, gradient accumulation, clipping, NaN check, records, validation and checkpoints."""
    run, cfg, dist = loop.run, loop.run.cfg, loop.run.dist
    device, model, optimizer, scaler = dist.device, loop.model, loop.start.optimizer, loop.start.scaler
    step: nn.Module = loop.step
    if dist.distributed:
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    for group in optimizer.param_groups:
        group["peak_lr"] = loop.lr * group.get("lr_scale", 1.0)
    last_path, best_path = run.path(LAST), run.path("best.pth")
    best_score, best_iter = loop.start.best_score, loop.start.best_iter

    def save(iteration: int, metrics: Mapping[str, Any], best: bool) -> None:
        if not dist.is_main:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": iteration,
                 "rng": capture_rng_state(), "config": jsonable(cfg), **loop.state, "best_score": best_score,
                 "best_iter": best_iter, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                 "lbmamba_version": __version__}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        atomic_save(state, last_path)
        if best:
            atomic_save(state, best_path)

    parts = list(loop.loss_parts)
    batch = cfg["batch_size"]
    model.train()
    batches = iter(loop.loader)
    window = torch.zeros(len(parts) + 3, dtype=torch.float64)  # loss, parts, micro-batches, bad (since the last row)
    total_bad = drawn = 0
    scores: Dict[str, Any] = {}
    train_loss: Optional[float] = None
    iteration, iters_run, stopped_early = loop.start.iteration, 0, False
    tick = time.perf_counter()
    show = cfg["progress"] and dist.is_main
    with progress(total=cfg["iters"] - loop.start.iteration, desc="train", enabled=show) as bar:
        while iteration < cfg["iters"]:
            factor = lr_factor(cfg, iteration)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            for micro in range(loop.accum):
                *inputs, bad = next(batches)
                drawn += batch
                while len(inputs[0]) < min(loop.min_batch, batch):  # bad samples left too few: draw the next batch
                    if total_bad + bad > bad_image_limit(cfg, drawn):
                        raise loop.too_many_bad(total_bad + bad, drawn, "in training")
                    *inputs, more_bad = next(batches)
                    bad, drawn = bad + more_bad, drawn + batch
                last = micro + 1 == loop.accum
                sync = step.no_sync() if (dist.distributed and not last) else contextlib.nullcontext()
                with sync:
                    with autocast(device, cfg["amp"]):
                        losses = step(*loop.to_device(tuple(inputs)))
                    loss = losses["loss"]
                    if cfg.get("debug_nan_iter") == iteration:
                        loss = loss * float("nan")
                    scaler.scale(loss / loop.accum).backward()
                zero = torch.zeros((), device=device)
                stats = torch.stack([loss.detach().float()]
                                    + [losses.get(p, zero).detach().float() for p in parts]
                                    + [torch.tensor(1.0, device=device), torch.tensor(float(bad), device=device)])
                stats = all_reduce_sum(stats.double(), dist).cpu()
                if not math.isfinite(stats[0].item()):
                    raise TrainingDivergedError(
                        f"the training loss became {'NaN' if math.isnan(stats[0].item()) else 'infinite'} at "
                        f"iteration {iteration + 1}; stopped, the last good checkpoint is untouched. Lower lr, add "
                        "clip_grad, or use amp=bf16 instead of fp16")
                window += stats
                total_bad += int(stats[-1].item())
                if total_bad > bad_image_limit(cfg, drawn * dist.world_size):
                    raise loop.too_many_bad(total_bad, drawn * dist.world_size, "in training")
            if cfg.get("clip_grad"):
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iteration += 1
            iters_run += 1
            bar.update(1)

            done = iteration == cfg["iters"]
            stopping = bool(cfg.get("stop_after_iters")) and iters_run >= cfg["stop_after_iters"] and not done
            evaluating = iteration % cfg["eval_every"] == 0 or done
            row: Dict[str, Any] = {}
            if iteration % cfg["log_every"] == 0 or evaluating or stopping:
                n = max(window[-2].item(), 1.0)
                train_loss = window[0].item() / n
                row = {"iter": iteration, "train_loss": train_loss,
                       **{f"train_{p}": window[1 + k].item() / n for k, p in enumerate(parts)},
                       "lr": max(g["lr"] for g in optimizer.param_groups), "seconds": time.perf_counter() - tick}
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{row['lr']:.2e}")
                window.zero_()
                tick = time.perf_counter()
            is_best = False
            if evaluating:
                scores, score = loop.evaluate(iteration)
                row.update(scores)
                is_best = score > best_score
                if is_best:
                    best_score, best_iter = float(score), iteration
            if evaluating or stopping or iteration % cfg["save_every"] == 0:
                save(iteration, row, is_best)
            if row and dist.is_main:
                loop.start.record.add(row)
            barrier(dist)
            if stopping:
                stopped_early = True
                break

    if cfg.get("debug_dump_rank_state"):  # parameters only: BatchNorm statistics are each rank's own
        torch.save({k: v.detach().cpu() for k, v in model.named_parameters()},
                   os.path.join(run.dir, f"rank{dist.rank}_params.pth"))
        barrier(dist)
    if not scores:  # stopped before an iteration that validates (every rank takes part)
        scores, score = loop.evaluate(iteration)
        best_score = max(best_score, float(score))
    if train_loss is None:
        rows = [r for r in loop.start.record.records if "train_loss" in r]
        train_loss = rows[-1]["train_loss"] if rows else None
    return LoopEnd(iteration, scores, best_score, best_iter, total_bad, stopped_early, train_loss)


def run_result(run: Run, end: LoopEnd, record: RunRecord, best_name: str, wall_start: float,
               **figures: Any) -> Dict[str, Any]:
    """The final JSON of a training run on rank 0: the last validation row, best_val_<best_name>, the run's
    `figures` (model, params, ...), the run's files; the record is finished unless the run stopped early."""
    last_path, best_path = run.path(LAST), run.path("best.pth")
    result: Dict[str, Any] = {
        **end.scores,
        f"best_val_{best_name}": round(end.best_score, 6),
        "best_iter": end.best_iter,
        "iters": end.iteration,
        "train_loss": round(end.train_loss, 6) if end.train_loss is not None else None,
        **figures,
        "data": str(run.cfg["data"]),
        "world_size": run.dist.world_size,
        "bad_images": end.bad,
        "wall_s": round(time.perf_counter() - wall_start, 2),
        "checkpoint": best_path if os.path.isfile(best_path) else last_path,
        "last_checkpoint": last_path,
        "metrics": record.metrics_path,
        "plot": record.plot_path,
        "output": run.dir,
    }
    if end.stopped_early:
        result["stopped_early"] = True
    else:
        record.finish(result)
    return result


# ----------------------------------------------------------------------------------------------- eval / predict
def config_from_checkpoint(table: ConfigTable, config_path: Optional[str], overrides: Optional[Mapping[str, Any]],
                           keys: Sequence[str], generated: str):
    """(config, checkpoint dict or None) for `eval` / `predict`: the table's defaults <- the `keys` one of our
    checkpoints recorded <- the config file and overrides. A run on the generated set (`data` == `generated`)
    reads its own copy beside its checkpoint."""
    given = table.given(config_path, overrides)
    path = given.get("checkpoint")
    ckpt = load_training_checkpoint(os.fspath(path)) if path else None
    saved = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), Mapping) else {}
    from_ckpt = {k: saved[k] for k in keys if k in saved and k in table.keys}
    if saved.get("data") == generated and "data" in from_ckpt:
        from_ckpt["data"] = os.path.join(saved.get("output") or os.path.dirname(os.path.abspath(path)), "data")
        if not os.path.isdir(from_ckpt["data"]):
            from_ckpt["data"] = generated
    cfg = table.apply(table.defaults(), from_ckpt, source=f"checkpoint {path}")
    return table.validate(table.apply(cfg, given)), ckpt


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def input_images(inputs: Optional[str]) -> List[Path]:
    """`predict`'s inputs: one image, or the images of a folder (sorted)."""
    if not inputs:
        raise UserError("no inputs given (set --inputs IMAGE or --inputs FOLDER)")
    path = Path(os.path.expanduser(inputs))
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"inputs not found: {path}")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return images
