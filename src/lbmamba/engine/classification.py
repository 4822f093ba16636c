"""Image classification: `train` and `evaluate`, single process or under torchrun (DDP).

The pieces come from timm (create_model, create_optimizer_v2, create_scheduler_v2, Mixup,
SoftTargetCrossEntropy, LabelSmoothingCrossEntropy, RepeatAugSampler, ModelEmaV3, create_transform);
this module wires them into a loop on the shared run helpers (run folder, exact resume, records):

* determinism: data order, augmentation and stochastic depth are seeded from (seed, epoch, rank) at the
  start of every epoch, and a checkpoint stores every RNG state, so a run killed and resumed from its
  folder ends with the same weights as one that never stopped;
* `last.pth` / `best.pth` written atomically every epoch (rank 0);
* the loss is checked every step on every rank: NaN / inf stops the run before any checkpoint is
  touched;
* unreadable images are skipped and counted; more than `max_bad_images` or `max_bad_fraction` of those drawn
  (whichever is larger) stops the run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..data import build_image_folder, build_transforms, find_classification_data, load_digits_split
from ..models import load_checkpoint, unwrap_state_dict
from .config import ConfigTable, Key
from .device import autocast, grad_scaler
from .distributed import DistInfo, all_reduce_sum, session
from .errors import UserError, user_errors
from .loaders import ShardSampler, bad_sample_limit, batch_plan, check_bad_samples, loader_workers
from .loop import Plan, Task, already_finished, check_resumable, fit, run_files, start_record
from .models import check_model_name, create_classifier, load_initial_weights
from .optim import create_optimizer, param_groups, preset_for
from .records import progress
from .rng import derive_seed, seed_everything, seed_worker
from .run_keys import INFERENCE_AMP, run_keys
from .runs import LAST, Run, load_training_checkpoint, note, open_run, require_task
from .schedule import TimmSchedule

__all__ = ["TRAIN", "EVAL", "train", "evaluate", "evaluate_model", "ClassificationTask"]


def _check_train(cfg: Dict[str, Any]) -> None:
    if not 0.0 < cfg["val_fraction"] < 1.0:
        raise UserError(f"config key 'val_fraction' must be in (0, 1), got {cfg['val_fraction']!r}")
    if not 0.0 <= cfg["max_bad_fraction"] <= 1.0:
        raise UserError(f"config key 'max_bad_fraction' must be in [0, 1], got {cfg['max_bad_fraction']!r}")
    for key in ("scale", "ratio"):
        if key in cfg and (len(cfg[key]) != 2 or not 0 < cfg[key][0] <= cfg[key][1]):
            raise UserError(f"config key {key!r} must be two numbers 0 < low <= high, got {cfg[key]!r}")


# The defaults are the shipped run: a small LBVim on scikit-learn's 8x8 digits.
TRAIN = ConfigTable("train", {
    # model
    "model": Key("lbvim_tiny_patch16_224", "timm model name (lbvim_*, vim_*, uvim_* or any timm model)", flag=True,
                 effect="model"),
    "model_kwargs": Key({"embed_dim": 64, "depth": 4, "patch_size": 8},
                        "extra constructor arguments (embed_dim, depth, patch_size, ...)", effect="model"),
    "img_size": Key(32, "input resolution (null: the model's default)", nullable=True, positive=True, flag=True,
                    effect="model"),
    "in_chans": Key(None, "image channels (null: 1 for digits, 3 for image folders)", kind="int", positive=True,
                    effect="model"),
    "num_classes": Key(None, "classes (null: from the data)", kind="int", positive=True, effect="model"),
    "drop_path": Key(0.0, "stochastic depth rate", low=0),
    "init_checkpoint": Key(None, "start from these weights (e.g. a reference {'model': state_dict} file)", kind="str",
                           flag=True),
    "init_partial": Key(False, "load only the init_checkpoint tensors that fit the model (else a mismatch is an "
                               "error)", flag=True),
    "grad_checkpointing": Key(False, "recompute activations in backward (model.set_grad_checkpointing)", flag=True),
    # data
    "data": Key("digits", "'digits' (scikit-learn, bundled) or an ImageFolder root with train/ and val/",
                nullable=True, flag=True),
    "train_split": Key("train", "sub-folder of `data` with the training images"),
    "val_split": Key("val", "sub-folder of `data` with the validation images"),
    "val_fraction": Key(0.2, "digits: stratified validation fraction (fixed split, seed 0)"),
    "digits_shift": Key(2, "digits: random translation in pixels (training only)", low=0),
    "workers": Key(None, "data-loading worker processes per rank (null: 0 for digits, else min(8, cores / local "
                         "processes))", kind="int", low=0, flag=True, effect="none"),
    "max_bad_fraction": Key(0.01, "fail when more than this fraction of the images drawn, and more than "
                                  "max_bad_images, are unreadable", flag=True, effect="none"),
    "max_bad_images": Key(1, "unreadable images tolerated whatever their fraction (small data sets)", low=0,
                          effect="none"),
    # batch and optimisation
    "batch_size": Key(64, "images per process per step (micro-batch)", positive=True, flag=True),
    "global_batch_size": Key(None, "if set: grad_accum = global_batch_size / (batch_size x world size)", kind="int",
                             positive=True, flag=True),
    "grad_accum": Key(1, "micro-batches per optimizer step (ignored when global_batch_size is set)", positive=True,
                      flag=True),
    "epochs": Key(15, "training epochs", positive=True, flag=True),
    "opt": Key("adamw", "timm optimizer name (create_optimizer_v2)"),
    "opt_eps": Key(1e-8, "optimizer epsilon"),
    "momentum": Key(0.9, "momentum for opt=sgd / momentum / lamb ... (AdamW ignores it)"),
    "weight_decay": Key(0.05, "weight decay (not on biases, 1-d parameters, pos_embed, cls_token)", low=0),
    "no_decay_ssm": Key(False, "also exempt the SSM matrices A_log / A_b_log from weight decay (the reference "
                               "decays them)"),
    "lr": Key(2e-3, "peak learning rate; null: base_lr x global batch / lr_base_size", nullable=True, positive=True,
              flag=True),
    "base_lr": Key(1e-3, "learning rate per lr_base_size images of global batch (used when lr is null)"),
    "lr_base_size": Key(512, "the batch size base_lr refers to", positive=True),
    "sched": Key("cosine", "timm scheduler name (create_scheduler_v2)"),
    "sched_on_updates": Key(True, "step the schedule every optimizer update (else once per epoch)"),
    "warmup_epochs": Key(2, "linear warm-up epochs", low=0),
    "warmup_lr": Key(1e-6, "learning rate at the start of the warm-up"),
    "min_lr": Key(1e-5, "final learning rate of the cosine"),
    "clip_grad": Key(None, "clip gradients at this value (null: off)", kind="float", positive=True, flag=True),
    "clip_mode": Key("norm", "norm | value | agc", choices=("norm", "value", "agc")),
    # regularisation and augmentation
    "smoothing": Key(0.1, "label smoothing", low=0),
    "mixup": Key(0.0, "mixup alpha (0: off)", low=0),
    "cutmix": Key(0.0, "cutmix alpha (0: off)", low=0),
    "mixup_prob": Key(1.0, "probability of applying mixup or cutmix to a batch"),
    "mixup_switch_prob": Key(0.5, "probability of cutmix instead of mixup when both are on"),
    "mixup_mode": Key("batch", "batch | pair | elem", choices=("batch", "pair", "elem")),
    "aa": Key(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (ImageFolder data)", kind="str"),
    "color_jitter": Key(0.0, "colour jitter strength (ImageFolder data)"),
    "scale": Key([0.08, 1.0], "random-resized-crop area range (ImageFolder data; digit-like data wants about 0.5,1)"),
    "ratio": Key([0.75, 4 / 3], "random-resized-crop aspect-ratio range (ImageFolder data)"),
    "hflip": Key(0.5, "horizontal flip probability (ImageFolder data; 0 for digits, text, ...)", low=0),
    "vflip": Key(0.0, "vertical flip probability (ImageFolder data)", low=0),
    "reprob": Key(0.0, "random erasing probability (ImageFolder data)"),
    "remode": Key("pixel", "random erasing mode"),
    "recount": Key(1, "random erasing count"),
    "repeated_aug": Key(False, "repeated augmentation (timm RepeatAugSampler)"),
    "num_repeats": Key(3, "repeats per image with repeated_aug", positive=True),
    "train_interpolation": Key("bicubic", "resize interpolation for training (random, bilinear, bicubic)"),
    "interpolation": Key("bicubic", "resize interpolation for evaluation"),
    "crop_pct": Key(0.875, "evaluation centre-crop fraction", positive=True),
    "model_ema": Key(False, "keep an EMA of the weights (timm ModelEmaV3)"),
    "model_ema_decay": Key(0.99996, "EMA decay per optimizer update"),
    # run
    "eval_every": Key(1, "validate every N epochs (and always after the last)", positive=True),
    **run_keys("<model>", "base seed (data order and augmentation depend on seed + epoch + rank)"),
    "debug_nan_step": Key(None, "test hook: make the loss NaN at this (0-based) micro-batch", kind="int",
                          hidden=True),
}, check=_check_train)

#: `lbmamba eval`: the data and model keys of training, with nothing chosen (a checkpoint of ours says)
EVAL = TRAIN.derive(
    "eval",
    ["model", "model_kwargs", "img_size", "in_chans", "num_classes", "data", "val_split", "val_fraction", "batch_size",
     "workers", "max_bad_fraction", "max_bad_images", "crop_pct", "interpolation", "amp", "device", "threads",
     "progress"],
    changes={"amp": INFERENCE_AMP, "model": dict(default=None), "model_kwargs": dict(default={}),
             "img_size": dict(default=None),
             "data": dict(default=None), "interpolation": dict(flag=True),
             "crop_pct": dict(flag=True)},
    extra={"checkpoint": Key(None, "weights to evaluate (.pth / .safetensors)", kind="str", flag=True),
           "ema": Key(False, "evaluate the EMA weights of one of our checkpoints", flag=True)},
    check=_check_train,
)
#: what `lbmamba eval` takes from one of our checkpoints when the user does not say
_EVAL_FROM_CHECKPOINT = ("model", "model_kwargs", "img_size", "in_chans", "num_classes", "data", "val_split",
                         "val_fraction", "crop_pct", "interpolation", "batch_size")
_CURVES = [("loss", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
           ("accuracy", "accuracy (%)", [("train_top1", "train top-1"), ("val_top1", "val top-1"),
                                         ("val_top5", "val top-5"), ("val_top1_ema", "val top-1 (EMA)")])]
_SHOWN = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema", "lr", "epoch_seconds")


# ----------------------------------------------------------------------------------------------- data
def _build_datasets(cfg: Mapping[str, Any], info: Mapping[str, Any], model: nn.Module, train: bool = True,
                    class_names: Optional[List[str]] = None) -> Tuple[Optional[Dataset], Dataset]:
    if info["kind"] == "digits":
        train_ds, val_ds = load_digits_split(
            img_size=cfg.get("img_size") or 32, val_fraction=cfg["val_fraction"], shift=cfg.get("digits_shift", 0),
            in_chans=cfg.get("in_chans") or 1,
        )
        return (train_ds if train else None), val_ds
    names = class_names or info["classes"]
    class_to_idx = {c: i for i, c in enumerate(names)}
    mode = "L" if (cfg.get("in_chans") or 3) == 1 else "RGB"
    train_ds = None
    if train:
        train_ds = build_image_folder(info["train_dir"], build_transforms(cfg, model, True), class_to_idx, mode,
                                      split=cfg["train_split"])
    val_ds = build_image_folder(info["val_dir"], build_transforms(cfg, model, False), class_to_idx, mode,
                                split=cfg["val_split"])
    return train_ds, val_ds


def _val_loader(ds: Dataset, cfg: Mapping[str, Any], dist: DistInfo, batch_size: int) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, sampler=ShardSampler(len(ds), dist.rank, dist.world_size),
        num_workers=loader_workers(cfg, dist), pin_memory=dist.device.type == "cuda", drop_last=False,
        worker_init_fn=seed_worker,
    )


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, dist: DistInfo, amp: Optional[str] = None,
                   show_progress: bool = False, desc: str = "eval") -> Dict[str, float]:
    """Cross-entropy loss, top-1, top-5 (%) and images/s over `loader` (summed over ranks).

    Samples flagged as unreadable-image substitutes are left out of the figures (and counted)."""
    device = dist.device
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top1, top5, count, bad
    start = time.perf_counter()
    for images, targets, bad in progress(loader, desc=desc, enabled=show_progress and dist.is_main):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        keep = (bad == 0).to(device)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()[keep]
        targets = targets[keep]
        k = min(5, logits.shape[-1])
        hit = logits.topk(k, dim=-1).indices == targets[:, None]
        totals += torch.tensor(
            [
                F.cross_entropy(logits, targets, reduction="sum").item() if len(targets) else 0.0,
                hit[:, :1].any(-1).sum().item(),
                hit.any(-1).sum().item(),
                float(len(targets)),
                float((bad != 0).sum().item()),
            ],
            dtype=torch.float64,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    all_reduce_sum(totals, dist)
    model.train(was_training)
    loss_sum, top1, top5, count, bad = totals.tolist()
    count = max(count, 1.0)
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "images": int(count),
        "bad_images": int(bad),
        "seconds": seconds,
        "images_per_s": count / max(seconds, 1e-9),
    }


# ----------------------------------------------------------------------------------------------- training
def _loss_functions(cfg: Mapping[str, Any], num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
            switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"], label_smoothing=cfg["smoothing"],
            num_classes=num_classes,
        )
        return mixup_fn, SoftTargetCrossEntropy()
    if cfg["smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return None, nn.CrossEntropyLoss()


def _prepare_train(cfg: Dict[str, Any], info: Dict[str, Any]) -> Dict[str, Any]:
    """Check the model and the data (found into `info`), and fill in what the data decides, before the run
    folder exists."""
    check_model_name(cfg["model"])
    info.update(find_classification_data(cfg))
    if cfg.get("num_classes") and cfg["num_classes"] != len(info["classes"]):
        raise UserError(f"num_classes is {cfg['num_classes']} but the data has {len(info['classes'])} classes")
    cfg["num_classes"] = len(info["classes"])
    if info["kind"] == "digits":
        cfg["img_size"] = cfg.get("img_size") or 32
    cfg["in_chans"] = cfg.get("in_chans") or (1 if info["kind"] == "digits" else 3)
    return cfg


@user_errors()
def train(overrides: Optional[Mapping[str, Any]] = None, config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Train an image classifier: the `TRAIN` table's defaults <- `config_path` <- `overrides`.

    Returns the final figures on rank 0 (None on other ranks): val_top1, val_top5, val_loss,
    best_val_top1, best_epoch, epochs, train_loss, checkpoint (best.pth), last_checkpoint, output, ...
    """
    info: Dict[str, Any] = {}  # where the data is and its classes, found once by the prepare step
    with open_run(TRAIN, overrides, config_path, lambda cfg: str(cfg["model"]),
                  lambda cfg: _prepare_train(cfg, info)) as run:
        return ClassificationTask(run, info).train()


