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

import contextlib
import difflib
import math
import os
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .. import __version__
from ..data import (
    DIGITS_CLASSES,
    DataError,
    build_image_folder,
    build_transforms,
    check_image_folder,
    load_digits_split,
    resolve_split_dir,
)
from ..models import CheckpointMismatchError, load_checkpoint, unwrap_state_dict
from .config import ConfigTable, Key
from .device import AMP_MODES, autocast, grad_scaler, threads_key
from .distributed import DistInfo, all_reduce_sum, barrier, session
from .errors import TrainingDivergedError, UserError, user_errors
from .files import atomic_save, jsonable
from .records import LOGS, RunRecord, progress
from .rng import capture_rng_state, derive_seed, restore_rng_state, seed_everything, seed_worker
from .runs import LAST, Run, load_training_checkpoint, note, open_run

__all__ = ["TRAIN", "EVAL", "train", "evaluate", "create_classifier", "evaluate_model", "check_model_name",
           "suggest_model_names", "batch_plan", "weight_decay_groups", "ShardSampler", "loader_workers",
           "bad_image_limit"]


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
    "amp": Key(None, "mixed precision: null (fp32) | bf16 | fp16 (fp16 uses a GradScaler)", kind="str",
               choices=AMP_MODES, flag=True),
    "device": Key("auto", "auto | cpu | cuda | cuda:N (under torchrun: LOCAL_RANK's GPU)", flag=True, effect="none"),
    "seed": Key(0, "base seed (data order and augmentation depend on seed + epoch + rank)", flag=True),
    "output": Key(None, "the run folder (null: runs/<time>-<model>); a folder holding a run is refused unless "
                        "overwrite", kind="str", flag=True, effect="none"),
    "overwrite": Key(False, "move a run already in `output` aside (to <output>.old-<time>) and start anew", flag=True,
                     effect="once"),
    "resume": Key(None, "continue the run in this folder (or its last.pth) with its own config", kind="str",
                  flag=True, effect="once"),
    "eval_every": Key(1, "validate every N epochs (and always after the last)", positive=True),
    "progress": Key(True, "show a progress bar (rank 0)", flag=True, effect="none"),
    "log": Key("csv", "also keep the per-epoch figures as metrics.csv (csv) or TensorBoard events in "
                      "<run>/tensorboard (tensorboard; pip install tensorboard); null: metrics.jsonl only",
               nullable=True, choices=LOGS, flag=True, effect="none"),
    "threads": threads_key(),
    "allow_config_change": Key(False, "resume although result-changing keys differ (the model must match)",
                               effect="once"),
    "stop_after_epochs": Key(None, "stop after this many epochs of this invocation (for tests and job limits)",
                             kind="int", positive=True, flag=True, effect="once"),
    # test hooks (not for normal use)
    "debug_nan_step": Key(None, "test hook: make the loss NaN at this (0-based) global step", kind="int",
                          hidden=True),
    "debug_dump_rank_state": Key(False, "test hook: every rank saves its weights to <output>/rank<r>_state.pth",
                                 hidden=True, effect="once"),
}, check=_check_train)

