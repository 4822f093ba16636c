"""The training loop every task runs (`lbmamba.engine.loop`), on toy tasks that take a second: a run resumed
from its last.pth ends as one that never stopped (counted in epochs and in iterations), a NaN loss stops the
run and keeps the last good checkpoint, gradient accumulation, early stopping, the unreadable-sample limit,
and the one checkpoint format."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from lbmamba.engine import TrainingDivergedError, UserError
from lbmamba.engine.device import grad_scaler
from lbmamba.engine.distributed import DistInfo
from lbmamba.engine.loaders import iteration_loader
from lbmamba.engine.loop import FORMAT, Plan, Task, check_resumable, fit, start_record
from lbmamba.engine.records import read_jsonl
from lbmamba.engine.rng import derive_seed, seed_everything
from lbmamba.engine.runs import Run
from lbmamba.engine.schedule import IterationSchedule, Schedule

CURVES = [("loss", "loss", [("train_loss", "train"), ("val_loss", "validation")])]


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x @ torch.tensor([1.0, -2.0, 0.5, 3.0]))[:, None] + 0.1 * torch.randn(n, 1, generator=g)


class Toy(Task):
    """A small regression with dropout (so the RNG matters), in epochs or iterations."""

    samples = "points"
    worst_score = -math.inf  # the score is minus the validation loss

    def __init__(self, run, unit="epoch", bad_every=0, patience=None, dropout=0.2):
        super().__init__(run)
        self.unit, self.bad_every, self.patience, self.dropout = unit, bad_every, patience, dropout
        x, y = _data()
        self.dataset, self.val = TensorDataset(x, y), _data(16, seed=1)
        self.generator = torch.Generator()
        self.loader = DataLoader(self.dataset, batch_size=run.cfg["batch_size"], shuffle=True, drop_last=True,
                                 generator=self.generator)
        self.drawn_batches = 0

    def plan(self) -> Plan:
        cfg = self.cfg
        seed_everything(cfg["seed"])
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(self.dropout), nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
        schedule = IterationSchedule(optimizer, cfg, cfg["lr"]) if self.unit == "iter" else Schedule()
        return Plan(model, optimizer, schedule, grad_scaler(torch.device("cpu"), None), accum=cfg["grad_accum"],
                    updates_per_epoch=len(self.loader) // cfg["grad_accum"])

    def _tagged(self, batches):
        for x, y in batches:
            self.drawn_batches += 1
            bad = 1 if self.bad_every and self.drawn_batches % self.bad_every == 0 else 0
            yield x, y, bad

    def train_batches(self, epoch, update):
        if self.unit == "iter":
            loader = iteration_loader(self.dataset, self.cfg, self.dist, update,
                                      self.cfg["grad_accum"], lambda b: tuple(torch.stack(t) for t in zip(*b)), True)
            return self._tagged(loader)
        seed_everything(self.cfg["seed"], epoch + 1)
        self.generator.manual_seed(derive_seed(self.cfg["seed"], epoch))
        return self._tagged(self.loader)

    def losses(self, model, x, y):
        return {"loss": nn.functional.mse_loss(model(x), y), "mae": (model(x) - y).abs().mean()}

    loss_parts = ("mae",)

    def evaluate(self, model, count):
        model.eval()
        with torch.no_grad():
            loss = nn.functional.mse_loss(model(self.val[0]), self.val[1]).item()
        return {"val_loss": loss}, -loss

    def bad_limit(self, drawn):
        return 2

    def stop_early(self, epochs_done, evals_since_best):
        return self.patience is not None and evals_since_best >= self.patience


def _cfg(**changes):
    cfg = dict(seed=0, lr=1e-2, batch_size=8, grad_accum=1, epochs=4, iters=12, eval_every=2, save_every=3, log_every=2,
               schedule="warmup_then_poly", warmup_iters=2, warmup_ratio=0.1, min_lr=0.0, poly_power=1.0,
               progress=False, log=None)
    cfg.update(changes)
    return cfg


def _run(folder, unit="epoch", resume_from=None, dropout=0.2, **cfg):
    """Train a Toy run in `folder` (from its last.pth when `resume_from`); (outcome, final weights)."""
    os.makedirs(folder, exist_ok=True)
    cfg = _cfg(**cfg)
    checkpoint = None
    if resume_from:
        cfg["resume"] = str(folder)
        checkpoint = torch.load(resume_from, weights_only=True)
    run = Run(cfg=cfg, dir=str(folder), dist=DistInfo(), checkpoint=checkpoint)
    task = Toy(run, unit, dropout=dropout)
    plan = task.plan()
    record = start_record(task, run, checkpoint, CURVES, "toy", ("train_loss",))
    end = fit(task, plan, record, checkpoint)
    return end, {k: v.clone() for k, v in plan.model.state_dict().items()}


@pytest.mark.parametrize("unit, stop", [("epoch", "stop_after_epochs"), ("iter", "stop_after_iters")])
@pytest.mark.parametrize("accum", [1, 2])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, unit, stop, accum, restore_globals):
    whole, weights = _run(tmp_path / "whole", unit, grad_accum=accum)
    part, _ = _run(tmp_path / "part", unit, grad_accum=accum, **{stop: 1})
    assert part.stopped_early and part.count == 1
    resumed, resumed_weights = _run(tmp_path / "part", unit, resume_from=tmp_path / "part" / "last.pth",
                                    grad_accum=accum)
    assert not resumed.stopped_early and resumed.count == whole.count
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    assert resumed.best_score == whole.best_score and resumed.best_at == whole.best_at
    counts = [r[unit] for r in read_jsonl(str(tmp_path / "part" / "metrics.jsonl"))]
    assert counts == sorted(set(counts))  # continued, no repeats (a stop records its own row)
    assert {r[unit] for r in read_jsonl(str(tmp_path / "whole" / "metrics.jsonl"))} <= set(counts)


def test_gradient_accumulation_matches_the_bigger_batch(tmp_path, restore_globals):
    """Two micro-batches of 8 per update give the update of one batch of 16: the same data order (one shuffle
    of the same generator), the mean loss of each half weighted by 1 / accum."""
    _, two = _run(tmp_path / "a", batch_size=8, grad_accum=2, epochs=2, dropout=0.0)
    _, one = _run(tmp_path / "b", batch_size=16, grad_accum=1, epochs=2, dropout=0.0)
    _, other = _run(tmp_path / "c", batch_size=8, grad_accum=1, epochs=2, dropout=0.0)
    assert all(torch.allclose(two[k], one[k], atol=1e-6) for k in two)
    assert not all(torch.allclose(other[k], one[k], atol=1e-6) for k in one)  # twice the updates: not the same


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, restore_globals):
    with pytest.raises(TrainingDivergedError, match="loss became NaN at iteration 5.*last good checkpoint"):
        _run(tmp_path / "iter", "iter", debug_nan_iter=4, eval_every=10)
    state = torch.load(tmp_path / "iter" / "last.pth", weights_only=True)
    assert state["iter"] == 3  # save_every 3: written after iteration 3, untouched by the NaN at 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # counted in epochs (6 micro-batches of 8 per epoch, 2 per update): micro-batch 9 is step 4 of epoch 2
    with pytest.raises(TrainingDivergedError, match=r"NaN at epoch 2, step 4 \(global step 9\)"):
        _run(tmp_path / "epoch", "epoch", grad_accum=2, debug_nan_step=9)
    state = torch.load(tmp_path / "epoch" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_the_checkpoint_format_holds_what_resuming_and_eval_need(tmp_path, restore_globals):
    end, _ = _run(tmp_path, "epoch")
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["format"] == FORMAT and state["epoch"] == 4 and state["updates"] == 4 * 6
    assert {"model", "optimizer", "schedule", "rng", "config", "best_score", "best_at", "metrics"} <= set(state)
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == end.best_at and best["best_score"] == end.best_score
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".") or f.endswith(".tmp")]  # atomic writes
    with pytest.raises(UserError, match="earlier lbmamba and cannot be resumed"):
        check_resumable({"model": {}, "epoch": 3}, "old/last.pth")


def test_early_stopping_asks_before_each_epoch(tmp_path, restore_globals):
    folder = tmp_path / "r"
    os.makedirs(folder)
    run = Run(cfg=_cfg(epochs=50, eval_every=1, lr=0.5), dir=str(folder), dist=DistInfo())
    task = Toy(run, patience=2)
    end = fit(task, task.plan(), start_record(task, run, None, CURVES, "toy", ()))
    assert end.count < 50 and end.count - end.best_at == 2


def test_unreadable_samples_are_counted_until_the_task_limit(tmp_path, restore_globals):
    end, _ = _run(tmp_path / "ok", "epoch", epochs=1)
    assert end.bad == 0
    folder = tmp_path / "bad"
    os.makedirs(folder)
    run = Run(cfg=_cfg(epochs=2), dir=str(folder), dist=DistInfo())
    task = Toy(run, bad_every=2)  # 3 of an epoch's 6 batches: the limit is 2
    with pytest.raises(UserError, match="too many unreadable samples in epoch 1: 3"):
        fit(task, task.plan(), start_record(task, run, None, CURVES, "toy", ()))