class ClassificationTask(Task):
    """Image classification on the loop: timm's model, optimizer (the `vim_imagenet` preset), epoch scheduler,
    Mixup / CutMix and label smoothing, EMA; data order and augmentation seeded from (seed, epoch, rank)."""

    task_name = "classification"

    unit = "epoch"

    def __init__(self, run: Run, info: Mapping[str, Any]):
        super().__init__(run)
        self.info = info

    # ------------------------------------------------------------------ the run
    def train(self) -> Optional[Dict[str, Any]]:
        from timm.data.distributed_sampler import RepeatAugSampler
        from timm.utils import ModelEmaV3
        from torch.utils.data.distributed import DistributedSampler

        run, cfg, dist = self.run, self.cfg, self.dist
        device = dist.device
        wall_start = time.perf_counter()
        check_resumable(run.checkpoint, run.path(LAST))
        saved = already_finished(run, "train", "epoch")
        if saved is not None:
            return saved if dist.is_main else None

        seed_everything(cfg["seed"])  # identical initial weights on every rank
        model = create_classifier(cfg, cfg["num_classes"])
        if cfg.get("init_checkpoint") and run.checkpoint is None:
            load_initial_weights(model, cfg["init_checkpoint"], cfg["init_partial"])
        if cfg["grad_checkpointing"]:
            if not hasattr(model, "set_grad_checkpointing"):
                raise UserError(f"model {cfg['model']} does not support gradient checkpointing")
            model.set_grad_checkpointing(True)
        model.to(device)
        params = sum(p.numel() for p in model.parameters())

        self.train_ds, self.val_ds = _build_datasets(cfg, self.info, model, train=True,
                                                     class_names=self.info["classes"])
        accum, global_batch, lr = batch_plan(cfg, dist.world_size)
        batch = cfg["batch_size"]
        if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and batch % 2:
            raise UserError(f"mixup / cutmix need an even batch_size, got {batch}")
        self.generator = torch.Generator()  # reseeded every epoch: an epoch's data order depends on (seed, epoch)
        if cfg["repeated_aug"] and dist.distributed:
            self.sampler = RepeatAugSampler(self.train_ds, num_replicas=dist.world_size, rank=dist.rank,
                                            shuffle=True, num_repeats=cfg["num_repeats"])
        elif cfg["repeated_aug"]:  # the reference repeats augmentations across processes only; one process shuffles
            self.sampler = RandomSampler(self.train_ds, generator=self.generator)
        else:
            self.sampler = DistributedSampler(self.train_ds, num_replicas=dist.world_size, rank=dist.rank,
                                              shuffle=True, seed=cfg["seed"], drop_last=False)
        self.loader = DataLoader(
            self.train_ds, batch_size=batch, sampler=self.sampler, num_workers=loader_workers(cfg, dist),
            pin_memory=device.type == "cuda", drop_last=True, generator=self.generator, worker_init_fn=seed_worker,
            persistent_workers=False,
        )
        self.val_loader = _val_loader(self.val_ds, cfg, dist, batch * 2)
        updates_per_epoch = len(self.loader) // accum
        if updates_per_epoch == 0:
            raise UserError(
                f"the training set ({len(self.train_ds)} images, {len(self.sampler)} per process) is smaller than "
                f"one step (batch_size {batch} x grad_accum {accum}); lower batch_size"
            )
        preset = preset_for("classification", cfg)
        optimizer = create_optimizer(preset, param_groups(model, preset, cfg["weight_decay"],
                                                          no_decay_ssm=cfg["no_decay_ssm"]), lr, cfg)
        plan = Plan(model, optimizer, TimmSchedule(optimizer, cfg, updates_per_epoch), grad_scaler(device, cfg["amp"]),
                    accum=accum, updates_per_epoch=updates_per_epoch,
                    ema=ModelEmaV3(model, decay=cfg["model_ema_decay"]) if cfg["model_ema"] else None)
        self.mixup_fn, self.loss_fn = _loss_functions(cfg, cfg["num_classes"])
        self.loss_parts = () if self.mixup_fn is not None else ("top1",)  # soft targets: no accuracy
        resume, run.checkpoint = run.checkpoint, None  # the loop loads it; let go of it after
        record = start_record(self, run, resume, _CURVES, _run_title(cfg), _SHOWN)
        if dist.is_main:
            start = int((resume or {}).get("epoch") or 0)
            note(
                f"lbmamba train: {cfg['model']} ({params / 1e6:.2f} M params, {cfg['num_classes']} classes) on "
                f"{self.info.get('root', 'digits')}: {len(self.train_ds)} train / {len(self.val_ds)} val images; "
                f"{dist.world_size} process(es) on {device.type}; global batch {global_batch} (batch {batch} x "
                f"{dist.world_size} x accum {accum}), lr {lr:.3g}; "
                + (f"resuming at epoch {start + 1} in {run.dir}" if start else f"output {run.dir}")
            )
        end = fit(self, plan, record, resume)
        if not dist.is_main:
            return None
        result: Dict[str, Any] = {
            "val_top1": round(end.scores["val_top1"], 4),
            "val_top5": round(end.scores["val_top5"], 4),
            "val_loss": round(end.scores["val_loss"], 6),
            "best_val_top1": round(max(end.best_score, end.scores["val_top1"]), 4),
            "best_epoch": end.best_at,
            "epochs": end.count,
            "train_loss": None if end.train_loss is None else round(end.train_loss, 6),
            "train_images_per_s": round(self.last_row_rate(record), 2),
            "model": cfg["model"],
            "params": params,
            "data": str(cfg["data"]),
            "world_size": dist.world_size,
            "global_batch_size": global_batch,
            "bad_images": end.bad,
            "wall_s": round(time.perf_counter() - wall_start, 2),
            **run_files(run, self, record),
        }
        if end.ema_scores:
            result["val_top1_ema"] = round(end.ema_scores["val_top1"], 4)
        if end.stopped_early:
            result["stopped_early"] = True
        else:
            record.finish(result)
        return result

    @staticmethod
    def last_row_rate(record) -> float:
        rows = [r for r in record.records if "train_images_per_s" in r]
        return rows[-1]["train_images_per_s"] if rows else 0.0

    # ------------------------------------------------------------------ what the loop asks
    def train_batches(self, epoch: int, update: int):
        cfg, dist = self.cfg, self.dist
        seed_everything(cfg["seed"], epoch + 1, dist.rank)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch + cfg["seed"] * 100_003 if cfg["repeated_aug"] else epoch)
        self.generator.manual_seed(derive_seed(cfg["seed"], epoch, dist.rank, 1))
        # unreadable images come as flagged substitutes: they stay in the batch and are counted
        return ((images, targets, int(bad.sum())) for images, targets, bad in self.loader)

    def losses(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        hard_targets = targets
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        logits = model(images)
        out = {"loss": self.loss_fn(logits, targets)}
        if self.mixup_fn is None:
            out["top1"] = 100.0 * (logits.detach().argmax(-1) == hard_targets).float().mean()
        return out

    def evaluate(self, model: nn.Module, count: int) -> Tuple[Dict[str, Any], float]:
        cfg = self.cfg
        figures = evaluate_model(model, self.val_loader, self.dist, cfg["amp"], cfg["progress"], desc=f"val {count}")
        check_bad_samples(figures["bad_images"], len(self.val_ds), cfg, "images", "in the validation set")
        return {"val_loss": figures["loss"], "val_top1": figures["top1"], "val_top5": figures["top5"]}, figures["top1"]

    def bad_limit(self, drawn: int) -> float:
        # a fraction of what an epoch draws in all (the sampler's share on every rank)
        return bad_sample_limit(self.cfg, len(self.sampler) * self.dist.world_size)

    def too_many_bad(self, bad: int, drawn: int, where: str) -> Exception:
        cfg = self.cfg
        return UserError(
            f"too many unreadable images: {bad} {where} (more than max_bad_images {cfg['max_bad_images']} and "
            f"max_bad_fraction {cfg['max_bad_fraction']} of {len(self.sampler) * self.dist.world_size} drawn per "
            "epoch); fix or remove them, or raise max_bad_fraction"
        )

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"num_classes": self.cfg["num_classes"], "class_names": list(self.info["classes"])}


