"""Semantic segmentation: `seg train`, `seg eval`, `seg predict` (UperNet on an LBVim / Vim / uVim backbone).

The paper's ADE20K setting (docs/segmentation.md), counted in iterations as mmsegmentation counts them,
on the shared iteration loop (`iterations`: exact resume, atomic last.pth / best.pth at the best
validation mIoU, a NaN loss that stops before any checkpoint is touched, unreadable or inconsistent image /
mask pairs skipped and counted under `max_bad_fraction`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import (
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
from .config import ConfigTable, Key
from .dense import (
    ALLOW_CLASS_MISMATCH,
    RANDOM_WEIGHTS,
    DenseTask,
    class_palette,
    config_from_checkpoint,
    eval_loader,
    generated_data_root,
    input_images,
    load_dense_weights,
    model_for,
)
from .device import autocast
from .distributed import DistInfo, all_reduce_sum, session
from .errors import UserError, user_errors
from .files import atomic_path, make_dir
from .loaders import check_bad_samples
from .metrics import confusion_matrix, segmentation_scores
from .models import check_model_name
from .records import progress
from .run_keys import INFERENCE_AMP, run_keys
from .runs import note, open_run
from .schedule import POLY_SCHEDULES

__all__ = ["SEG_TRAIN", "SEG_EVAL", "SEG_PREDICT", "train_seg", "evaluate_seg", "predict_seg",
           "evaluate_segmentor", "segmentor_for", "SegmentationTask", "DIGIT_SCENES", "LAYOUTS"]

DIGIT_SCENES = "digit_scenes"
LAYOUTS = ("auto", "ade20k", "generic")
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
                    "warm-up (mmseg 0.x, Vim)", choices=POLY_SCHEDULES),
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
    **run_keys("seg-<model>", "base seed (data order and augmentation depend on seed, pass over the data and "
                  "rank)", unit="iter"),
}, check=_check_seg)

_EVAL_KEYS = ["model", "model_kwargs", "neck", "head_channels", "aux_channels", "dropout", "feature_source",
              "out_indices", "backbone_norm", "num_classes", "data", "layout", "val_split", "reduce_zero_label",
              "crop_size", "test_scale", "eval_mode", "eval_stride", "eval_flip", "eval_scales", "workers",
              "max_bad_fraction", "max_bad_images", "amp", "device", "threads", "progress"]
#: `lbmamba seg eval`: what the checkpoint's run used, unless given
SEG_EVAL = SEG_TRAIN.derive(
    "seg eval", _EVAL_KEYS,
    changes={"data": dict(default=None), "amp": INFERENCE_AMP},
    extra={"checkpoint": Key(None, "weights to evaluate: our last.pth / best.pth, or a segmentor state dict with "
                             "mmseg's names (give the model keys)", kind="str", flag=True),
           "split": Key(None, "the split to score (null: val_split)", kind="str", flag=True),
           "per_class_csv": Key(None, "also write the per-class table here", kind="str", flag=True),
           "allow_class_mismatch": ALLOW_CLASS_MISMATCH},
    check=_check_seg,
)
#: `lbmamba seg predict`: the model keys and the test-time keys
SEG_PREDICT = SEG_TRAIN.derive(
    "seg predict",
    [k for k in _EVAL_KEYS if k not in ("data", "layout", "val_split", "reduce_zero_label", "max_bad_fraction",
                                        "max_bad_images", "workers")],
    changes={"amp": INFERENCE_AMP},
    extra={"checkpoint": SEG_EVAL.keys["checkpoint"],
           "inputs": Key(None, "an image, or a folder of images", kind="str", flag=True),
           "output": Key("predictions", "folder for <stem>_mask.png (colours), <stem>_labels.png (class indices) "
                         "and <stem>_overlay.png", flag=True),
           "class_names": Key(None, "class names (null: from the checkpoint)", kind="str_list"),
           "overlay_alpha": Key(0.5, "weight of the mask colours in the overlay", low=0),
           "allow_class_mismatch": ALLOW_CLASS_MISMATCH, "random_weights": RANDOM_WEIGHTS},
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


# ----------------------------------------------------------------------------------------------- data
def _layout(root: str, layout: str) -> str:
    if layout != "auto":
        return layout
    return "ade20k" if os.path.isdir(os.path.join(root, "annotations")) else "generic"


def _data_root(cfg: Mapping[str, Any], run_dir: Optional[str]) -> str:
    """The data folder: a user folder, or the digit scenes written once (into the run folder when there is one)."""
    return generated_data_root(cfg, run_dir, DIGIT_SCENES, "lbmamba-digit-scenes",
                               lambda root: write_digit_scenes(root, seed=0),
                               "a folder in the ADE20K or generic layout")


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


_PAIRS = "or inconsistent image / mask pairs"


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


def _load_weights(model: Segmentor, source, name: str, whole_only: bool) -> None:
    load_dense_weights(model, source, name, load_backbone_weights, "segmentor", "segmentation heads (no decode_head.* "
                       "weights)", "seg train", whole_only)


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
    return eval_loader(dataset, cfg, dist, 1, collate_pad, _in_process(cfg))


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


@user_errors()
def train_seg(overrides: Optional[Mapping[str, Any]] = None,
              config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Train a segmentor: the `SEG_TRAIN` table's defaults <- `config_path` <- `overrides`.

    Returns the final figures on rank 0 (None on other ranks): val_mIoU, val_mAcc, val_aAcc,
    best_val_mIoU, best_iter, iters, train_loss, checkpoint (best.pth), last_checkpoint, output, ..."""
    found: Dict[str, Any] = {}  # the data the prepare step found (one look at the folders)
    with open_run(SEG_TRAIN, overrides, config_path, lambda cfg: f"seg-{cfg['model']}",
                  lambda cfg: _prepare_train(cfg, found)) as run:
        return SegmentationTask(run, found).train()


