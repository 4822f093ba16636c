"""The training loop of every task: classification, segmentation, detection and each MIL fold run it.

A task gives what is its own through a `Task` (the model and its optimizer in a `Plan`, the batches, the
losses, `evaluate`); the loop owns the rest, the same for all:

* counting in epochs (passes over the data: classification, MIL) or iterations (optimizer updates: the
  dense tasks, as mmsegmentation / mmdetection count), with gradient accumulation;
* mixed precision and its grad scaler, gradient clipping, the EMA of the weights, the DDP wrap (of the
  task's losses, so DDP's hooks follow the forward that runs), the lr schedule (`engine.schedule`);
* the loss checked every micro-batch on every rank: NaN / inf stops the run before any checkpoint is
  touched; unreadable samples counted against the task's limit;
* validation every `eval_every` epochs or iterations, the score that picks `best.pth`, optional early
  stopping (MIL's patience);
* `last.pth` / `best.pth` in one checkpoint format (`FORMAT`), written atomically by rank 0, holding every
  RNG state, so a run resumed from its folder ends with the weights of one that never stopped;
* the run record (`metrics.jsonl`, curves, one line per row).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.utils import dispatch_clip_grad

from .. import __version__
from .device import autocast
from .distributed import all_reduce_sum, barrier
from .errors import TrainingDivergedError, UserError
from .files import atomic_save, jsonable
from .records import RunRecord, progress
from .rng import capture_rng_state, restore_rng_state
from .runs import LAST, Run, note
from .schedule import Schedule

__all__ = ["FORMAT", "Task", "Plan", "Outcome", "fit", "already_finished", "check_resumable", "LossModule"]

#: the checkpoint format of every training run (`last.pth`, `best.pth`, MIL's `fold_<k>.pt`)
FORMAT = "lbmamba-run"
FORMAT_VERSION = 2


class LossModule(nn.Module):
    """`model` with the task's losses as its forward: what DistributedDataParallel wraps (its gradient hooks
    follow the forward it runs)."""

    def __init__(self, model: nn.Module, task: "Task"):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, *inputs) -> Dict[str, torch.Tensor]:
        return self.task.losses(self.model, *inputs)


@dataclass
class Plan:
    """What a run trains, built by the task: the model (what checkpoints hold, on its device), its optimizer,
    schedule and grad scaler, micro-batches per update, the EMA of the weights (or None), and for
    epoch-counted runs the updates of one epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: Any
    accum: int = 1
    ema: Optional[nn.Module] = None
    updates_per_epoch: Optional[int] = None


class Task:
    """What a task gives the loop. Subclasses set the class attributes and override the methods they need.

    unit: "epoch" or "iter", what `cfg["epochs"]` / `cfg["iters"]`, `eval_every`, `stop_after_<unit>s` and the
    checkpoint's counter count. loss_parts: the parts of `losses()` recorded as train_<part>. samples: what a
    sample is called in the record (train_<samples>_per_s). worst_score: the score to beat at the start.
    label: a prefix of messages and progress bars ("fold 2, "). min_batch: micro-batches that unreadable
    samples left smaller than this draw the next batch too (BatchNorm needs 2).
    """

    unit = "epoch"
    #: what kind of run this is ("classification", "segmentation", "detection", "mil"): recorded in every
    #: checkpoint as "task", so that a command given the wrong kind of checkpoint can say so
    task_name = ""
    loss_parts: Sequence[str] = ()
    samples = "images"
    worst_score = -1.0
    label = ""
    min_batch = 1

    def __init__(self, run: Run):
        self.run, self.cfg, self.dist = run, run.cfg, run.dist

    # ------------------------------------------------------------------ what every task gives
    def train_batches(self, epoch: int, update: int) -> Iterable[Tuple]:
        """Micro-batches `(*inputs, n_bad)`: for epoch-counted tasks those of `epoch` (called at its start;
        the place to reseed), for iteration-counted ones an endless stream from `update` on (called once)."""
        raise NotImplementedError

    def losses(self, model: nn.Module, *inputs) -> Dict[str, torch.Tensor]:
        """{"loss": the total to minimise, part: value, ...} of one micro-batch (inputs on the device)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, count: int) -> Tuple[Dict[str, Any], float]:
        """(the row of validation figures, the score that picks best.pth: higher is better) after `count`
        epochs or iterations; every rank takes part."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional
    def to_device(self, inputs: Tuple) -> Tuple:
        device = self.dist.device
        return tuple(t.to(device, non_blocking=True) if torch.is_tensor(t) else t for t in inputs)

    def bad_limit(self, drawn: int) -> float:
        """How many unreadable samples are tolerated among `drawn` (inf: the task has none to count)."""
        return math.inf

    def too_many_bad(self, bad: int, drawn: int, where: str) -> Exception:
        return UserError(f"too many unreadable samples {where}: {bad} of {drawn}")

    def stop_early(self, epochs_done: int, evals_since_best: int) -> bool:
        """Early stopping, asked before each epoch of an epoch-counted run (MIL's patience)."""
        return False

    def checkpoint_extra(self) -> Dict[str, Any]:
        """Entries every checkpoint of the run also holds (class names, what rebuilds the model, ...)."""
        return {}

    def row_extra(self) -> Dict[str, Any]:
        """Entries at the front of every record row (MIL's fold)."""
        return {}

    @property
    def last_path(self) -> str:
        return self.run.path(LAST)

    @property
    def best_path(self) -> str:
        return self.run.path("best.pth")


