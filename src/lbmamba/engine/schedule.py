"""Learning-rate schedules, one place for every task: timm's epoch schedulers (classification) and the
iteration schedules of mmsegmentation / mmdetection (the dense tasks), behind the three calls the training
loop makes (`before_update`, `after_update`, `after_epoch`)."""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Dict, Mapping, Optional

import torch

__all__ = ["SCHEDULES", "POLY_SCHEDULES", "lr_factor", "Schedule", "TimmSchedule", "IterationSchedule"]

#: the iteration schedules (`schedule` key of `det train`; `seg train` takes the poly ones)
POLY_SCHEDULES = ("warmup_then_poly", "poly_with_warmup")
SCHEDULES = (*POLY_SCHEDULES, "warmup_then_step")


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


class Schedule:
    """A constant learning rate (MambaMIL's); the base of the others. `update` counts optimizer updates from 0."""

    def before_update(self, update: int) -> None:
        """Called before optimizer update `update` (0-based)."""

    def after_update(self, updates_done: int) -> None:
        """Called after an optimizer update, with the number of updates done so far."""

    def after_epoch(self, epoch: int) -> None:
        """Called after the (0-based) epoch `epoch` of an epoch-counted run."""

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return None

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        pass


class TimmSchedule(Schedule):
    """A timm scheduler (create_scheduler_v2) stepped as the reference loops step it: `step_update` after every
    optimizer update, `step(epoch)` after every epoch (so epoch e + 1 runs at the lr of e)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], updates_per_epoch: int):
        from timm.scheduler import create_scheduler_v2

        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg["sched"], num_epochs=cfg["epochs"], warmup_epochs=cfg["warmup_epochs"],
            warmup_lr=cfg["warmup_lr"], min_lr=cfg["min_lr"], step_on_epochs=not cfg["sched_on_updates"],
            updates_per_epoch=updates_per_epoch,
        )

    def after_update(self, updates_done: int) -> None:
        self.scheduler.step_update(num_updates=updates_done)

    def after_epoch(self, epoch: int) -> None:
        self.scheduler.step(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        if state is not None:
            self.scheduler.load_state_dict(dict(state))


class IterationSchedule(Schedule):
    """`lr_factor` of the config: every parameter group's lr is its peak (lr x the group's `lr_scale`, the
    layer-wise decay) times the factor of the update about to run. Stateless: the factor is a function of the
    update's index, so a resumed run needs nothing saved."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], lr: float):
        self.optimizer, self.cfg = optimizer, cfg
        for group in optimizer.param_groups:
            group["peak_lr"] = lr * group.get("lr_scale", 1.0)

    def before_update(self, update: int) -> None:
        factor = lr_factor(self.cfg, update)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