#: `lbmamba eval`: the data and model keys of training, with nothing chosen (a checkpoint of ours says)
EVAL = TRAIN.derive(
    "eval",
    ["model", "model_kwargs", "img_size", "in_chans", "num_classes", "data", "val_split", "val_fraction", "batch_size",
     "workers", "max_bad_fraction", "max_bad_images", "crop_pct", "interpolation", "amp", "device", "threads",
     "progress"],
    changes={"model": dict(default=None), "model_kwargs": dict(default={}), "img_size": dict(default=None),
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


# ----------------------------------------------------------------------------------------------- models
def suggest_model_names(name: str, n: int = 3) -> List[str]:
    import timm

    family = timm.list_models("*vim*") + timm.list_models("*mamba*")
    close = difflib.get_close_matches(name, family, n=n, cutoff=0.5)
    if len(close) < n:
        close += [m for m in difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6) if m not in close]
    return close[:n]


def check_model_name(name: Optional[str]) -> str:
    """`name` when timm knows it; UserError with suggestions otherwise."""
    import timm

    if not name:
        raise UserError("no model given (set --model NAME)")
    if not timm.is_model(name):
        close = suggest_model_names(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vim*')"
        raise UserError(f"unknown model {name!r}{hint}")
    return name


def create_classifier(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """timm.create_model(cfg['model'], num_classes, in_chans, img_size, drop_path_rate, **model_kwargs)."""
    import timm

    name = check_model_name(cfg.get("model"))
    kwargs = dict(cfg.get("model_kwargs") or {})
    kwargs["num_classes"] = num_classes
    kwargs.setdefault("in_chans", cfg.get("in_chans") or 3)
    if cfg.get("drop_path"):
        kwargs.setdefault("drop_path_rate", cfg["drop_path"])
    if cfg.get("img_size"):
        kwargs.setdefault("img_size", cfg["img_size"])
    try:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            if "img_size" in str(exc) and "img_size" not in (cfg.get("model_kwargs") or {}):
                kwargs.pop("img_size")  # a model without a fixed input size (CNNs)
                return timm.create_model(name, pretrained=False, **kwargs)
            raise
    except TypeError as exc:
        raise UserError(f"model {name!r} does not accept these arguments ({exc}); check model_kwargs") from exc
    except ValueError as exc:
        raise UserError(f"model {name!r}: {exc}") from exc


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... (no padding: evaluation figures stay exact under DDP)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------------------------- data
def _data_classes(cfg: Mapping[str, Any], need_train: bool = True) -> Dict[str, Any]:
    """Where the data is and which classes it has (no images read yet)."""
    data = cfg.get("data")
    if data is None:
        raise UserError("no data given (set --data DIR, an ImageFolder root, or --data digits)")
    if str(data).lower() == "digits":
        return {"kind": "digits", "classes": list(DIGITS_CLASSES)}
    root = os.path.expanduser(str(data))
    if not os.path.exists(root):
        raise DataError(f"data directory not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"data must be a directory (ImageFolder layout with train/ and val/), got a file: {root}")
    info: Dict[str, Any] = {"kind": "folder", "root": root}
    val_dir = resolve_split_dir(root, cfg["val_split"])
    if need_train:
        train_dir = os.path.join(root, cfg["train_split"])
        if not os.path.isdir(train_dir) or val_dir == root:
            missing = [p for p in (train_dir, os.path.join(root, cfg["val_split"])) if not os.path.isdir(p)]
            raise DataError(
                f"expected {root}/{cfg['train_split']}/<class>/* and {root}/{cfg['val_split']}/<class>/* "
                f"(missing: {', '.join(missing)})"
            )
        info["train_dir"] = train_dir
        info["classes"] = check_image_folder(train_dir, cfg["train_split"])
    val_classes = check_image_folder(val_dir, cfg["val_split"])
    info.setdefault("classes", val_classes)
    info["val_dir"] = val_dir
    unknown = sorted(set(val_classes) - set(info["classes"]))
    if unknown:
        raise DataError(f"{val_dir} has class folders that {info.get('train_dir', 'the model')} lacks: "
                        f"{', '.join(unknown[:5])}")
    return info


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


def loader_workers(cfg: Mapping[str, Any], dist: DistInfo, in_process: bool = False) -> int:
    """workers, or when null: 0 for small data read in this process (the digits), else min(8, cores per
    local process)."""
    if cfg.get("workers") is not None:
        return cfg["workers"]
    if in_process or str(cfg.get("data")).lower() == "digits":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(dist.local_world_size, 1)))


def _val_loader(ds: Dataset, cfg: Mapping[str, Any], dist: DistInfo, batch_size: int) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, sampler=ShardSampler(len(ds), dist.rank, dist.world_size),
        num_workers=loader_workers(cfg, dist), pin_memory=dist.device.type == "cuda", drop_last=False,
        worker_init_fn=seed_worker,
    )


def bad_image_limit(cfg: Mapping[str, Any], total: float) -> float:
    """Unreadable images tolerated among `total`: a count or a fraction, whichever is larger."""
    return max(cfg["max_bad_images"], cfg["max_bad_fraction"] * total)


def _check_bad_images(bad: int, total: int, cfg: Mapping[str, Any], what: str) -> None:
    if bad > bad_image_limit(cfg, total):
        raise UserError(
            f"too many unreadable images{what}: {bad} of {total} (more than max_bad_images {cfg['max_bad_images']} "
            f"and max_bad_fraction {cfg['max_bad_fraction']}); fix or remove them, or raise max_bad_fraction"
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
def batch_plan(cfg: Mapping[str, Any], world_size: int) -> Tuple[int, int, float]:
    """(grad_accum, global batch, peak lr) for `world_size` processes."""
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


def weight_decay_groups(model: nn.Module, weight_decay: float, no_decay_ssm: bool = False) -> List[Dict[str, Any]]:
    """The optimizer's parameter groups, by the reference code's rule (timm's `add_weight_decay`): no decay
    for 1-d parameters, biases and the model's `no_weight_decay()` names (pos_embed, cls_token). The SSM
    matrices A_log / A_b_log are 2-d and so decayed, as in the reference; `no_decay_ssm` exempts them too."""
    from timm.optim import param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if not no_decay_ssm:
        ssm = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False) and p.ndim > 1}
        skip -= ssm
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


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