@dataclass
class Outcome:
    """How a run of the loop ended: the epochs or iterations done, the last validation row, the best score
    and when it came, unreadable samples skipped, whether it stopped before the end (`stop_after_*`), the last
    recorded training loss."""

    count: int
    scores: Dict[str, Any]
    best_score: float
    best_at: int
    bad: int
    stopped_early: bool
    train_loss: Optional[float]
    ema_scores: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- checkpoints
def check_resumable(ckpt: Optional[Mapping[str, Any]], where: str) -> None:
    """Refuse, in one line, to resume from a checkpoint written before the one checkpoint format."""
    if ckpt is not None and "model" in ckpt and ckpt.get("format") != FORMAT:
        raise UserError(f"{where} was written by an earlier lbmamba and cannot be resumed; start a new run (its "
                        "weights can start one with init_checkpoint, and eval / predict read it as they did)")


def already_finished(run: Run, command: str, unit: str) -> Optional[Dict[str, Any]]:
    """The saved summary of a resumed run that already did all its epochs / iterations (said once), else None.
    A run that finished without writing its summary goes on, and the loop writes it."""
    ckpt = run.checkpoint
    total = run.cfg[f"{unit}s"]
    if ckpt is None or int(ckpt.get(unit) or 0) < total:
        return None
    saved = run.saved_summary()
    if saved is not None and run.dist.is_main:
        note(f"lbmamba {command}: the run in {run.dir} already finished ({ckpt[unit]} of {total} "
             f"{'iterations' if unit == 'iter' else 'epochs'}); nothing to do")
    return saved