class SegmentationTask(DenseTask):
    """UperNet on a plain backbone, trained as mmsegmentation trains it (on the dense template)."""

    command, task_name, what, score_name = "seg train", "segmentation", _PAIRS, "mIoU"
    generated = DIGIT_SCENES
    curves, shown = _CURVES, _SHOWN
    loss_parts = ("loss_decode", "loss_aux")
    min_batch = 2  # BatchNorm in the heads
    collate = staticmethod(collate_pad)

    def find_data(self, run_dir: Optional[str]) -> Dict[str, Any]:
        cfg = self.cfg
        root = _data_root(cfg, run_dir)
        train_split, val_split = _splits(cfg, "generic")
        names = _class_names(root, "generic")
        cfg["num_classes"] = cfg.get("num_classes") or len(names)
        return dict(root=root, layout="generic", classes=names, train=find_pairs(root, "generic", train_split),
                    val=find_pairs(root, "generic", val_split))

    def datasets(self, data: Mapping[str, Any]) -> Tuple[Dataset, Dataset]:
        cfg = self.cfg
        self.class_names = list(data["classes"])
        reduce_zero = _reduce_zero_label(cfg, data["layout"])
        n = cfg["num_classes"]
        return (SegmentationDataset(data["train"], n, _train_transform(cfg), reduce_zero, skip_bad=True),
                SegmentationDataset(data["val"], n, _test_transform(cfg), reduce_zero, skip_bad=True))

    def build_model(self, num_classes: int) -> nn.Module:
        return _build(self.cfg, num_classes)

    def load_init(self, model: nn.Module, path: str) -> None:
        _load_weights(model, path, "init_checkpoint", whole_only=False)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.dist.distributed and self.dist.device.type == "cuda":  # mmseg's SyncBN; gloo (CPU) has none
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def check_batch(self, batch: int) -> None:
        if batch < 2 and not (self.dist.distributed and self.dist.device.type == "cuda"):  # SyncBN spans processes
            raise UserError(f"batch_size {batch}: the heads' BatchNorm needs at least 2 images per step in one "
                            "process (a 1x1 pooled map has one value per channel); set batch_size >= 2")

    def describe(self, data: Mapping[str, Any]) -> str:
        return f"{self.cfg['model']} + UperNet"

    def make_val_loader(self, dataset: Dataset) -> DataLoader:
        return _val_loader(dataset, self.cfg, self.dist)

    def losses(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        return model.losses(images, masks)

    def evaluate(self, model: nn.Module, count: int) -> Tuple[Dict[str, Any], float]:
        scores = evaluate_segmentor(model, self.val_loader, self.dist, self.cfg, self.class_names, desc=f"val {count}")
        self.check_val_bad(scores["bad_images"], len(self.val_ds), "in the validation set")
        return _score_row(scores), float(scores["mIoU"])


# ----------------------------------------------------------------------------------------------- eval / predict
def _model_for(cfg: Dict[str, Any], ckpt: Optional[Mapping[str, Any]], class_names: Optional[List[str]],
               device: torch.device) -> Tuple[Segmentor, List[str]]:
    return model_for(cfg, ckpt, class_names, device, lambda n: _build(cfg, n),
                     lambda model: _load_weights(model, ckpt, cfg["checkpoint"], whole_only=True), False, "segmentor")


def segmentor_for(cfg: Dict[str, Any], ckpt: Optional[Mapping[str, Any]], class_names: Optional[List[str]],
                  device: torch.device) -> Tuple[Segmentor, List[str]]:
    """The segmentor of a `seg train` config with the checkpoint's weights, and its class names (for export)."""
    return _model_for(cfg, ckpt, class_names, device)


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
        check_bad_samples(scores["bad_images"], len(dataset), cfg, _PAIRS, f"in {split}")
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
        make_dir(out_dir)  # a WriteError naming the folder when it cannot be made
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
