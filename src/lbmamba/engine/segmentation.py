"""Semantic segmentation: `seg train`, `seg eval`, `seg predict` (UperNet on an LBVim / Vim / uVim backbone).

The paper's ADE20K setting (docs/segmentation.md), counted in iterations as mmsegmentation counts them,
on the shared iteration loop (`iterations`: exact resume, atomic last.pth / best.pth at the best
validation mIoU, a NaN loss that stops before any checkpoint is touched, unreadable or inconsistent image /
mask pairs skipped and counted under `max_bad_fraction`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    DataError,
    SegmentationDataset,
    SegTestTransform,
    SegTrainTransform,
    collate_pad,
    find_pairs,
    read_class_names,
    read_image,
    write_digit_scenes,
)
from ..data.segmentation import SPLITS
from ..models import FEATURE_SOURCES, NECKS, Segmentor, build_segmentor, load_backbone_weights, predict_logits
from ..models.checkpoint import CheckpointMismatchError
from .classification import ShardSampler, bad_image_limit, batch_plan, check_model_name, loader_workers
from .config import ConfigTable, Key
from .device import AMP_MODES, autocast, threads_key
from .distributed import DistInfo, all_reduce_sum, barrier, session
from .errors import UserError, user_errors
from .files import atomic_path
from .iterations import (
    Loop,
    LossModule,
    config_from_checkpoint,
    finished_summary,
    input_images,
    iteration_loader,
    lr_factor,
    run_result,
    start_run,
    train_iterations,
)
from .metrics import confusion_matrix, segmentation_scores
from .records import LOGS, progress
from .rng import seed_everything, seed_worker
from .runs import Run, note, open_run

__all__ = ["SEG_TRAIN", "SEG_EVAL", "SEG_PREDICT", "train_seg", "evaluate_seg", "predict_seg", "lr_factor",
           "evaluate_segmentor", "optimizer_groups", "DIGIT_SCENES", "LAYOUTS"]

DIGIT_SCENES = "digit_scenes"
LAYOUTS = ("auto", "ade20k", "generic")
SCHEDULES = ("warmup_then_poly", "poly_with_warmup")
EVAL_MODES = ("slide", "whole")


def _check_seg(cfg: Dict[str, Any]) -> None:
    for key in ("scale", "ratio_range", "test_scale"):
        if key in cfg and (len(cfg[key]) != 2 or not all(v > 0 for v in cfg[key])):
            raise UserError(f"config key {key!r} must be two positive numbers, got {cfg[key]!r}")
    if "ratio_range" in cfg and cfg["ratio_range"][0] > cfg["ratio_range"][1]:
        raise UserError(f"config key 'ratio_range' must be low <= high, got {cfg['ratio_range']!r}")
    if "max_bad_fraction" in cfg and not 0.0 <= cfg["max_bad_fraction"] <= 1.0:
        raise UserError(f"config key 'max_bad_fraction' must be in [0, 1], got {cfg['max_bad_fraction']!r}")
    if cfg.get("eval_scales") is not None and not all(s > 0 for s in cfg["eval_scales"]):
        raise UserError(f"config key 'eval_scales' must be positive numbers, got {cfg['eval_scales']!r}")
    if "warmup_iters" in cfg and "iters" in cfg and cfg["warmup_iters"] >= cfg["iters"]:
        raise UserError(f"warmup_iters ({cfg['warmup_iters']}) must be less than iters ({cfg['iters']})")


# The defaults are the shipped run: a small LBVim + UperNet on the generated digit scenes (CPU, minutes).
# configs/seg/ holds the paper's ADE20K recipes.
SEG_TRAIN = ConfigTable("seg train", {
    # model
    "model": Key("lbvim_tiny_patch16_224", "backbone: timm model name (lbvim_*, vim_*, uvim_*, or a timm model "
                 "with forward_intermediates)", flag=True, effect="model"),
    "model_kwargs": Key({"embed_dim": 64, "depth": 4, "patch_size": 4},
                        "extra backbone constructor arguments (embed_dim, depth, patch_size, ...)", effect="model"),
    "neck": Key("none", "none: four maps at the backbone's stride (LBMamba); vim: strides 4/8/16/32 from "
                "transposed convs / identity / max-pool (Vim)", choices=NECKS, flag=True, effect="model"),
    "head_channels": Key(64, "UPerHead channels (LBMamba 512; Vim 192 tiny / 384 small)", positive=True,
                         effect="model"),
    "aux_channels": Key(32, "auxiliary FCNHead channels (LBMamba and Vim: 256)", positive=True, effect="model"),
    "aux_weight": Key(0.4, "auxiliary loss weight", low=0),
    "dropout": Key(0.1, "dropout before each head's classifier", low=0, effect="model"),
    "feature_source": Key("mixer", "what each taken layer gives: mixer (the block's mixer output, LBMamba) or "
                          "residual (the residual stream, timm's forward_intermediates)", choices=FEATURE_SOURCES,
                          effect="model"),
    "out_indices": Key(None, "backbone layers taken (null: 5,11,17,23 for 24 layers, evenly spaced otherwise)",
                       kind="int_list", effect="model"),
    "backbone_norm": Key("layernorm", "the backbone's norms: layernorm (LBMamba's segmentation configs) or rmsnorm",
                         choices=("layernorm", "rmsnorm"), effect="model"),
    "drop_path": Key(0.0, "stochastic depth rate of the backbone", low=0),
    "num_classes": Key(None, "classes (null: from the data)", kind="int", positive=True, effect="model"),
    "init_checkpoint": Key(None, "start the backbone from these classification weights (ours or a reference "
                           "{'model': ...} file), or the whole segmentor from a segmentor state dict", kind="str",
                           flag=True),
    # data
    "data": Key(DIGIT_SCENES, f"'{DIGIT_SCENES}' (generated into the run folder) or a data folder in the ADE20K or "
                "generic layout", nullable=True, flag=True),
    "layout": Key("auto", "ade20k (images/ + annotations/, label 0 ignored) or generic (images/ + masks/ + "
                  "classes.txt); auto: ade20k when annotations/ exists", choices=LAYOUTS, flag=True),
    "train_split": Key(None, "training sub-folder (null: training for ade20k, train for generic)", kind="str"),
    "val_split": Key(None, "validation sub-folder (null: validation for ade20k, val for generic)", kind="str"),
    "reduce_zero_label": Key(None, "label 0 -> ignore (255), the others shift down by one (null: true for ade20k)",
                             kind="bool"),
    "scale": Key([128, 48], "training resize scale (long, short) before the random ratio (ADE20K: 2048,512)",
                 kind="int_list"),
    "ratio_range": Key([0.75, 1.5], "random resize ratio range (ADE20K: 0.5,2)", kind="float_list"),
    "crop_size": Key(32, "random crop (and sliding-window crop) size (ADE20K: 512)", positive=True, flag=True),
    "cat_max_ratio": Key(0.75, "crop retries while one class covers more than this fraction (1: off)", low=0),
    "hflip": Key(0.0, "horizontal flip probability (ADE20K: 0.5; digits are not mirror images)", low=0),
    "photometric": Key(False, "photometric distortion: brightness, contrast, saturation, hue (ADE20K: true)"),
    "test_scale": Key([128, 48], "evaluation resize scale (long, short), ratio kept (ADE20K: 2048,512)",
                      kind="int_list"),
    "workers": Key(None, "data-loading worker processes per rank (null: min(8, cores / local processes), 0 for "
                   "the digit scenes)", kind="int", low=0, flag=True, effect="none"),
    "max_bad_fraction": Key(0.01, "fail when more than this fraction of the samples drawn, and more than "
                            "max_bad_images, are unreadable or inconsistent", flag=True, effect="none"),
    "max_bad_images": Key(1, "bad samples tolerated whatever their fraction", low=0, effect="none"),
    # optimisation
    "batch_size": Key(32, "images per process per step (LBMamba: 8 x 2 GPUs)", positive=True, flag=True),
    "global_batch_size": Key(None, "if set: grad_accum = global_batch_size / (batch_size x world size)", kind="int",
                             positive=True, flag=True),
    "grad_accum": Key(1, "micro-batches per optimizer step (ignored when global_batch_size is set)", positive=True),
    "iters": Key(2000, "optimizer steps (ADE20K: 160000 LBMamba, 60000 Vim)", positive=True, flag=True),
    "lr": Key(3e-3, "peak learning rate (LBMamba 6e-5, Vim 1e-4)", positive=True, flag=True),
    "betas": Key([0.9, 0.999], "AdamW betas", kind="float_list"),
    "weight_decay": Key(0.01, "AdamW weight decay (LBMamba 0.01, Vim 0.05)", low=0),
    "decay_rule": Key("lbmamba", "which parameters take no weight decay: lbmamba (names holding pos_embed, cls_token, "
                      "norm, A_log or D, as LBMamba's config) or vim (1-d parameters and biases, as Vim's)",
                      choices=("lbmamba", "vim")),
    "layer_decay": Key(None, "layer-wise lr decay: layer i of n gets decay^(n + 1 - i) (Vim: 0.92); null: off",
                       kind="float", positive=True),
    "schedule": Key("warmup_then_poly", "warmup_then_poly: linear warm-up, then poly decay over the remaining "
                    "iterations (mmseg 1.x, LBMamba); poly_with_warmup: poly over all iterations, scaled by the "
                    "warm-up (mmseg 0.x, Vim)", choices=SCHEDULES),
    "warmup_iters": Key(50, "linear warm-up iterations (ADE20K: 1500)", low=0),
    "warmup_ratio": Key(1e-6, "learning-rate factor at the start of the warm-up", positive=True),
    "poly_power": Key(1.0, "power of the poly decay", positive=True),
    "min_lr": Key(0.0, "learning rate at the end of the poly decay", low=0),
    "clip_grad": Key(None, "clip the gradient norm at this value (null: off)", kind="float", positive=True),
    # evaluation
    "eval_mode": Key("whole", "slide (crops of crop_size at eval_stride, logits averaged; ADE20K) or whole",
                     choices=EVAL_MODES, flag=True),
    "eval_stride": Key(None, "sliding-window stride (null: 2/3 of crop_size, 341 for 512)", kind="int",
                       positive=True),
    "eval_flip": Key(False, "test-time augmentation: average with the horizontally flipped image", flag=True),
    "eval_scales": Key(None, "test-time augmentation: average over these image scales, e.g. 0.5,0.75,1,1.25,1.5,1.75 "
                       "(null: 1 only)", kind="float_list", flag=True),
    "eval_every": Key(400, "validate every N iterations (and after the last; ADE20K: 16000)", positive=True),
    "save_every": Key(400, "write last.pth every N iterations (and at every validation)", positive=True,
                      effect="none"),
    "log_every": Key(50, "record the training loss every N iterations", positive=True, effect="none"),
    # run
    "amp": Key(None, "mixed precision: null (fp32) | bf16 | fp16 (fp16 uses a GradScaler)", kind="str",
               choices=AMP_MODES, flag=True),
    "device": Key("auto", "auto | cpu | cuda | cuda:N (under torchrun: LOCAL_RANK's GPU)", flag=True, effect="none"),
    "seed": Key(0, "base seed (data order and augmentation depend on seed, pass over the data and rank)", flag=True),
    "output": Key(None, "the run folder (null: runs/<time>-seg-<model>); a folder holding a run is refused unless "
                  "overwrite", kind="str", flag=True, effect="none"),
    "overwrite": Key(False, "move a run already in `output` aside and start anew", flag=True, effect="once"),
    "resume": Key(None, "continue the run in this folder (or its last.pth) with its own config", kind="str",
                  flag=True, effect="once"),
    "progress": Key(True, "show a progress bar (rank 0)", flag=True, effect="none"),
    "log": Key("csv", "also keep the figures as metrics.csv (csv) or TensorBoard events (tensorboard); null: "
               "metrics.jsonl only", nullable=True, choices=LOGS, flag=True, effect="none"),
    "threads": threads_key(),
    "allow_config_change": Key(False, "resume although result-changing keys differ (the model must match)",
                               effect="once"),
    "stop_after_iters": Key(None, "stop after this many iterations of this invocation (for tests and job limits)",
                            kind="int", positive=True, flag=True, effect="once"),
    "debug_nan_iter": Key(None, "test hook: make the loss NaN at this (0-based) iteration", kind="int", hidden=True),
    "debug_dump_rank_state": Key(False, "test hook: every rank saves its parameters to <output>/rank<r>_params.pth",
                                 hidden=True, effect="once"),
}, check=_check_seg)

_EVAL_KEYS = ["model", "model_kwargs", "neck", "head_channels", "aux_channels", "dropout", "feature_source",
              "out_indices", "backbone_norm", "num_classes", "data", "layout", "val_split", "reduce_zero_label",
              "crop_size", "test_scale", "eval_mode", "eval_stride", "eval_flip", "eval_scales", "workers",
              "max_bad_fraction", "max_bad_images", "amp", "device", "threads", "progress"]
#: `lbmamba seg eval`: what the checkpoint's run used, unless given
SEG_EVAL = SEG_TRAIN.derive(
    "seg eval", _EVAL_KEYS,
    changes={"data": dict(default=None)},
    extra={"checkpoint": Key(None, "weights to evaluate: our last.pth / best.pth, or a segmentor state dict with "
                             "mmseg's names (give the model keys)", kind="str", flag=True),
           "split": Key(None, "the split to score (null: val_split)", kind="str", flag=True),
           "per_class_csv": Key(None, "also write the per-class table here", kind="str", flag=True)},
    check=_check_seg,
)
#: `lbmamba seg predict`: the model keys and the test-time keys
SEG_PREDICT = SEG_TRAIN.derive(
    "seg predict",
    [k for k in _EVAL_KEYS if k not in ("data", "layout", "val_split", "reduce_zero_label", "max_bad_fraction",
                                        "max_bad_images", "workers")],
    extra={"checkpoint": SEG_EVAL.keys["checkpoint"],
           "inputs": Key(None, "an image, or a folder of images", kind="str", flag=True),
           "output": Key("predictions", "folder for <stem>_mask.png (colours), <stem>_labels.png (class indices) "
                         "and <stem>_overlay.png", flag=True),
           "class_names": Key(None, "class names (null: from the checkpoint)", kind="str_list"),
           "overlay_alpha": Key(0.5, "weight of the mask colours in the overlay", low=0)},
    check=_check_seg,
)
#: the model and data keys `seg eval` / `seg predict` take from one of our checkpoints
_FROM_CHECKPOINT = ("model", "model_kwargs", "neck", "head_channels", "aux_channels", "dropout", "feature_source",
                    "out_indices", "backbone_norm", "num_classes", "data", "layout", "val_split", "reduce_zero_label",
                    "crop_size", "test_scale", "eval_mode", "eval_stride")
_CURVES = [("loss", "loss", [("train_loss", "train"), ("train_loss_decode", "decode head"),
                             ("train_loss_aux", "auxiliary head")]),
           ("validation", "score", [("val_mIoU", "mIoU"), ("val_mAcc", "mAcc"), ("val_aAcc", "aAcc")])]
_SHOWN = ("iter", "train_loss", "val_mIoU", "val_mAcc", "val_aAcc", "lr", "seconds")


# ----------------------------------------------------------------------------------------------- optimizer
def optimizer_groups(model: Segmentor, weight_decay: float, layer_decay: Optional[float],
                     decay_rule: str = "lbmamba") -> List[Dict[str, Any]]:
    """AdamW parameter groups: no decay on the model's `no_weight_decay(decay_rule)` names; with
    `layer_decay`, the lr of a parameter in layer i of n (0: embeddings, n + 1: neck and heads) is scaled by
    layer_decay^(n + 1 - i), as Vim's layer-decay optimizer constructor does."""
    skip = set(model.no_weight_decay(decay_rule))
    groups: Dict[Tuple[bool, float], Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = name not in skip
        scale = 1.0
        if layer_decay is not None:
            scale = layer_decay ** (model.num_layers + 1 - model.layer_id(name))
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------- data
def _layout(root: str, layout: str) -> str:
    if layout != "auto":
        return layout
    return "ade20k" if os.path.isdir(os.path.join(root, "annotations")) else "generic"


def _data_root(cfg: Mapping[str, Any], run_dir: Optional[str]) -> str:
    """The data folder: a user folder, or the digit scenes written once (into the run folder when there is one)."""
    data = cfg.get("data")
    if data is None:
        raise UserError("no data given (set --data DIR, a folder in the ADE20K or generic layout, or "
                        f"--data {DIGIT_SCENES})")
    if str(data) == DIGIT_SCENES:
        root = os.path.join(run_dir, "data") if run_dir else os.path.join(tempfile.gettempdir(), "lbmamba-digit-scenes")
        return str(write_digit_scenes(root, seed=0))
    root = os.path.abspath(os.path.expanduser(str(data)))
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    return root


def _splits(cfg: Mapping[str, Any], layout: str) -> Tuple[str, str]:
    train, val = SPLITS[layout]
    return cfg.get("train_split") or train, cfg.get("val_split") or val


def _class_names(root: str, layout: str) -> List[str]:
    return list(read_class_names(root, layout))


def _reduce_zero_label(cfg: Mapping[str, Any], layout: str) -> bool:
    flag = cfg.get("reduce_zero_label")
    return layout == "ade20k" if flag is None else bool(flag)


def _test_transform(cfg: Mapping[str, Any]) -> SegTestTransform:
    return SegTestTransform(scale=tuple(cfg["test_scale"]))


def _train_transform(cfg: Mapping[str, Any]) -> SegTrainTransform:
    return SegTrainTransform(scale=tuple(cfg["scale"]), ratio_range=tuple(cfg["ratio_range"]), crop=cfg["crop_size"],
                             cat_max_ratio=cfg["cat_max_ratio"], flip=cfg["hflip"], photometric=cfg["photometric"])


def _in_process(cfg: Mapping[str, Any]) -> bool:
    """The digit scenes (small PNGs) are read in this process."""
    return str(cfg.get("data")) == DIGIT_SCENES


def _too_many_bad(bad: int, total: int, cfg: Mapping[str, Any], where: str) -> UserError:
    return UserError(
        f"too many unreadable or inconsistent image / mask pairs {where}: {bad} of {total} (more than max_bad_images "
        f"{cfg['max_bad_images']} and max_bad_fraction {cfg['max_bad_fraction']}); fix or remove them, or raise "
        "max_bad_fraction"
    )


# ----------------------------------------------------------------------------------------------- model
def _build(cfg: Mapping[str, Any], num_classes: int) -> Segmentor:
    check_model_name(cfg["model"])
    try:
        return build_segmentor(
            cfg["model"], num_classes, img_size=cfg["crop_size"], neck=cfg["neck"], head_channels=cfg["head_channels"],
            aux_channels=cfg["aux_channels"], aux_weight=cfg.get("aux_weight", 0.4), dropout=cfg["dropout"],
            feature_source=cfg["feature_source"], out_indices=cfg.get("out_indices"),
            backbone_norm=cfg["backbone_norm"], drop_path=cfg.get("drop_path", 0.0),
            backbone_kwargs=dict(cfg.get("model_kwargs") or {}),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build a segmentor on {cfg['model']!r}: {exc}") from exc


def _load_weights(model: Segmentor, checkpoint: Mapping[str, Any], source: str) -> None:
    """A segmentor checkpoint (ours, or a state dict with mmseg's names, its position embedding resized)
    into `model`, strictly; a classification checkpoint is refused with what to do instead."""
    try:
        report = load_backbone_weights(model, checkpoint)
    except CheckpointMismatchError as exc:
        raise UserError(f"{source}: {exc}") from exc
    if report.kind != "segmentor":
        raise UserError(f"{source} holds no segmentation heads (no decode_head.* weights): a classification "
                        "checkpoint starts a segmentor with `seg train --init-checkpoint`")


def _init_weights(model: Segmentor, path: str) -> None:
    """init_checkpoint: classification weights into the backbone (or a whole segmentor), said in one line."""
    try:
        report = load_backbone_weights(model, path)
    except CheckpointMismatchError as exc:
        raise UserError(f"init_checkpoint: {exc}") from exc
    note(f"init_checkpoint: {report.summary()}")


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_segmentor(model: Segmentor, loader: DataLoader, dist: DistInfo, cfg: Mapping[str, Any],
                       class_names: Sequence[str], desc: str = "eval") -> Dict[str, Any]:
    """mIoU, mAcc, aAcc and the per-class table over `loader` (one confusion matrix summed over ranks), as
    mmsegmentation's IoUMetric: the logits of the resized image are resized back to the mask's size."""
    device = dist.device
    was_training = model.training
    model.eval()
    k = model.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64, device=device)
    counts = torch.zeros(2, dtype=torch.float64)  # images, bad
    start = time.perf_counter()
    crop = cfg["crop_size"]
    stride = cfg.get("eval_stride") or max(1, round(crop * 2 / 3))
    show = cfg.get("progress", False) and dist.is_main
    for images, masks, bad in progress(loader, desc=desc, enabled=show):
        counts[1] += bad
        for image, mask in zip(images, masks):  # the loader gives one image at a time: each has its own size
            with autocast(device, cfg.get("amp")):
                logits = predict_logits(model, image.to(device)[None], mode=cfg["eval_mode"], crop=crop, stride=stride,
                                        flip=bool(cfg.get("eval_flip")), scales=tuple(cfg.get("eval_scales") or (1.0,)))
            logits = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1)[0], mask.to(device), k)
            counts[0] += 1
    seconds = time.perf_counter() - start
    all_reduce_sum(confusion, dist)
    all_reduce_sum(counts, dist)
    model.train(was_training)
    scores = segmentation_scores(confusion.cpu(), list(class_names))
    scores.update(images=int(counts[0]), bad_images=int(counts[1]), seconds=seconds,
                  images_per_s=counts[0].item() / max(seconds, 1e-9))
    return scores