# ----------------------------------------------------------------------------------------------- the loop
class _Loop:
    """The state of one run of `fit`; its methods are the loop's steps, in the order they run."""

    def __init__(self, task: Task, plan: Plan, record: RunRecord, resume: Optional[Mapping[str, Any]]):
        self.task, self.plan, self.record = task, plan, record
        self.cfg, self.dist = task.cfg, task.dist
        self.unit = task.unit
        self.total = int(self.cfg[f"{self.unit}s"])
        self.step: nn.Module = LossModule(plan.model, task)
        if self.dist.distributed:
            device = self.dist.device
            self.step = nn.parallel.DistributedDataParallel(
                self.step, device_ids=[device.index] if device.type == "cuda" else None)
        self.count = self.update = 0  # epochs or iterations done; optimizer updates done
        self.best_score, self.best_at, self.since_best = float(task.worst_score), -1, 0
        if resume is not None:
            self._restore(resume)
        self.start = self.count
        self.parts = list(task.loss_parts)
        self.window = torch.zeros(len(self.parts) + 4, dtype=torch.float64)  # loss, parts, micro, samples, bad
        self.bad = self.drawn = self.total_bad = 0
        self.scores: Dict[str, Any] = {}
        self.ema_scores: Dict[str, Any] = {}
        self.train_loss: Optional[float] = None
        self.tick = time.perf_counter()

    # ------------------------------------------------------------------ checkpoints
    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        plan = self.plan
        plan.model.load_state_dict(ckpt["model"])
        plan.optimizer.load_state_dict(ckpt["optimizer"])
        plan.schedule.load_state_dict(ckpt.get("schedule"))
        if plan.ema is not None:
            plan.ema.module.load_state_dict(ckpt["model_ema"])
        if plan.scaler.is_enabled() and ckpt.get("scaler"):
            plan.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt.get("rng"))
        self.count, self.update = int(ckpt[self.unit]), int(ckpt["updates"])
        self.best_score, self.best_at = float(ckpt["best_score"]), int(ckpt["best_at"])
        self.since_best = int(ckpt.get("since_best", 0))

    def save(self, row: Mapping[str, Any], best: bool) -> None:
        if not self.dist.is_main:
            return
        plan = self.plan
        state = {"format": FORMAT, "version": FORMAT_VERSION, "task": self.task.task_name or None,
                 "model": plan.model.state_dict(),
                 "optimizer": plan.optimizer.state_dict(), "schedule": plan.schedule.state_dict(),
                 "epoch": self.count if self.unit == "epoch" else None,
                 "iter": self.update, "updates": self.update, "rng": capture_rng_state(), "config": jsonable(self.cfg),
                 "best_score": self.best_score, "best_at": self.best_at, "since_best": self.since_best,
                 "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
                 "lbmamba_version": __version__, **self.task.checkpoint_extra()}
        if plan.ema is not None:
            state["model_ema"] = plan.ema.module.state_dict()
        if plan.scaler.is_enabled():
            state["scaler"] = plan.scaler.state_dict()
        atomic_save(state, self.task.last_path)
        if best:
            atomic_save(state, self.task.best_path)

    # ------------------------------------------------------------------ one optimizer update
    def _where(self, micro: int) -> str:
        if self.unit == "iter":
            return f"{self.task.label}iteration {self.update + 1}"
        step = (self.update - self.count * self.plan.updates_per_epoch) * self.plan.accum + micro
        return (f"{self.task.label}epoch {self.count + 1}, step {step + 1} (global step "
                f"{self.update * self.plan.accum + micro})")

    def _next_inputs(self, batches: Iterator[Tuple]) -> Tuple[Tuple, int]:
        """The next micro-batch's inputs and its unreadable samples; when they left fewer than the task's
        min_batch (BatchNorm needs 2), the next batches are drawn too."""
        *inputs, bad = next(batches)
        bad = int(bad)
        drawn = len(inputs[0]) + bad  # the batch as drawn, before unreadable samples left it
        self.drawn += drawn
        while len(inputs[0]) < min(self.task.min_batch, drawn):
            if self.bad + bad > self.task.bad_limit(self.drawn):
                raise self.task.too_many_bad(self.bad + bad, self.drawn, "in training")
            *inputs, more_bad = next(batches)
            bad += int(more_bad)
            self.drawn += len(inputs[0]) + int(more_bad)
        return tuple(inputs), bad

    def optimizer_update(self, batches: Iterator[Tuple]) -> None:
        plan, cfg, dist, device = self.plan, self.cfg, self.dist, self.dist.device
        plan.schedule.before_update(self.update)
        for micro in range(plan.accum):
            inputs, bad = self._next_inputs(batches)
            last = micro + 1 == plan.accum
            sync = self.step.no_sync() if (dist.distributed and not last) else contextlib.nullcontext()
            with sync:
                with autocast(device, cfg.get("amp")):
                    losses = self.step(*self.task.to_device(inputs))
                loss = losses["loss"]
                if cfg.get("debug_nan_iter") == self.update or cfg.get("debug_nan_step") == (
                        self.update * plan.accum + micro):
                    loss = loss * float("nan")
                plan.scaler.scale(loss / plan.accum).backward()
            zero = torch.zeros((), device=device)
            stats = torch.stack([loss.detach().float()] + [losses.get(p, zero).detach().float() for p in self.parts]
                                + [torch.tensor(v, device=device) for v in (1.0, float(len(inputs[0])), float(bad))])
            stats = all_reduce_sum(stats.double(), dist).cpu()  # every rank sees the same (and stops together)
            if not math.isfinite(stats[0].item()):
                raise TrainingDivergedError(
                    f"the training loss became {'NaN' if math.isnan(stats[0].item()) else 'infinite'} at "
                    f"{self._where(micro)}; stopped, the last good checkpoint is untouched. Lower lr, add clip_grad, "
                    "or use amp=bf16 instead of fp16")
            self.window += stats
            self.bad += int(stats[-1].item())
            self.total_bad += int(stats[-1].item())
            drawn = int(self.drawn * dist.world_size)
            if self.bad > self.task.bad_limit(drawn):
                raise self.task.too_many_bad(self.bad, drawn, f"in {self._unit_name()}")
        if cfg.get("clip_grad"):
            plan.scaler.unscale_(plan.optimizer)
            dispatch_clip_grad(plan.model.parameters(), value=cfg["clip_grad"], mode=cfg.get("clip_mode", "norm"))
        plan.scaler.step(plan.optimizer)
        plan.scaler.update()
        plan.optimizer.zero_grad(set_to_none=True)
        self.update += 1
        if plan.ema is not None:
            plan.ema.update(plan.model, step=self.update)
        plan.schedule.after_update(self.update)
        if dist.follower is not None:  # threads: null follows the machine's load during the run
            dist.follower.after_step()

    def _unit_name(self) -> str:
        return f"epoch {self.count + 1}" if self.unit == "epoch" else "training"

    # ------------------------------------------------------------------ rows, validation, checkpoints
    def train_row(self) -> Dict[str, Any]:
        """The training figures since the last row (then reset)."""
        n = max(self.window[len(self.parts) + 1].item(), 1.0)
        seconds = time.perf_counter() - self.tick
        self.train_loss = self.window[0].item() / n
        row = {**self.task.row_extra(), self.unit: self.count if self.unit == "epoch" else self.update,
               "train_loss": self.train_loss,
               **{f"train_{p}": self.window[1 + k].item() / n for k, p in enumerate(self.parts)},
               "lr": max(g["lr"] for g in self.plan.optimizer.param_groups),
               f"train_{self.task.samples}_per_s": self.window[-2].item() / max(seconds, 1e-9),
               f"bad_{self.task.samples}": int(self.window[-1].item()), "seconds": seconds}
        self.window.zero_()
        self.tick = time.perf_counter()
        return row

    def validate(self, row: Dict[str, Any]) -> bool:
        """Evaluate into `row` (and the EMA weights, as <key>_ema); whether this is the best score yet."""
        count = self.count if self.unit == "epoch" else self.update
        self.scores, score = self.task.evaluate(self.plan.model, count)
        row.update(self.scores)
        if self.plan.ema is not None:
            self.ema_scores, _ = self.task.evaluate(self.plan.ema.module, count)
            row.update({f"{k}_ema": v for k, v in self.ema_scores.items()})
        self.plan.model.train()
        if score > self.best_score:
            self.best_score, self.best_at, self.since_best = float(score), count, 0
            return True
        self.since_best += 1
        return False

    def keep(self, row: Dict[str, Any], best: bool, save: bool) -> None:
        if save:
            self.save(row, best)
        if row and self.dist.is_main:
            self.record.add(row)
        barrier(self.dist)

    def stop_here(self, done: bool) -> bool:
        limit = self.cfg.get(f"stop_after_{self.unit}s")
        return bool(limit) and (self.count if self.unit == "epoch" else self.update) - self.start >= limit \
            and not done

    # ------------------------------------------------------------------ the two ways of counting
    def run_epochs(self) -> bool:
        """Epoch by epoch; True when stopped by stop_after_epochs."""
        plan, cfg = self.plan, self.cfg
        show = cfg.get("progress", False) and self.dist.is_main
        while self.count < self.total and not self.task.stop_early(self.count, self.since_best):
            epoch = self.count
            self.plan.model.train()
            batches = iter(self.task.train_batches(epoch, self.update))
            self.bad = self.drawn = 0
            self.tick = epoch_start = time.perf_counter()
            with progress(total=plan.updates_per_epoch, desc=f"{self.task.label}epoch {epoch + 1}/{self.total}",
                          enabled=show) as bar:
                for _ in range(plan.updates_per_epoch):
                    self.optimizer_update(batches)
                    bar.update(1)
                    running = self.window[0].item() / max(self.window[len(self.parts) + 1].item(), 1.0)
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{plan.optimizer.param_groups[0]['lr']:.2e}")
            plan.schedule.after_epoch(epoch)
            self.count += 1
            row = self.train_row()
            done = self.count == self.total
            best = False
            if self.count % cfg.get("eval_every", 1) == 0 or done:
                best = self.validate(row)
            row["epoch_seconds"] = time.perf_counter() - epoch_start
            self.keep(row, best, save=True)
            if self.stop_here(done):
                return True
        return False

    def run_iterations(self) -> bool:
        """Iteration by iteration from one endless stream of batches; True when stopped by stop_after_iters."""
        cfg = self.cfg
        self.plan.model.train()
        batches = iter(self.task.train_batches(0, self.update))
        show = cfg.get("progress", False) and self.dist.is_main
        with progress(total=self.total - self.update, desc=f"{self.task.label}train", enabled=show) as bar:
            while self.update < self.total:
                self.optimizer_update(batches)
                bar.update(1)
                done = self.update == self.total
                stopping = self.stop_here(done)
                evaluating = self.update % cfg["eval_every"] == 0 or done
                row: Dict[str, Any] = {}
                if self.update % cfg["log_every"] == 0 or evaluating or stopping:
                    row = self.train_row()
                    bar.set_postfix(loss=f"{self.train_loss:.4f}", lr=f"{row['lr']:.2e}")
                best = self.validate(row) if evaluating else False
                self.keep(row, best, save=evaluating or stopping or self.update % cfg["save_every"] == 0)
                if stopping:
                    return True
        return False