def _run_name(cfg: Mapping[str, Any]) -> str:
    return str(cfg["model"])


def _prepare_train(cfg: Dict[str, Any], info: Dict[str, Any]) -> Dict[str, Any]:
    """Check the model and the data (found into `info`), and fill in what the data decides, before the run
    folder exists."""
    check_model_name(cfg["model"])
    info.update(_data_classes(cfg))
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
    with open_run(TRAIN, overrides, config_path, _run_name, lambda cfg: _prepare_train(cfg, info)) as run:
        return _train(run, info)


def _train(run: Run, info: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, dispatch_clip_grad
    from torch.utils.data.distributed import DistributedSampler

    cfg, dist, device = run.cfg, run.dist, run.dist.device
    wall_start = time.perf_counter()
    class_names = info["classes"]
    num_classes = cfg["num_classes"]
    ckpt = run.checkpoint
    if ckpt is not None and int(ckpt["epoch"]) >= cfg["epochs"]:
        saved = run.saved_summary()
        if saved is not None:  # else: evaluate and write the summary the run did not get to write
            if dist.is_main:
                note(f"lbmamba train: the run in {run.dir} already finished ({ckpt['epoch']} of {cfg['epochs']} "
                     "epochs); nothing to do")
            return saved if dist.is_main else None

    seed_everything(cfg["seed"])  # identical initial weights on every rank
    model = create_classifier(cfg, num_classes)
    if cfg.get("init_checkpoint") and ckpt is None:
        _load_initial_weights(model, cfg)
    if cfg["grad_checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError(f"model {cfg['model']} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())

    train_ds, val_ds = _build_datasets(cfg, info, model, train=True, class_names=class_names)
    accum, global_batch, lr = batch_plan(cfg, dist.world_size)
    batch = cfg["batch_size"]
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and batch % 2:
        raise UserError(f"mixup / cutmix need an even batch_size, got {batch}")
    generator = torch.Generator()  # reseeded every epoch: the data order of an epoch depends on (seed, epoch)
    if cfg["repeated_aug"] and dist.distributed:
        sampler = RepeatAugSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                   num_repeats=cfg["num_repeats"])
    elif cfg["repeated_aug"]:  # the reference repeats augmentations across processes only; one process shuffles
        sampler = RandomSampler(train_ds, generator=generator)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=cfg["seed"], drop_last=False)
    train_loader = DataLoader(
        train_ds, batch_size=batch, sampler=sampler, num_workers=loader_workers(cfg, dist),
        pin_memory=device.type == "cuda",
        drop_last=True, generator=generator, worker_init_fn=seed_worker, persistent_workers=False,
    )
    val_loader = _val_loader(val_ds, cfg, dist, batch * 2)
    updates_per_epoch = len(train_loader) // accum
    if updates_per_epoch == 0:
        raise UserError(
            f"the training set ({len(train_ds)} images, {len(sampler)} per process) is smaller than one step "
            f"(batch_size {batch} x grad_accum {accum}); lower batch_size"
        )

    groups = weight_decay_groups(model, cfg["weight_decay"], cfg["no_decay_ssm"])
    optimizer = create_optimizer_v2(groups, opt=cfg["opt"], lr=lr, weight_decay=cfg["weight_decay"],
                                    momentum=cfg["momentum"], eps=cfg["opt_eps"])
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg["sched"], num_epochs=cfg["epochs"], warmup_epochs=cfg["warmup_epochs"],
        warmup_lr=cfg["warmup_lr"], min_lr=cfg["min_lr"], step_on_epochs=not cfg["sched_on_updates"],
        updates_per_epoch=updates_per_epoch,
    )
    ema = ModelEmaV3(model, decay=cfg["model_ema_decay"]) if cfg["model_ema"] else None
    scaler = grad_scaler(device, cfg["amp"])
    mixup_fn, loss_fn = _loss_functions(cfg, num_classes)

    start_epoch, best_top1, best_epoch = 0, -1.0, -1
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["model_ema"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        best_top1 = float(ckpt.get("best_top1", -1.0))
        best_epoch = int(ckpt.get("best_epoch", -1))
        restore_rng_state(ckpt.get("rng"))
        run.checkpoint = ckpt = None  # the weights are in the model now

    last_path, best_path = run.path(LAST), run.path("best.pth")
    record = RunRecord(run.dir, _CURVES, _run_title(cfg), shown=_SHOWN, enabled=dist.is_main, log=cfg["log"],
                       keep=(lambda r: r.get("epoch", 0) <= start_epoch) if run.resumed else None)
    if dist.is_main:
        note(
            f"lbmamba train: {cfg['model']} ({params / 1e6:.2f} M params, {num_classes} classes) on "
            f"{info.get('root', 'digits')}: {len(train_ds)} train / {len(val_ds)} val images; {dist.world_size} "
            f"process(es) on {device.type}; global batch {global_batch} (batch {batch} x {dist.world_size} x accum "
            f"{accum}), lr {lr:.3g}; "
            + (f"resuming at epoch {start_epoch + 1} in {run.dir}" if start_epoch else f"output {run.dir}")
        )

    ddp_model = model
    if dist.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    num_updates = start_epoch * updates_per_epoch
    last_val: Dict[str, float] = {}
    last_val_ema: Dict[str, float] = {}
    train_loss, train_images_per_s, total_bad, epochs_run, stopped_early = float("nan"), 0.0, 0, 0, False
    for epoch in range(start_epoch, cfg["epochs"]):
        seed_everything(cfg["seed"], epoch + 1, dist.rank)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch + cfg["seed"] * 100_003 if cfg["repeated_aug"] else epoch)
        generator.manual_seed(derive_seed(cfg["seed"], epoch, dist.rank, 1))
        epoch_start = time.perf_counter()
        stats, num_updates = _train_one_epoch(
            cfg, dist, model, ddp_model, train_loader, optimizer, scheduler, loss_fn, mixup_fn, ema, scaler,
            dispatch_clip_grad, epoch, accum, updates_per_epoch, num_updates, len(sampler),
        )
        scheduler.step(epoch)  # as the reference loops do after each epoch: epoch e + 1 runs at the lr of e
        train_seconds = time.perf_counter() - epoch_start
        train_loss = stats["loss"]
        total_bad += stats["bad_images"]
        train_images_per_s = stats["images"] / max(train_seconds, 1e-9)
        row: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_top1": stats.get("top1"),
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": train_images_per_s,
            "bad_images": stats["bad_images"],
        }
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            last_val = evaluate_model(model, val_loader, dist, cfg["amp"], cfg["progress"], desc=f"val {epoch + 1}")
            _check_bad_images(last_val["bad_images"], len(val_ds), cfg, " in the validation set")
            row.update(val_loss=last_val["loss"], val_top1=last_val["top1"], val_top5=last_val["top5"])
            if ema is not None:
                last_val_ema = evaluate_model(ema.module, val_loader, dist, cfg["amp"], cfg["progress"], desc="val ema")
                row.update(val_top1_ema=last_val_ema["top1"], val_top5_ema=last_val_ema["top5"])
        row["epoch_seconds"] = time.perf_counter() - epoch_start
        is_best = "val_top1" in row and row["val_top1"] > best_top1
        if is_best:
            best_top1, best_epoch = row["val_top1"], epoch + 1
        epochs_run += 1

        if dist.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "rng": capture_rng_state(),
                "config": jsonable(cfg),
                "num_classes": num_classes,
                "class_names": list(class_names),
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
                "lbmamba_version": __version__,
            }
            if ema is not None:
                state["model_ema"] = ema.module.state_dict()
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            atomic_save(state, last_path)
            if is_best:
                atomic_save(state, best_path)
            del state
            record.add(row)
        barrier(dist)
        if cfg.get("stop_after_epochs") and epochs_run >= cfg["stop_after_epochs"] and epoch + 1 < cfg["epochs"]:
            stopped_early = True
            break

    if cfg.get("debug_dump_rank_state"):
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   os.path.join(run.dir, f"rank{dist.rank}_state.pth"))
        barrier(dist)
    if not last_val:  # stopped before an epoch that validates (every rank takes part)
        last_val = evaluate_model(model, val_loader, dist, cfg["amp"])
    if not dist.is_main:
        return None
    result: Dict[str, Any] = {
        "val_top1": round(last_val["top1"], 4),
        "val_top5": round(last_val["top5"], 4),
        "val_loss": round(last_val["loss"], 6),
        "best_val_top1": round(max(best_top1, last_val["top1"]), 4),
        "best_epoch": best_epoch,
        "epochs": start_epoch + epochs_run,
        "train_loss": None if math.isnan(train_loss) else round(train_loss, 6),
        "train_images_per_s": round(train_images_per_s, 2),
        "model": cfg["model"],
        "params": params,
        "data": str(cfg["data"]),
        "world_size": dist.world_size,
        "global_batch_size": global_batch,
        "bad_images": total_bad,
        "wall_s": round(time.perf_counter() - wall_start, 2),
        "checkpoint": best_path if os.path.isfile(best_path) else last_path,
        "last_checkpoint": last_path,
        "metrics": record.metrics_path,
        "plot": record.plot_path,
        "output": run.dir,
    }
    if last_val_ema:
        result["val_top1_ema"] = round(last_val_ema["top1"], 4)
    if stopped_early:
        result["stopped_early"] = True
    else:
        record.finish(result)
    return result