def _val_loader(dataset: Dataset, cfg: Mapping[str, Any], dist: DistInfo) -> DataLoader:
    # batch 1: every validation image keeps its own size, as mmsegmentation's test loop does
    return DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
                      num_workers=loader_workers(cfg, dist, in_process=_in_process(cfg)), collate_fn=collate_pad,
                      worker_init_fn=seed_worker, pin_memory=dist.device.type == "cuda")


def _score_row(scores: Mapping[str, Any], prefix: str = "val_") -> Dict[str, float]:
    return {f"{prefix}{k}": round(float(scores[k]), 6) for k in ("mIoU", "mAcc", "aAcc")}


def _per_class(scores: Mapping[str, Any]) -> Dict[str, Dict[str, Optional[float]]]:
    def clean(value):
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)

    return {row["class"]: {"IoU": clean(row["IoU"]), "Acc": clean(row["Acc"])} for row in scores["per_class"]}


def _class_table(scores: Mapping[str, Any]) -> str:
    """The per-class table as mmsegmentation prints it (percentages; nan for classes absent from the data)."""
    width = max([5] + [len(str(row["class"])) for row in scores["per_class"]])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for row in scores["per_class"]:
        lines.append(f"{row['class']:<{width}}  {100 * row['IoU']:6.2f}  {100 * row['Acc']:6.2f}")
    lines.append(f"{'mean':<{width}}  {100 * scores['mIoU']:6.2f}  {100 * scores['mAcc']:6.2f}   "
                 f"aAcc {100 * scores['aAcc']:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- training
def _prepare_train(cfg: Dict[str, Any], found: Dict[str, Any]) -> Dict[str, Any]:
    """Check the model and the data before the run folder exists; fill in what the data decides."""
    check_model_name(cfg["model"])
    if str(cfg["data"]) == DIGIT_SCENES:  # written into the run folder once it exists
        found.update(layout="generic", classes=None)
        return cfg
    root = _data_root(cfg, None)
    layout = _layout(root, cfg["layout"])
    train_split, val_split = _splits(cfg, layout)
    names = _class_names(root, layout)
    if cfg.get("num_classes") and cfg["num_classes"] != len(names):
        raise UserError(f"num_classes is {cfg['num_classes']} but {root} has {len(names)} classes")
    found.update(root=root, layout=layout, classes=names,
                 train=find_pairs(root, layout, train_split), val=find_pairs(root, layout, val_split))
    cfg["num_classes"] = len(names)
    return cfg


def _run_name(cfg: Mapping[str, Any]) -> str:
    return f"seg-{cfg['model']}"


@user_errors()
def train_seg(overrides: Optional[Mapping[str, Any]] = None,
              config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Train a segmentor: the `SEG_TRAIN` table's defaults <- `config_path` <- `overrides`.

    Returns the final figures on rank 0 (None on other ranks): val_mIoU, val_mAcc, val_aAcc,
    best_val_mIoU, best_iter, iters, train_loss, checkpoint (best.pth), last_checkpoint, output, ..."""
    found: Dict[str, Any] = {}  # the data the prepare step found (one look at the folders)
    with open_run(SEG_TRAIN, overrides, config_path, _run_name, lambda cfg: _prepare_train(cfg, found)) as run:
        return _train_seg(run, found)


def _run_data(run: Run, found: Dict[str, Any]) -> Dict[str, Any]:
    """The run's data: the digit scenes are written into the run folder (once, by rank 0)."""
    if found.get("root"):
        return found
    cfg = run.cfg
    if run.dist.is_main:
        _data_root(cfg, run.dir)
    barrier(run.dist)
    root = _data_root(cfg, run.dir)
    train_split, val_split = _splits(cfg, "generic")
    names = _class_names(root, "generic")
    cfg["num_classes"] = cfg.get("num_classes") or len(names)
    return dict(root=root, layout="generic", classes=names, train=find_pairs(root, "generic", train_split),
                val=find_pairs(root, "generic", val_split))


def _seg_losses(model: Segmentor, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    return model.losses(images, masks)


def _train_seg(run: Run, found: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    cfg, dist, device = run.cfg, run.dist, run.dist.device
    wall_start = time.perf_counter()
    data = _run_data(run, found)
    class_names, num_classes = data["classes"], cfg["num_classes"]
    done = finished_summary(run, "seg train")
    if done is not None:
        return done if dist.is_main else None

    seed_everything(cfg["seed"])  # identical initial weights on every rank
    model = _build(cfg, num_classes)
    if cfg.get("init_checkpoint") and run.checkpoint is None:
        _init_weights(model, cfg["init_checkpoint"])
    if dist.distributed and device.type == "cuda":  # mmseg's SyncBN; gloo (CPU) has no SyncBatchNorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    params = sum(p.numel() for p in model.parameters())

    reduce_zero = _reduce_zero_label(cfg, data["layout"])
    train_ds = SegmentationDataset(data["train"], num_classes, _train_transform(cfg), reduce_zero, skip_bad=True)
    val_ds = SegmentationDataset(data["val"], num_classes, _test_transform(cfg), reduce_zero, skip_bad=True)
    accum, global_batch, lr = batch_plan(cfg, dist.world_size)
    batch = cfg["batch_size"]
    if batch < 2 and not (dist.distributed and device.type == "cuda"):  # SyncBatchNorm spans the processes there
        raise UserError(f"batch_size {batch}: the heads' BatchNorm needs at least 2 images per step in one process "
                        "(a 1x1 pooled map has one value per channel); set batch_size >= 2")
    if len(train_ds) // dist.world_size < batch:
        raise UserError(f"the training set ({len(train_ds)} images, {len(train_ds) // dist.world_size} per process) "
                        f"is smaller than one batch ({batch}); lower batch_size")

    groups = optimizer_groups(model, cfg["weight_decay"], cfg.get("layer_decay"), cfg["decay_rule"])
    start = start_run(run, model, groups, lr, f"{cfg['model']} + UperNet on {os.path.basename(data['root'])}",
                      _CURVES, _SHOWN)
    val_loader = _val_loader(val_ds, cfg, dist)
    if dist.is_main:
        note(f"lbmamba seg train: {cfg['model']} + UperNet ({params / 1e6:.2f} M params, {num_classes} classes) on "
             f"{data['root']}: {len(train_ds)} train / {len(val_ds)} val images; {dist.world_size} process(es) on "
             f"{device.type}; global batch {global_batch}, lr {lr:.3g}; {start.where(run)}")

    def evaluate(iteration: int) -> Tuple[Dict[str, Any], float]:
        scores = evaluate_segmentor(model, val_loader, dist, cfg, class_names, desc=f"val {iteration}")
        if scores["bad_images"] > bad_image_limit(cfg, len(val_ds)):
            raise _too_many_bad(scores["bad_images"], len(val_ds), cfg, "in the validation set")
        return _score_row(scores), float(scores["mIoU"])

    end = train_iterations(Loop(
        run=run, model=model, step=LossModule(model, _seg_losses), start=start,
        loader=iteration_loader(train_ds, cfg, dist, start.iteration, accum, collate_pad, _in_process(cfg)),
        to_device=lambda b: tuple(t.to(device, non_blocking=True) for t in b), loss_parts=("loss_decode", "loss_aux"),
        evaluate=evaluate, too_many_bad=lambda bad, total, where: _too_many_bad(bad, total, cfg, where),
        accum=accum, lr=lr, state={"num_classes": num_classes, "class_names": list(class_names)}, min_batch=2))
    if not dist.is_main:
        return None
    return run_result(run, end, start.record, "mIoU", wall_start, model=cfg["model"], params=params,
                      num_classes=num_classes, global_batch_size=global_batch)


# ----------------------------------------------------------------------------------------------- eval / predict
def _model_for(cfg: Dict[str, Any], ckpt: Optional[Mapping[str, Any]], class_names: Optional[List[str]],
               device: torch.device) -> Tuple[Segmentor, List[str]]:
    names = list(cfg.get("class_names") or (ckpt or {}).get("class_names") or class_names or [])
    num_classes = cfg.get("num_classes") or (ckpt or {}).get("num_classes") or len(names)
    if not num_classes:
        raise UserError("the number of classes is unknown: set num_classes (or class_names)")
    if names and len(names) != num_classes:
        raise UserError(f"{len(names)} class names for a model with {num_classes} classes")
    model = _build(cfg, int(num_classes))
    if ckpt is not None:
        _load_weights(model, ckpt, cfg["checkpoint"])
    else:
        note("no checkpoint given: the segmentor has random weights")
    return model.to(device).eval(), names or [str(i) for i in range(int(num_classes))]


@user_errors()
def evaluate_seg(overrides: Optional[Mapping[str, Any]] = None,
                 config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Score `checkpoint` on a split: mIoU, mAcc, aAcc and the per-class table (printed on stderr, and in
    the result). Returns None on ranks other than 0."""
    cfg, ckpt = config_from_checkpoint(SEG_EVAL, config_path, overrides, _FROM_CHECKPOINT, DIGIT_SCENES)
    with session(cfg["device"], cfg["threads"], "seg eval") as dist:
        root = _data_root(cfg, None)
        layout = _layout(root, cfg["layout"])
        split = cfg.get("split") or _splits(cfg, layout)[1]
        model, names = _model_for(cfg, ckpt, _class_names(root, layout), dist.device)
        if len(names) != model.num_classes:
            raise UserError(f"{root} has {len(names)} classes, the model {model.num_classes}")
        dataset = SegmentationDataset(find_pairs(root, layout, split), model.num_classes, _test_transform(cfg),
                                      _reduce_zero_label(cfg, layout), skip_bad=True)
        if len(dataset) == 0:
            raise UserError(f"no images to evaluate in {root} (split {split})")
        scores = evaluate_segmentor(model, _val_loader(dataset, cfg, dist), dist, cfg, names)
        if scores["bad_images"] > bad_image_limit(cfg, len(dataset)):
            raise _too_many_bad(scores["bad_images"], len(dataset), cfg, f"in {split}")
        if not dist.is_main:
            return None
        note(_class_table(scores))
        if cfg.get("per_class_csv"):
            from .files import write_csv

            write_csv(cfg["per_class_csv"], [["class", "IoU", "Acc"]] +
                      [[row["class"], row["IoU"], row["Acc"]] for row in scores["per_class"]])
        return {**{k: round(float(scores[k]), 6) for k in ("mIoU", "mAcc", "aAcc")},
                "per_class": _per_class(scores), "images": scores["images"], "bad_images": scores["bad_images"],
                "images_per_s": round(scores["images_per_s"], 3), "model": cfg["model"],
                "checkpoint": cfg.get("checkpoint"), "data": root, "split": split, "eval_mode": cfg["eval_mode"],
                "device": str(dist.device)}


def class_palette(names: Sequence[str]) -> np.ndarray:
    """(classes, 3) uint8 colours: ADE20K's own for its classes, else ADE20K's palette in turn, with
    reproducible random colours beyond its 150."""
    colours = np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    if len(names) > len(colours):
        extra = np.random.default_rng(0).integers(0, 256, size=(len(names) - len(colours), 3), dtype=np.uint8)
        colours = np.concatenate([colours, extra])
    if tuple(names) != tuple(ADE20K_CLASSES) and names and names[0] == "background":
        colours = np.concatenate([np.zeros((1, 3), np.uint8), colours])  # background stays black
    return colours[: len(names)]


@user_errors()
def predict_seg(overrides: Optional[Mapping[str, Any]] = None,
                config_path: Optional[str] = None) -> Dict[str, Any]:
    """Segment each input image and write <output>/<stem>_mask.png (class colours), <stem>_labels.png (class
    indices, 8-bit when there are at most 256 classes, else 16-bit) and <stem>_overlay.png (the image
    blended with the colours)."""
    from PIL import Image

    cfg, ckpt = config_from_checkpoint(SEG_PREDICT, config_path, overrides, _FROM_CHECKPOINT, DIGIT_SCENES)
    images = input_images(cfg.get("inputs"))
    with session(cfg["device"], cfg["threads"], "seg predict", distributed=False) as dist:
        model, names = _model_for(cfg, ckpt, None, dist.device)
        colours = class_palette(names)
        transform = _test_transform(cfg)
        out_dir = os.path.abspath(os.path.expanduser(cfg["output"]))
        os.makedirs(out_dir, exist_ok=True)
        crop = cfg["crop_size"]
        stride = cfg.get("eval_stride") or max(1, round(crop * 2 / 3))
        written, counts = [], np.zeros(len(names), dtype=np.int64)
        start = time.perf_counter()
        for path in progress(images, desc="predict", enabled=cfg["progress"]):
            rgb = read_image(path)  # DataError naming the file: one line, as every bad input
            tensor, _ = transform(rgb)
            with torch.no_grad(), autocast(dist.device, cfg.get("amp")):
                logits = predict_logits(model, tensor[None].to(dist.device), mode=cfg["eval_mode"], crop=crop,
                                        stride=stride, flip=bool(cfg.get("eval_flip")),
                                        scales=tuple(cfg.get("eval_scales") or (1.0,)))
            logits = F.interpolate(logits.float(), size=rgb.shape[:2], mode="bilinear", align_corners=False)
            labels = logits.argmax(1)[0].cpu().numpy()
            counts += np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
            mask = colours[labels]
            overlay = (rgb.astype(np.float32) * (1 - cfg["overlay_alpha"])
                       + mask.astype(np.float32) * cfg["overlay_alpha"]).round().clip(0, 255).astype(np.uint8)
            label_image = Image.fromarray(labels.astype(np.uint8 if len(names) <= 256 else np.uint16))
            for suffix, picture in (("mask", Image.fromarray(mask)), ("labels", label_image),
                                    ("overlay", Image.fromarray(overlay))):
                target = os.path.join(out_dir, f"{path.stem}_{suffix}.png")
                with atomic_path(target) as tmp:
                    picture.save(tmp, format="PNG")
                written.append(target)
        seconds = time.perf_counter() - start
    return {"images": len(images), "output": out_dir, "files": len(written), "model": cfg["model"],
            "checkpoint": cfg.get("checkpoint"), "seconds": round(seconds, 3),
            "pixels_per_class": {names[i]: int(c) for i, c in enumerate(counts) if c}}