def fit(task: Task, plan: Plan, record: RunRecord, resume: Optional[Mapping[str, Any]] = None) -> Outcome:
    """Train `plan.model` for the task's epochs or iterations from `resume` (a checkpoint of this format, or
    None for a new run); return how it ended. Every rank calls it."""
    loop = _Loop(task, plan, record, resume)
    plan.optimizer.zero_grad(set_to_none=True)
    stopped = loop.run_epochs() if task.unit == "epoch" else loop.run_iterations()
    cfg, dist = task.cfg, task.dist
    if cfg.get("debug_dump_rank_state"):  # parameters only: BatchNorm statistics are each rank's own
        torch.save({k: v.detach().cpu() for k, v in plan.model.named_parameters()},
                   os.path.join(task.run.dir, f"rank{dist.rank}_params.pth"))
        barrier(dist)
    if not loop.scores:  # stopped before a validation, or resumed when all was done (every rank takes part)
        loop.scores, score = task.evaluate(plan.model, loop.count if task.unit == "epoch" else loop.update)
        loop.best_score = max(loop.best_score, float(score))
    if loop.train_loss is None:
        rows = [r for r in record.records if "train_loss" in r]
        loop.train_loss = rows[-1]["train_loss"] if rows else None
    return Outcome(loop.count if task.unit == "epoch" else loop.update, loop.scores, loop.best_score, loop.best_at,
                   loop.total_bad, stopped, loop.train_loss, loop.ema_scores)


def run_files(run: Run, task: Task, record: RunRecord) -> Dict[str, Any]:
    """The files of a run for its final JSON."""
    best, last = task.best_path, task.last_path
    return {"checkpoint": best if os.path.isfile(best) else last, "last_checkpoint": last,
            "metrics": record.metrics_path, "plot": record.plot_path, "output": run.dir}


def start_record(task: Task, run: Run, resume: Optional[Mapping[str, Any]], curves: Sequence, title: str,
                 shown: Sequence[str], group: Optional[str] = None, keep=None) -> RunRecord:
    """The run's record; a resumed run keeps the rows its checkpoint covers."""
    unit = task.unit
    done = int((resume or {}).get(unit) or 0)
    if keep is None and run.resumed:
        keep = lambda r: r.get(unit, 0) <= done
    return RunRecord(run.dir, curves, title, group=group, shown=shown, enabled=run.dist.is_main,
                     log=run.cfg.get("log"), x=unit, keep=keep)