def _load_initial_weights(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """init_checkpoint into the new model: all of it, or (init_partial) what fits, saying what did not."""
    try:
        with warnings.catch_warnings():  # a partial load is reported below, in a few lines
            warnings.simplefilter("ignore")
            result = load_checkpoint(model, cfg["init_checkpoint"], strict=not cfg["init_partial"])
    except CheckpointMismatchError as exc:
        raise UserError(f"init_checkpoint: {exc}; set init_partial=true to load only what fits") from exc
    if not result.ok:
        kept = result.missing_keys + [k for k, _, _ in result.mismatched_keys]

        def some(keys):
            return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")

        note(f"init_checkpoint: {len(model.state_dict()) - len(kept)} of {len(model.state_dict())} model tensors "
             f"loaded from {cfg['init_checkpoint']}; {len(kept)} keep their initialisation ({some(kept)}), "
             f"{len(result.unexpected_keys)} checkpoint tensors unused ({some(result.unexpected_keys)})")


def _run_title(cfg: Mapping[str, Any]) -> str:
    kwargs = ", ".join(f"{k} {v}" for k, v in (cfg.get("model_kwargs") or {}).items())
    data = os.path.basename(os.path.normpath(str(cfg["data"])))
    return f"{cfg['model']}{f' ({kwargs})' if kwargs else ''} on {data}"


def _train_one_epoch(cfg, dist, model, ddp_model, loader, optimizer, scheduler, loss_fn, mixup_fn, ema, scaler,
                     clip_fn, epoch, accum, updates_per_epoch, num_updates, samples_per_epoch):
    device = dist.device
    model.train()
    steps = updates_per_epoch * accum
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, images, bad, correct
    max_bad = bad_image_limit(cfg, samples_per_epoch * dist.world_size)
    nan_step = cfg.get("debug_nan_step")
    optimizer.zero_grad(set_to_none=True)
    show = cfg["progress"] and dist.is_main
    with progress(total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", enabled=show) as bar:
        for step, (images, targets, bad) in enumerate(loader):
            if step >= steps:
                break
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            hard_targets = targets
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            is_update = (step + 1) % accum == 0
            sync = ddp_model.no_sync() if (dist.distributed and not is_update) else contextlib.nullcontext()
            with sync:
                with autocast(device, cfg["amp"]):
                    logits = ddp_model(images)
                    loss = loss_fn(logits, targets)
                global_step = epoch * steps + step
                if nan_step is not None and global_step == nan_step:
                    loss = loss * float("nan")
                scaler.scale(loss / accum).backward()
            if mixup_fn is None:
                correct = (logits.detach().argmax(-1) == hard_targets).sum()
            else:  # soft targets: no accuracy
                correct = torch.zeros((), device=device)
            step_stats = torch.stack([
                loss.detach().float() * images.shape[0],
                torch.tensor(float(images.shape[0]), device=device),
                bad.to(device).sum().float(),
                correct.float(),
            ]).double()
            all_reduce_sum(step_stats, dist)  # every rank sees the same figures (and stops together on NaN)
            step_stats = step_stats.cpu()
            if not math.isfinite(step_stats[0].item()):
                raise TrainingDivergedError(
                    f"the training loss became {'NaN' if math.isnan(step_stats[0].item()) else 'infinite'} at epoch "
                    f"{epoch + 1}, step {step + 1} (global step {global_step}); stopped, the last good checkpoint is "
                    "untouched. Lower lr, add clip_grad, or use amp=bf16 instead of fp16"
                )
            totals += step_stats
            if totals[2].item() > max_bad:
                raise UserError(
                    f"too many unreadable images: {int(totals[2].item())} in epoch {epoch + 1} (more than "
                    f"max_bad_images {cfg['max_bad_images']} and max_bad_fraction {cfg['max_bad_fraction']} of "
                    f"{samples_per_epoch * dist.world_size} drawn per epoch); fix or remove them, or raise "
                    "max_bad_fraction"
                )
            if is_update:
                if cfg.get("clip_grad"):
                    scaler.unscale_(optimizer)
                    clip_fn(model.parameters(), value=cfg["clip_grad"], mode=cfg["clip_mode"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                if ema is not None:
                    ema.update(model, step=num_updates)
                scheduler.step_update(num_updates=num_updates)
            bar.update(1)
            if step % 10 == 0 or step + 1 == steps:
                bar.set_postfix(loss=f"{step_stats[0].item() / max(step_stats[1].item(), 1):.4f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    loss_sum, images, bad, correct = totals.tolist()
    out = {"loss": loss_sum / max(images, 1), "images": images, "bad_images": int(bad)}
    if mixup_fn is None:
        out["top1"] = 100.0 * correct / max(images, 1)
    return out, num_updates


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
    info = _data_classes(cfg, need_train=False)
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
    _check_bad_images(figures["bad_images"], len(val_ds), cfg, "")
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
