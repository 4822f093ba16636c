"""Image classification: `train(cfg)` and `evaluate(...)`, single process or under torchrun (DDP).

The pieces come from timm (create_model, create_optimizer_v2, create_scheduler_v2, Mixup,
SoftTargetCrossEntropy, LabelSmoothingCrossEntropy, RepeatAugSampler, ModelEmaV3, create_transform);
this module wires them into a loop with the things a long run needs:

* determinism: data order, augmentation and stochastic depth are seeded from (seed, epoch, rank) at the
  start of every epoch, and a checkpoint stores every RNG state, so a run killed and resumed from
  `last.pth` ends with the same weights as one that never stopped;
* atomic `last.pth` / `best.pth` every epoch (rank 0), a config fingerprint in each, refused resumes
  from another model / config;
* the loss is checked every step on every rank: NaN / inf stops the run before any checkpoint is
  touched;
* unreadable images are skipped and counted; more than `max_bad_fraction` stops the run;
* `metrics.jsonl` (one line per epoch), `curves.png`, `config.yaml` and `summary.json` in the output dir.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import math
import os
import random
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import DataError
from .checkpointing import atomic_save, capture_rng_state, check_fingerprint, load_training_checkpoint, restore_rng_state
from .config import DEFAULTS, apply_overrides, config_fingerprint, load_config
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, cleanup_distributed, init_distributed
from .errors import TrainingDivergedError, UserError
from .plots import plot_training_curves

__all__ = ["train", "evaluate", "create_classifier", "evaluate_model", "suggest_model_names"]


# ----------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _user_errors():
    """Re-raise data problems (also those raised inside DataLoader workers) as UserError."""
    try:
        yield
    except DataError as exc:
        raise UserError(_last_line(str(exc))) from exc


def _last_line(message: str) -> str:
    """The error message proper, also when a DataLoader worker wrapped it in its traceback."""
    if "Traceback" not in message:
        return message
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else message
    return last.split(": ", 1)[1] if last.split(":", 1)[0].endswith("Error") and ": " in last else last


def suggest_model_names(name: str, n: int = 3) -> List[str]:
    import timm

    family = timm.list_models("*vim*") + timm.list_models("*mamba*")
    close = difflib.get_close_matches(name, family, n=n, cutoff=0.5)
    if len(close) < n:
        close += [m for m in difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6) if m not in close]
    return close[:n]


def _check_model_name(name: Optional[str]) -> str:
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

    name = _check_model_name(cfg.get("model"))
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


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class _ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... (no padding: evaluation figures stay exact under DDP)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _autocast(device: torch.device, amp: Optional[str]):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _make_scaler(device: torch.device, amp: Optional[str]):
    enabled = amp == "fp16"
    try:
        return torch.amp.GradScaler(device.type, enabled=enabled)
    except (AttributeError, TypeError):  # pragma: no cover - old torch
        return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


# ----------------------------------------------------------------------------------------------- data
def _data_classes(cfg: Mapping[str, Any], need_train: bool = True) -> Dict[str, Any]:
    """Where the data is and which classes it has (no images read yet)."""
    from ..data import DIGITS_CLASSES, check_image_folder, resolve_split_dir

    data = cfg.get("data")
    if data is None:
        raise UserError("no data given (set --data DIR, an ImageFolder root, or --data digits)")
    if str(data).lower() == "digits":
        return {"kind": "digits", "classes": list(DIGITS_CLASSES)}
    root = os.path.expanduser(str(data))
    with _user_errors():
        if not os.path.exists(root):
            raise DataError(f"data directory not found: {root}")
        if not os.path.isdir(root):
            raise DataError(f"data must be a directory (ImageFolder layout with train/ and val/), got a file: {root}")
        info: Dict[str, Any] = {"kind": "folder", "root": root}
        if need_train:
            train_dir = os.path.join(root, cfg["train_split"])
            val_dir = resolve_split_dir(root, cfg["val_split"])
            if not os.path.isdir(train_dir) or val_dir == root:
                missing = [p for p in (train_dir, os.path.join(root, cfg["val_split"])) if not os.path.isdir(p)]
                raise DataError(
                    f"expected {root}/{cfg['train_split']}/<class>/* and {root}/{cfg['val_split']}/<class>/* "
                    f"(missing: {', '.join(missing)})"
                )
            info["train_dir"] = train_dir
            info["classes"] = check_image_folder(train_dir, cfg["train_split"])
        else:
            val_dir = resolve_split_dir(root, cfg["val_split"])
            info["classes"] = check_image_folder(val_dir, cfg["val_split"])
        info["val_dir"] = val_dir
        val_classes = check_image_folder(val_dir, cfg["val_split"])
        unknown = sorted(set(val_classes) - set(info["classes"]))
        if unknown:
            raise DataError(f"{val_dir} has class folders that {info.get('train_dir', 'the model')} lacks: {', '.join(unknown[:5])}")
    return info


def _build_datasets(cfg: Mapping[str, Any], info: Mapping[str, Any], model: nn.Module, train: bool = True,
                    class_names: Optional[List[str]] = None) -> Tuple[Optional[Dataset], Dataset]:
    from ..data import build_image_folder, build_transforms, load_digits_split

    if info["kind"] == "digits":
        train_ds, val_ds = load_digits_split(
            img_size=cfg.get("img_size") or 32, val_fraction=cfg["val_fraction"], shift=cfg["digits_shift"],
            in_chans=cfg.get("in_chans") or 1,
        )
        return (train_ds if train else None), val_ds
    names = class_names or info["classes"]
    class_to_idx = {c: i for i, c in enumerate(names)}
    mode = "L" if (cfg.get("in_chans") or 3) == 1 else "RGB"
    with _user_errors():
        train_ds = None
        if train:
            train_ds = build_image_folder(info["train_dir"], build_transforms(cfg, model, True), class_to_idx, mode,
                                          split=cfg["train_split"])
        val_ds = build_image_folder(info["val_dir"], build_transforms(cfg, model, False), class_to_idx, mode,
                                    split=cfg["val_split"])
    return train_ds, val_ds


def _workers(cfg: Mapping[str, Any], dist: DistInfo) -> int:
    """workers, or when null: 0 for the in-memory digits, else min(8, cores per local process)."""
    if cfg.get("workers") is not None:
        return cfg["workers"]
    if str(cfg.get("data")).lower() == "digits":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(dist.local_world_size, 1)))


def _val_loader(ds: Dataset, cfg: Mapping[str, Any], dist: DistInfo, batch_size: int) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, sampler=_ShardSampler(len(ds), dist.rank, dist.world_size),
        num_workers=_workers(cfg, dist), pin_memory=dist.device.type == "cuda", drop_last=False,
        worker_init_fn=_seed_worker,
    )


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, dist: DistInfo, amp: Optional[str] = None,
                   progress: bool = False, desc: str = "eval") -> Dict[str, float]:
    """Cross-entropy loss, top-1, top-5 (%) and images/s over `loader` (summed over ranks).

    Samples flagged as unreadable-image substitutes are left out of the figures (and counted)."""
    device = dist.device
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top1, top5, count, bad
    start = time.perf_counter()
    iterator = loader
    if progress and dist.is_main:
        from tqdm import tqdm

        iterator = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    with _user_errors():
        for images, targets, bad in iterator:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            keep = (bad == 0).to(device)
            with _autocast(device, amp):
                logits = model(images)
            logits = logits.float()[keep]
            targets = targets[keep]
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            hit = top == targets[:, None]
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
def _batch_plan(cfg: Mapping[str, Any], dist: DistInfo) -> Tuple[int, int, float]:
    """(grad_accum, global batch, peak lr)."""
    batch = cfg["batch_size"]
    if cfg.get("global_batch_size"):
        per_step = batch * dist.world_size
        if cfg["global_batch_size"] % per_step:
            raise UserError(
                f"global_batch_size {cfg['global_batch_size']} is not a multiple of batch_size x world size "
                f"({batch} x {dist.world_size} = {per_step}); change batch_size or the number of processes"
            )
        accum = cfg["global_batch_size"] // per_step
    else:
        accum = cfg["grad_accum"]
    global_batch = batch * dist.world_size * accum
    lr = cfg["lr"] if cfg.get("lr") else cfg["base_lr"] * global_batch / cfg["lr_base_size"]
    return accum, global_batch, lr


def _make_output_dir(cfg: Mapping[str, Any], dist: DistInfo) -> str:
    out = cfg.get("output")
    if not out and cfg.get("resume"):
        out = os.path.dirname(os.path.abspath(cfg["resume"]))
    if not out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"{stamp}-{cfg['model']}")
    out = broadcast_object(os.path.abspath(out), dist)
    if dist.is_main:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the output directory {out}: {exc.strerror}") from exc
    barrier(dist)
    return out


def _read_metrics(path: str, up_to_epoch: int) -> List[Dict[str, Any]]:
    records = []
    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("epoch", 0) <= up_to_epoch:
                    records.append(rec)
    return records


def _write_metrics(path: str, records: List[Dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """Config values as plain Python (for torch.save weights_only and YAML)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _loss_functions(cfg: Mapping[str, Any], num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
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


def train(cfg: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Train an image classifier as `cfg` says (see `lbmamba.engine.config.DEFAULTS`).

    Returns the final figures on rank 0 (None on other ranks): val_top1, val_top5, val_loss,
    best_val_top1, best_epoch, epochs, train_loss, checkpoint (best.pth), last_checkpoint, output, ...
    """
    cfg = load_config(overrides=dict(cfg)) if cfg is not None else load_config()
    dist = init_distributed(cfg["device"], cfg.get("threads"))
    try:
        return _train(cfg, dist)
    finally:
        cleanup_distributed(dist)


def _train(cfg: Dict[str, Any], dist: DistInfo) -> Optional[Dict[str, Any]]:
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, dispatch_clip_grad
    from torch.utils.data.distributed import DistributedSampler

    device = dist.device
    wall_start = time.perf_counter()
    _check_model_name(cfg["model"])
    info = _data_classes(cfg)
    class_names = info["classes"]
    num_classes = len(class_names)
    if cfg.get("num_classes") and cfg["num_classes"] != num_classes:
        raise UserError(f"num_classes is {cfg['num_classes']} but the data has {num_classes} classes")
    cfg["num_classes"] = num_classes
    if info["kind"] == "digits":
        cfg["img_size"] = cfg.get("img_size") or 32
    cfg["in_chans"] = cfg.get("in_chans") or (1 if info["kind"] == "digits" else 3)

    _seed_everything(cfg["seed"], 0, 0)  # identical initial weights on every rank
    model = create_classifier(cfg, num_classes)
    if cfg.get("init_checkpoint"):
        from ..models import load_checkpoint

        if not os.path.isfile(cfg["init_checkpoint"]):
            raise UserError(f"init_checkpoint not found: {cfg['init_checkpoint']}")
        load_checkpoint(model, cfg["init_checkpoint"], strict=False)
    if cfg["grad_checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError(f"model {cfg['model']} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())

    train_ds, val_ds = _build_datasets(cfg, info, model, train=True, class_names=class_names)
    accum, global_batch, lr = _batch_plan(cfg, dist)
    batch = cfg["batch_size"]
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and batch % 2:
        raise UserError(f"mixup / cutmix need an even batch_size, got {batch}")
    if cfg["repeated_aug"]:
        sampler = RepeatAugSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                   num_repeats=cfg["num_repeats"])
    else:
        sampler = DistributedSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=cfg["seed"], drop_last=False)
    generator = torch.Generator()
    train_loader = DataLoader(
        train_ds, batch_size=batch, sampler=sampler, num_workers=_workers(cfg, dist), pin_memory=device.type == "cuda",
        drop_last=True, generator=generator, worker_init_fn=_seed_worker, persistent_workers=False,
    )
    val_loader = _val_loader(val_ds, cfg, dist, batch * 2)
    updates_per_epoch = len(train_loader) // accum
    if updates_per_epoch == 0:
        raise UserError(
            f"the training set ({len(train_ds)} images, {len(sampler)} per process) is smaller than one step "
            f"(batch_size {batch} x grad_accum {accum}); lower batch_size"
        )

    optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=lr, weight_decay=cfg["weight_decay"],
                                    momentum=cfg["momentum"], eps=cfg["opt_eps"])
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg["sched"], num_epochs=cfg["epochs"], warmup_epochs=cfg["warmup_epochs"],
        warmup_lr=cfg["warmup_lr"], min_lr=cfg["min_lr"], step_on_epochs=not cfg["sched_on_updates"],
        updates_per_epoch=updates_per_epoch,
    )
    ema = ModelEmaV3(model, decay=cfg["model_ema_decay"]) if cfg["model_ema"] else None
    scaler = _make_scaler(device, cfg["amp"])
    mixup_fn, loss_fn = _loss_functions(cfg, num_classes)

    fingerprint = config_fingerprint(cfg)
    start_epoch, best_top1, best_epoch = 0, -1.0, -1
    if cfg.get("resume"):
        ckpt = load_training_checkpoint(cfg["resume"])
        check_fingerprint(ckpt, fingerprint, cfg["resume"], cfg["allow_config_change"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if "model_ema" not in ckpt:
                raise UserError(f"cannot resume from {cfg['resume']}: model_ema is on but the checkpoint has no EMA weights")
            ema.module.load_state_dict(ckpt["model_ema"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        best_top1 = float(ckpt.get("best_top1", -1.0))
        best_epoch = int(ckpt.get("best_epoch", -1))
        restore_rng_state(ckpt.get("rng"))
        del ckpt

    output = _make_output_dir(cfg, dist)
    last_path, best_path = os.path.join(output, "last.pth"), os.path.join(output, "best.pth")
    metrics_path, plot_path = os.path.join(output, "metrics.jsonl"), os.path.join(output, "curves.png")
    records: List[Dict[str, Any]] = []
    if dist.is_main:
        records = _read_metrics(metrics_path, start_epoch) if cfg.get("resume") else []
        _write_metrics(metrics_path, records)
        import yaml

        with open(os.path.join(output, "config.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(_plain(cfg), handle, sort_keys=False)
        print(
            f"lbmamba train: {cfg['model']} ({params / 1e6:.2f} M params, {num_classes} classes) on "
            f"{info.get('root', 'digits')}: {len(train_ds)} train / {len(val_ds)} val images; {dist.world_size} "
            f"process(es) on {device.type}; global batch {global_batch} (batch {batch} x {dist.world_size} x accum "
            f"{accum}), lr {lr:.3g}; output {output}",
            file=sys.stderr, flush=True,
        )

    ddp_model = model
    if dist.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    num_updates = start_epoch * updates_per_epoch
    last_val: Dict[str, float] = {}
    last_val_ema: Dict[str, float] = {}
    train_loss = float("nan")
    epochs_run = 0
    stopped_early = False
    epoch = start_epoch
    total_bad = 0
    train_images_per_s = 0.0
    for epoch in range(start_epoch, cfg["epochs"]):
        _seed_everything(cfg["seed"], epoch + 1, dist.rank)
        sampler.set_epoch(epoch + cfg["seed"] * 100_003 if cfg["repeated_aug"] else epoch)
        generator.manual_seed((cfg["seed"] * 1_000_003 + epoch * 7_919 + dist.rank) % (2**63 - 1))
        epoch_start = time.perf_counter()
        stats, num_updates = _train_one_epoch(
            cfg, dist, model, ddp_model, train_loader, optimizer, scheduler, loss_fn, mixup_fn, ema, scaler,
            dispatch_clip_grad, epoch, accum, updates_per_epoch, num_updates, len(sampler),
        )
        scheduler.step(epoch + 1)
        train_seconds = time.perf_counter() - epoch_start
        train_loss = stats["loss"]
        total_bad += stats["bad_images"]
        train_images_per_s = stats["images"] / max(train_seconds, 1e-9)
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_top1": stats.get("top1"),
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": train_images_per_s,
            "bad_images": stats["bad_images"],
        }
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            last_val = evaluate_model(model, val_loader, dist, cfg["amp"], cfg["progress"], desc=f"val {epoch + 1}")
            if last_val["bad_images"] > cfg["max_bad_fraction"] * len(val_ds):
                raise UserError(
                    f"too many unreadable images in the validation set: {last_val['bad_images']} of {len(val_ds)} "
                    f"(more than max_bad_fraction {cfg['max_bad_fraction']}); fix or remove them, or raise max_bad_fraction"
                )
            record.update(val_loss=last_val["loss"], val_top1=last_val["top1"], val_top5=last_val["top5"])
            if ema is not None:
                last_val_ema = evaluate_model(ema.module, val_loader, dist, cfg["amp"], cfg["progress"], desc="val ema")
                record.update(val_top1_ema=last_val_ema["top1"], val_top5_ema=last_val_ema["top5"])
        record["epoch_seconds"] = time.perf_counter() - epoch_start
        is_best = "val_top1" in record and record["val_top1"] > best_top1
        if is_best:
            best_top1, best_epoch = record["val_top1"], epoch + 1
        epochs_run += 1

        if dist.is_main:
            records.append({k: v for k, v in record.items() if v is not None})
            _write_metrics(metrics_path, records)
            ckpt = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "rng": capture_rng_state(),
                "fingerprint": fingerprint,
                "config": _plain(cfg),
                "model_name": cfg["model"],
                "model_kwargs": _plain(cfg.get("model_kwargs") or {}),
                "num_classes": num_classes,
                "class_names": list(class_names),
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "metrics": {k: v for k, v in record.items() if isinstance(v, (int, float))},
                "lbmamba_version": _version(),
            }
            if ema is not None:
                ckpt["model_ema"] = ema.module.state_dict()
            if scaler.is_enabled():
                ckpt["scaler"] = scaler.state_dict()
            atomic_save(ckpt, last_path)
            if is_best:
                atomic_save(ckpt, best_path)
            del ckpt
            try:
                plot_training_curves(records, plot_path, title=_run_title(cfg))
            except Exception as exc:  # a plot must never stop a run
                print(f"warning: could not draw {plot_path}: {exc}", file=sys.stderr)
            _print_epoch(record)
        barrier(dist)
        if cfg.get("stop_after_epochs") and epochs_run >= cfg["stop_after_epochs"] and epoch + 1 < cfg["epochs"]:
            stopped_early = True
            break

    if cfg.get("debug_dump_rank_state"):
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   os.path.join(output, f"rank{dist.rank}_state.pth"))
        barrier(dist)
    if not dist.is_main:
        return None
    if not last_val:  # nothing trained (resumed a finished run) or stopped before an evaluation
        last_val = evaluate_model(model, val_loader, dist, cfg["amp"], False)
    completed = epoch + 1 if epochs_run else start_epoch
    result: Dict[str, Any] = {
        "val_top1": round(last_val["top1"], 4),
        "val_top5": round(last_val["top5"], 4),
        "val_loss": round(last_val["loss"], 6),
        "best_val_top1": round(max(best_top1, last_val["top1"]) if best_top1 >= 0 else last_val["top1"], 4),
        "best_epoch": best_epoch,
        "epochs": completed,
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
        "metrics": metrics_path,
        "plot": plot_path,
        "output": output,
    }
    if last_val_ema:
        result["val_top1_ema"] = round(last_val_ema["top1"], 4)
    if stopped_early:
        result["stopped_early"] = True
    with open(os.path.join(output, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    return result


def _run_title(cfg: Mapping[str, Any]) -> str:
    kwargs = ", ".join(f"{k} {v}" for k, v in (cfg.get("model_kwargs") or {}).items())
    data = os.path.basename(os.path.normpath(str(cfg["data"])))
    return f"{cfg['model']}{f' ({kwargs})' if kwargs else ''} on {data}"


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def _print_epoch(record: Mapping[str, Any]) -> None:
    parts = [f"epoch {record['epoch']}", f"train_loss {record['train_loss']:.4f}"]
    for key in ("val_loss", "val_top1", "val_top5", "val_top1_ema"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.4f}" if key == "val_loss" else f"{key} {record[key]:.2f}")
    parts.append(f"lr {record['lr']:.3g}")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    print("  ".join(parts), file=sys.stderr, flush=True)


def _train_one_epoch(cfg, dist, model, ddp_model, loader, optimizer, scheduler, loss_fn, mixup_fn, ema, scaler,
                     clip_fn, epoch, accum, updates_per_epoch, num_updates, samples_per_epoch):
    device = dist.device
    model.train()
    steps = updates_per_epoch * accum
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, images, bad, correct
    max_bad = cfg["max_bad_fraction"] * samples_per_epoch * dist.world_size
    nan_step = cfg.get("debug_nan_step")
    iterator = loader
    bar = None
    if cfg["progress"] and dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False, dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
    optimizer.zero_grad(set_to_none=True)
    with _user_errors():
        for step, (images, targets, bad) in enumerate(iterator):
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
                with _autocast(device, cfg["amp"]):
                    logits = ddp_model(images)
                    loss = loss_fn(logits, targets)
                global_step = epoch * steps + step
                if nan_step is not None and global_step == nan_step:
                    loss = loss * float("nan")
                scaler.scale(loss / accum).backward()
            correct = (logits.detach().argmax(-1) == hard_targets).sum() if mixup_fn is None else torch.zeros((), device=device)
            step_stats = torch.stack([
                loss.detach().float() * images.shape[0],
                torch.tensor(float(images.shape[0]), device=device),
                bad.to(device).sum().float(),
                correct.float(),
            ]).double()
            all_reduce_sum(step_stats, dist)  # every rank sees the same figures (and stops together on NaN)
            step_stats = step_stats.cpu()
            if not math.isfinite(step_stats[0].item()):
                if bar is not None:
                    bar.close()
                raise TrainingDivergedError(
                    f"the training loss became {'NaN' if math.isnan(step_stats[0].item()) else 'infinite'} at epoch "
                    f"{epoch + 1}, step {step + 1} (global step {global_step}); stopped, the last good checkpoint is "
                    "untouched. Lower lr, add clip_grad, or use amp=bf16 instead of fp16"
                )
            totals += step_stats
            if totals[2].item() > max_bad:
                if bar is not None:
                    bar.close()
                raise UserError(
                    f"too many unreadable images: {int(totals[2].item())} in epoch {epoch + 1} (more than "
                    f"max_bad_fraction {cfg['max_bad_fraction']} of {samples_per_epoch * dist.world_size} drawn per epoch); "
                    "fix or remove them, or raise max_bad_fraction"
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
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step + 1 == steps:
                    bar.set_postfix(loss=f"{step_stats[0].item() / max(step_stats[1].item(), 1):.4f}",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if bar is not None:
        bar.close()
    loss_sum, images, bad, correct = totals.tolist()
    out = {"loss": loss_sum / max(images, 1), "images": images, "bad_images": int(bad)}
    if mixup_fn is None:
        out["top1"] = 100.0 * correct / max(images, 1)
    return out, num_updates


# ----------------------------------------------------------------------------------------------- eval command
_EVAL_BASE = dict(model=None, model_kwargs={}, img_size=None, in_chans=None, data=None, num_classes=None, threads=None)


def evaluate(checkpoint: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
             config_path: Optional[str] = None, use_ema: bool = False) -> Optional[Dict[str, Any]]:
    """Evaluate `checkpoint` (ours, or a reference `{'model': state_dict}` file) on a validation set.

    The model, its arguments, the data and the class names default to what one of our checkpoints
    recorded; `overrides` (model, data, batch_size, img_size, crop_pct, ...) win. Returns top1, top5,
    loss, images, images_per_s, ... (None on ranks other than 0)."""
    overrides = dict(overrides or {})
    ckpt = None
    if checkpoint:
        checkpoint = os.fspath(checkpoint)
        if checkpoint.endswith(".safetensors"):
            from ..models.checkpoint import read_checkpoint

            if not os.path.isfile(checkpoint):
                raise UserError(f"checkpoint not found: {checkpoint}")
            ckpt = {"model": read_checkpoint(checkpoint)}
        else:
            ckpt = load_training_checkpoint(checkpoint)
    base = copy.deepcopy(DEFAULTS)
    base.update(copy.deepcopy(_EVAL_BASE))
    saved_cfg = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else None
    if saved_cfg:
        keep = ("model", "model_kwargs", "img_size", "in_chans", "num_classes", "data", "val_split", "val_fraction",
                "crop_pct", "interpolation", "batch_size")
        base = apply_overrides(base, {k: saved_cfg[k] for k in keep if k in saved_cfg}, source=f"checkpoint {checkpoint}")
    if config_path:
        from .config import _read_yaml

        base = apply_overrides(base, _read_yaml(config_path), source=f"config file {config_path}")
    cfg = apply_overrides(base, overrides, source="the command line")
    dist = init_distributed(cfg["device"], cfg.get("threads"))
    try:
        return _evaluate(cfg, dist, checkpoint, ckpt, use_ema)
    finally:
        cleanup_distributed(dist)


def _evaluate(cfg, dist, checkpoint, ckpt, use_ema) -> Optional[Dict[str, Any]]:
    from ..models.checkpoint import CheckpointMismatchError, unwrap_state_dict

    if not cfg.get("model"):
        raise UserError("eval needs --model NAME (the checkpoint does not record which model it holds)")
    _check_model_name(cfg["model"])
    info = _data_classes(cfg, need_train=False)
    class_names = ckpt.get("class_names") if isinstance(ckpt, dict) and isinstance(ckpt.get("class_names"), list) else None
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
            raise UserError(f"{info['val_dir']} has class folders the checkpoint does not know: {', '.join(unknown[:5])}")
    cfg["num_classes"] = num_classes
    model = create_classifier(cfg, num_classes)
    source = "random initialisation"
    if checkpoint:
        from ..models import load_checkpoint

        if use_ema:
            if "model_ema" not in ckpt:
                raise UserError(f"{checkpoint} has no EMA weights (model_ema); drop --ema")
            state = {"model": ckpt["model_ema"]}
            filt = getattr(model, "checkpoint_filter", None)
            sd = filt(state) if filt else unwrap_state_dict(state)
            try:
                model.load_state_dict(sd)
            except RuntimeError as exc:
                raise UserError(f"the EMA weights in {checkpoint} do not fit {cfg['model']}: {str(exc).splitlines()[0]}") from exc
        else:
            try:
                load_checkpoint(model, checkpoint)
            except CheckpointMismatchError as exc:
                raise UserError(str(exc).replace("\n", " ")) from exc
        source = checkpoint + (" (EMA)" if use_ema else "")
    model.to(dist.device)
    _, val_ds = _build_datasets(cfg, info, model, train=False, class_names=class_names)
    if len(val_ds) == 0:
        raise UserError(f"no images to evaluate in {cfg['data']}")
    loader = _val_loader(val_ds, cfg, dist, cfg["batch_size"])
    figures = evaluate_model(model, loader, dist, cfg.get("amp"), cfg["progress"])
    if figures["bad_images"] > cfg["max_bad_fraction"] * len(val_ds):
        raise UserError(
            f"too many unreadable images: {figures['bad_images']} of {len(val_ds)} (more than max_bad_fraction "
            f"{cfg['max_bad_fraction']}); fix or remove them, or raise --max-bad-fraction"
        )
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