def _run_title(cfg: Mapping[str, Any]) -> str:
    kwargs = ", ".join(f"{k} {v}" for k, v in (cfg.get("model_kwargs") or {}).items())
    data = os.path.basename(os.path.normpath(str(cfg["data"])))
    return f"{cfg['model']}{f' ({kwargs})' if kwargs else ''} on {data}"


# ----------------------------------------------------------------------------------------------- eval command
@user_errors()
def evaluate(overrides: Optional[Mapping[str, Any]] = None,
             config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Evaluate `checkpoint` (ours, or a reference `{'model': state_dict}` file) on a validation set.

    The model, its arguments, the data and the class names default to what one of our checkpoints
    recorded; the config file and `overrides` (model, data, batch_size, img_size, crop_pct, ...) win.
    Returns top1, top5, loss, images, images_per_s, ... (None on ranks other than 0)."""
    given = EVAL.given(config_path, overrides)
    checkpoint = given.get("checkpoint")
    ckpt = load_training_checkpoint(os.fspath(checkpoint)) if checkpoint else None
    if ckpt is not None:
        require_task(ckpt, os.fspath(checkpoint), "classification", "eval")
    saved = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), Mapping) else {}
    cfg = EVAL.apply(EVAL.defaults(), {k: saved[k] for k in _EVAL_FROM_CHECKPOINT if k in saved},
                     source=f"checkpoint {checkpoint}")
    cfg = EVAL.validate(EVAL.apply(cfg, given))
    with session(cfg["device"], cfg["threads"], "eval") as dist:
        return _evaluate(cfg, dist, ckpt)


def _evaluate(cfg: Dict[str, Any], dist: DistInfo, ckpt: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    checkpoint = cfg.get("checkpoint")
    if not cfg.get("model"):
        raise UserError("eval needs --model NAME (the checkpoint does not record which model it holds)")
    check_model_name(cfg["model"])
    info = find_classification_data(cfg, need_train=False)
    class_names = (ckpt or {}).get("class_names")
    class_names = class_names if isinstance(class_names, list) else None
    if info["kind"] == "digits":
        cfg["img_size"] = cfg.get("img_size") or 32
        class_names = info["classes"]
    cfg["in_chans"] = cfg.get("in_chans") or (1 if info["kind"] == "digits" else 3)
    num_classes = cfg.get("num_classes")
    if num_classes is None and ckpt is not None:
        sd = unwrap_state_dict(ckpt)
        head = [v for k, v in sd.items() if k.endswith("weight") and k.split(".")[0] == "head" and v.dim() == 2]
        num_classes = int(head[-1].shape[0]) if head else None
    if num_classes is None:
        num_classes = len(class_names or info["classes"])
    if class_names is None:
        if len(info["classes"]) != num_classes:
            raise UserError(
                f"{info.get('val_dir', cfg['data'])} has {len(info['classes'])} class folders but the model has "
                f"{num_classes} outputs; evaluate on a folder with all {num_classes} classes (sorted folder names "
                "give the class indices)"
            )
        class_names = info["classes"]
    elif info["kind"] == "folder":
        unknown = sorted(set(info["classes"]) - set(class_names))
        if unknown:
            raise UserError(f"{info['val_dir']} has class folders the checkpoint does not know: "
                            f"{', '.join(unknown[:5])}")
    model = create_classifier(cfg, num_classes)
    source = "random initialisation"
    if ckpt is not None:
        if cfg["ema"]:
            if "model_ema" not in ckpt:
                raise UserError(f"{checkpoint} has no EMA weights (model_ema); drop --ema")
            load_checkpoint(model, {"model": ckpt["model_ema"]}, source=f"{checkpoint} (EMA)")
        else:
            load_checkpoint(model, ckpt, source=checkpoint)
        source = checkpoint + (" (EMA)" if cfg["ema"] else "")
    model.to(dist.device)
    _, val_ds = _build_datasets(cfg, info, model, train=False, class_names=class_names)
    if len(val_ds) == 0:
        raise UserError(f"no images to evaluate in {cfg['data']}")
    loader = _val_loader(val_ds, cfg, dist, cfg["batch_size"])
    figures = evaluate_model(model, loader, dist, cfg.get("amp"), cfg["progress"])
    check_bad_samples(figures["bad_images"], len(val_ds), cfg, "images", "")
    if not dist.is_main:
        return None
    return {
        "top1": round(figures["top1"], 4),
        "top5": round(figures["top5"], 4),
        "loss": round(figures["loss"], 6),
        "images": figures["images"],
        "bad_images": figures["bad_images"],
        "images_per_s": round(figures["images_per_s"], 2),
        "model": cfg["model"],
        "checkpoint": source,
        "data": str(cfg["data"]),
        "num_classes": num_classes,
        "device": str(dist.device),
    }
