"""Object detection and instance segmentation: `det train`, `det eval`, `det predict` (Cascade Mask R-CNN or
Mask R-CNN on an LBVim / Vim / uVim backbone with ViTDet's simple feature pyramid).

The paper's COCO setting (docs/detection.md), counted in iterations as mmdetection counts them, on the
shared iteration loop (`iterations`: exact resume, atomic last.pth / best.pth at the best validation box
AP, a NaN loss that stops before any checkpoint is touched, unreadable images skipped and counted under
`max_bad_fraction`). Data: COCO-format JSON through `CocoDetectionDataset`, large-scale jitter for
training; scores: pycocotools' COCOeval (box and mask AP) on the predictions mapped back to each file's size.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..data import DataError, read_image
from ..data.detection import (
    CocoDetectionDataset,
    LSJTestTransform,
    LSJTrainTransform,
    collate_detection,
    digit_detection_paths,
    rescale_prediction,
    write_digit_detection,
)
from ..models import DETECTOR_KINDS, FEATURE_SOURCES, Detector, build_detector, load_detector_weights
from .coco_eval import COCO_METRICS, coco_evaluate, to_coco_results
from .config import Key
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
from .distributed import DistInfo, all_reduce_sum, broadcast_object, gather_objects, session
from .errors import UserError, user_errors
from .files import atomic_path, make_dir, write_text
from .loaders import check_bad_samples
from .models import check_model_name
from .records import progress
from .run_keys import INFERENCE_AMP
from .runs import note, open_run
from .schedule import SCHEDULES
from .segmentation import SEG_TRAIN

__all__ = ["DET_TRAIN", "DET_EVAL", "DET_PREDICT", "train_det", "evaluate_det", "predict_det", "evaluate_detector",
           "DetectionTask", "detection_losses", "DIGIT_DETECTION", "LAYER_DECAY_MODES"]

DIGIT_DETECTION = "digit_scenes"
#: the generated set `det train` uses with no data arguments (scenes of 96-160 px, 1-5 digits of 16-64 px)
DIGIT_DETECTION_SET = dict(n_train=1000, n_val=100, seed=0)
LAYER_DECAY_MODES = ("lbmamba", "per_layer", "off")
#: COCO 2017's file names under a `data` folder
COCO_SPLITS = {"train": ("train2017", "annotations/instances_train2017.json"),
               "val": ("val2017", "annotations/instances_val2017.json")}


def _check_det(cfg: Dict[str, Any]) -> None:
    if "lsj_ratio" in cfg and (len(cfg["lsj_ratio"]) != 2 or not 0 < cfg["lsj_ratio"][0] <= cfg["lsj_ratio"][1]):
        raise UserError(f"config key 'lsj_ratio' must be two numbers 0 < low <= high, got {cfg['lsj_ratio']!r}")
    if "max_bad_fraction" in cfg and not 0.0 <= cfg["max_bad_fraction"] <= 1.0:
        raise UserError(f"config key 'max_bad_fraction' must be in [0, 1], got {cfg['max_bad_fraction']!r}")
    if "warmup_iters" in cfg and "iters" in cfg and cfg["warmup_iters"] >= cfg["iters"]:
        raise UserError(f"warmup_iters ({cfg['warmup_iters']}) must be less than iters ({cfg['iters']})")
    if "layer_decay" in cfg and not 0 < cfg["layer_decay"] <= 1:
        raise UserError(f"config key 'layer_decay' must be in (0, 1], got {cfg['layer_decay']!r}")
    if cfg.get("lr_steps") and any(s <= 0 for s in cfg["lr_steps"]):
        raise UserError(f"config key 'lr_steps' must be positive iterations, got {cfg['lr_steps']!r}")
    if "hflip" in cfg and not 0 <= cfg["hflip"] <= 1:
        raise UserError(f"config key 'hflip' must be a probability in [0, 1], got {cfg['hflip']!r}")


_SHARED = ["global_batch_size", "grad_accum", "betas", "warmup_ratio", "poly_power", "min_lr", "save_every",
           "log_every", "workers", "max_bad_images", "amp", "device", "seed", "overwrite", "resume", "progress", "log",
           "threads", "allow_config_change", "stop_after_iters", "debug_nan_iter", "debug_dump_rank_state"]

# The defaults are the shipped run: a small LBVim + Cascade Mask R-CNN on the generated digit scenes (CPU,
# minutes). configs/det/ holds the paper's COCO recipes.
DET_TRAIN = SEG_TRAIN.derive("det train", _SHARED, changes={
    "save_every": dict(default=200),
    "warmup_ratio": dict(default=0.001, help="learning-rate factor at the start of the warm-up (LBMamba: 0.001)"),
}, extra={
    # model
    "model": Key("lbvim_tiny_patch16_224", "backbone: timm model name (lbvim_*, vim_*, uvim_*, vmamba_*, or a timm "
                 "model with forward_intermediates)", flag=True, effect="model"),
    "model_kwargs": Key({"embed_dim": 64, "depth": 4, "patch_size": 8},
                        "extra backbone constructor arguments (embed_dim, depth, patch_size, ...)", effect="model"),
    "kind": Key("cascade_mask_rcnn", "cascade_mask_rcnn (3 stages, LBMamba) or mask_rcnn (one stage)",
                choices=DETECTOR_KINDS, flag=True, effect="model"),
    "img_size": Key(128, "the LSJ square side: training crops and padded test images (COCO: 1024)", positive=True,
                    flag=True, effect="model"),
    "feature_source": Key(None, "what the last layer gives: mixer (the block's mixer output, LBMamba) or residual; "
                          "null: mixer where the backbone offers it", kind="str", choices=FEATURE_SOURCES,
                          effect="model"),
    "backbone_norm": Key("rmsnorm", "the backbone's norms: rmsnorm (LBMamba's detection config) or layernorm",
                         choices=("rmsnorm", "layernorm"), effect="model"),
    "drop_path": Key(0.0, "stochastic depth rate of the backbone (COCO: 0.1)", low=0),
    "out_channels": Key(64, "pyramid channels (COCO: 256)", positive=True, effect="model"),
    "head_conv_channels": Key(64, "box and mask head conv channels (COCO: 256)", positive=True, effect="model"),
    "head_fc_channels": Key(256, "box head fc width (COCO: 1024)", positive=True, effect="model"),
    "with_mask": Key(True, "mask heads (instance segmentation); false: boxes only", effect="model"),
    "rois_per_image": Key(64, "RoIs sampled per image at each stage, 25 % positives (COCO: 512)", positive=True),
    "rpn_pre_nms_top_n_train": Key(500, "RPN proposals per level before NMS in training (COCO: 2000)",
                                   positive=True),
    "rpn_post_nms_top_n_train": Key(500, "RPN proposals kept after NMS in training (COCO: 2000)", positive=True),
    "rpn_pre_nms_top_n_test": Key(500, "RPN proposals per level before NMS at test (COCO: 1000)", positive=True),
    "rpn_post_nms_top_n_test": Key(300, "RPN proposals kept after NMS at test (COCO: 1000)", positive=True),
    "score_thresh": Key(0.05, "test: drop detections scoring below this", low=0),
    "nms_thresh": Key(0.5, "test: per-class NMS IoU", low=0),
    "detections_per_img": Key(100, "test: detections kept per image", positive=True),
    "num_classes": Key(None, "object classes (null: from the data)", kind="int", positive=True, effect="model"),
    "init_checkpoint": Key(None, "start the backbone from these classification weights (ours or a reference "
                           "{'model': ...} file), or the whole detector from one of our detector checkpoints",
                           kind="str", flag=True),
    # data
    "data": Key(DIGIT_DETECTION, f"'{DIGIT_DETECTION}' (generated into the run folder) or a folder; with COCO's "
                "file names (train2017/, val2017/, annotations/instances_*2017.json) nothing else is needed",
                nullable=True, flag=True),
    "train_images": Key(None, "training image folder, relative to data (null: COCO's train2017)", kind="str"),
    "train_annotations": Key(None, "training instances JSON, relative to data (null: COCO's)", kind="str"),
    "val_images": Key(None, "validation image folder, relative to data (null: COCO's val2017)", kind="str"),
    "val_annotations": Key(None, "validation instances JSON, relative to data (null: COCO's)", kind="str"),
    "lsj_ratio": Key([0.5, 1.5], "large-scale jitter: resize ratio range of the img_size square (COCO: 0.1,2)",
                     kind="float_list"),
    "hflip": Key(0.0, "horizontal flip probability (COCO: 0.5; digits are not mirror images)", low=0),
    "max_bad_fraction": Key(0.01, "fail when more than this fraction of the images drawn, and more than "
                            "max_bad_images, are unreadable", flag=True, effect="none"),
    # optimisation
    "batch_size": Key(8, "images per process per step (COCO: 64 in all)", positive=True, flag=True),
    "iters": Key(300, "optimizer steps (COCO: 184375)", positive=True, flag=True),
    "lr": Key(2e-3, "peak learning rate (COCO: 1e-4)", positive=True, flag=True),
    "weight_decay": Key(0.05, "AdamW weight decay, except on the model's no_weight_decay names", low=0),
    "layer_decay_mode": Key("lbmamba", "layer-wise lr decay: lbmamba (as LBMamba's run: its Mamba-layer branch is "
                            "commented out, so the patch and position embeddings get layer_decay^13 and every "
                            "other parameter 1), per_layer (the intended decay: layer i of n gets "
                            "layer_decay^(n - i)), off", choices=LAYER_DECAY_MODES),
    "layer_decay": Key(0.7, "the layer-wise decay rate", positive=True),
    "schedule": Key("warmup_then_step", "warmup_then_step: linear warm-up, then x lr_gamma at each of lr_steps "
                    "(mmdet, LBMamba); or a poly schedule as `seg train`", choices=SCHEDULES),
    "lr_steps": Key([270], "iterations where the lr is multiplied by lr_gamma (COCO: 163889, 177546)",
                    kind="int_list"),
    "lr_gamma": Key(0.1, "lr factor at each of lr_steps", positive=True),
    "warmup_iters": Key(30, "linear warm-up iterations (COCO: 250)", low=0),
    "clip_grad": Key(35.0, "clip the gradient norm at this value (LBMamba: 35; null: off)", kind="float",
                     positive=True),
    # evaluation
    "eval_every": Key(300, "validate every N iterations (and after the last)", positive=True),
    "mask_threshold": Key(0.5, "a pixel belongs to a predicted mask where its probability is at least this",
                          low=0),
    "eval_backend": Key("pycocotools", "COCOeval implementation: pycocotools (the reference), faster "
                        "(faster-coco-eval, same numbers) or auto", choices=("pycocotools", "faster", "auto")),
    "output": Key(None, "the run folder (null: runs/<time>-det-<model>); a folder holding a run is refused unless "
                  "overwrite", kind="str", flag=True, effect="none"),
}, check=_check_det)

_MODEL_KEYS = ["model", "model_kwargs", "kind", "img_size", "feature_source", "backbone_norm", "out_channels",
               "head_conv_channels", "head_fc_channels", "with_mask", "rpn_pre_nms_top_n_test",
               "rpn_post_nms_top_n_test", "score_thresh", "nms_thresh", "detections_per_img", "num_classes"]
_EVAL_KEYS = _MODEL_KEYS + ["data", "val_images", "val_annotations", "mask_threshold", "eval_backend", "batch_size",
                            "workers", "max_bad_fraction", "max_bad_images", "amp", "device", "threads", "progress"]
#: `lbmamba det eval`: what the checkpoint's run used, unless given
DET_EVAL = DET_TRAIN.derive(
    "det eval", _EVAL_KEYS, changes={"data": dict(default=None), "amp": INFERENCE_AMP},
    extra={"checkpoint": Key(None, "weights to evaluate: our last.pth / best.pth", kind="str", flag=True),
           "images": Key(None, "image folder to score (null: val_images)", kind="str", flag=True),
           "annotations": Key(None, "instances JSON to score against (null: val_annotations)", kind="str",
                              flag=True),
           "results_json": Key(None, "also write the COCO results (detections) here", kind="str", flag=True),
           "allow_class_mismatch": ALLOW_CLASS_MISMATCH},
    check=_check_det)
#: `lbmamba det predict`: the model keys and the drawing keys
DET_PREDICT = DET_TRAIN.derive(
    "det predict", _MODEL_KEYS + ["mask_threshold", "amp", "device", "threads", "progress"],
    changes={"amp": INFERENCE_AMP},
    extra={"checkpoint": DET_EVAL.keys["checkpoint"],
           "inputs": Key(None, "an image, or a folder of images", kind="str", flag=True),
           "output": Key("predictions", "folder for <stem>_detections.png and detections.json", flag=True),
           "draw_threshold": Key(0.5, "draw detections scoring at least this", low=0, flag=True),
           "class_names": Key(None, "class names, background first (null: from the checkpoint)", kind="str_list"),
           "allow_class_mismatch": ALLOW_CLASS_MISMATCH, "random_weights": RANDOM_WEIGHTS},
    check=_check_det)
#: the keys `det eval` / `det predict` take from one of our checkpoints
_FROM_CHECKPOINT = tuple(_MODEL_KEYS) + ("data", "val_images", "val_annotations", "mask_threshold")
_CURVES = [("loss", "loss", [("train_loss", "train"), ("train_loss_rpn", "RPN"), ("train_loss_cls", "classes"),
                             ("train_loss_box", "boxes"), ("train_loss_mask", "masks")]),
           ("validation", "AP", [("val_box_AP", "box AP"), ("val_box_AP50", "box AP50"), ("val_mask_AP", "mask AP")])]
_SHOWN = ("iter", "train_loss", "val_box_AP", "val_box_AP50", "val_mask_AP", "lr", "seconds")
_LOSS_PARTS = ("loss_rpn", "loss_cls", "loss_box", "loss_mask")


# ----------------------------------------------------------------------------------------------- model
def _build(cfg: Mapping[str, Any], num_classes: int) -> Detector:
    check_model_name(cfg["model"])
    try:
        return build_detector(
            cfg["model"], num_classes, kind=cfg["kind"], img_size=cfg["img_size"],
            backbone_kwargs=dict(cfg.get("model_kwargs") or {}), feature_source=cfg.get("feature_source"),
            backbone_norm=cfg["backbone_norm"], drop_path=cfg.get("drop_path", 0.0),
            out_channels=cfg["out_channels"], head_conv_channels=cfg["head_conv_channels"],
            head_fc_channels=cfg["head_fc_channels"], with_mask=cfg["with_mask"],
            rois_per_image=cfg.get("rois_per_image", 512),
            rpn_pre_nms_top_n_train=cfg.get("rpn_pre_nms_top_n_train", 2000),
            rpn_post_nms_top_n_train=cfg.get("rpn_post_nms_top_n_train", 2000),
            rpn_pre_nms_top_n_test=cfg["rpn_pre_nms_top_n_test"],
            rpn_post_nms_top_n_test=cfg["rpn_post_nms_top_n_test"], box_score_thresh=cfg["score_thresh"],
            box_nms_thresh=cfg["nms_thresh"], box_detections_per_img=cfg["detections_per_img"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build a detector on {cfg['model']!r}: {exc}") from exc


def _load_weights(model: Detector, source, name: str, whole_only: bool) -> None:
    load_dense_weights(model, source, name, load_detector_weights, "detector", "detection heads (no rpn.* / "
                       "roi_heads.* weights)", "det train", whole_only)


def detection_losses(model: Detector, images: List[torch.Tensor],
                     targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The detector's training losses summed ("loss") and grouped over the stages: loss_rpn (objectness and
    RPN boxes), loss_cls, loss_box, loss_mask (each already weighted by its stage)."""
    losses = model(images, targets)
    groups: Dict[str, List[torch.Tensor]] = {p: [] for p in _LOSS_PARTS}
    for name, value in losses.items():
        if name in ("loss_objectness", "loss_rpn_box_reg"):
            groups["loss_rpn"].append(value)
        else:
            groups["loss_" + name[len("loss_"):].split("_")[0].replace("classifier", "cls")].append(value)
    out = {p: torch.stack(v).sum() for p, v in groups.items() if v}
    out["loss"] = torch.stack(list(losses.values())).sum()
    return out


# ----------------------------------------------------------------------------------------------- data
def _data_root(cfg: Mapping[str, Any], run_dir: Optional[str]) -> str:
    """The data folder: a user folder, or the digit scenes written once (into the run folder when there is one)."""
    return generated_data_root(cfg, run_dir, DIGIT_DETECTION, "lbmamba-digit-detection",
                               lambda root: write_digit_detection(root, **DIGIT_DETECTION_SET),
                               "a folder with COCO-format annotations")


def _split_paths(cfg: Mapping[str, Any], root: str, split: str, images: Optional[str] = None,
                 annotations: Optional[str] = None) -> Tuple[str, str]:
    """(image folder, instances JSON) of `split`, checked to exist."""
    if str(cfg.get("data")) == DIGIT_DETECTION or os.path.isfile(os.path.join(root, "digit_detection.json")):
        default_images, default_ann = (str(p) for p in digit_detection_paths(root, split))
    else:
        default_images, default_ann = COCO_SPLITS[split]
    image_dir = os.path.join(root, images or cfg.get(f"{split}_images") or default_images)
    ann_file = os.path.join(root, annotations or cfg.get(f"{split}_annotations") or default_ann)
    if not os.path.isfile(ann_file):
        raise DataError(f"{split} annotations not found: {ann_file} (set {split}_annotations, a path relative to "
                        f"{root})")
    if not os.path.isdir(image_dir):
        raise DataError(f"{split} image folder not found: {image_dir} (set {split}_images)")
    return image_dir, ann_file


def _val_loader(dataset: CocoDetectionDataset, cfg: Mapping[str, Any], dist: DistInfo) -> DataLoader:
    return eval_loader(dataset, cfg, dist, cfg["batch_size"], collate_detection,
                       str(cfg.get("data")) == DIGIT_DETECTION)


def _to_device(batch: Tuple, device: torch.device) -> Tuple:
    images, targets = batch
    return ([x.to(device, non_blocking=True) for x in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_detector(model: Detector, dataset: CocoDetectionDataset, loader: DataLoader, dist: DistInfo,
                      cfg: Mapping[str, Any], desc: str = "eval") -> Dict[str, Any]:
    """Box (and mask) AP, AP50, AP75, APs, APm, APl of `model` over `loader`'s images against the dataset's
    JSON, as COCOeval scores them: predictions mapped back to each file's size and gathered from every rank;
    images that could not be read count as misses. Also `results` (the COCO result dicts, rank 0), images,
    bad_images, images_per_s."""
    device = dist.device
    was_training = model.training
    model.eval()
    results: List[dict] = []
    counts = torch.zeros(2, dtype=torch.float64)  # images, bad
    start = time.perf_counter()
    for images, targets, bad in progress(loader, desc=desc, enabled=cfg.get("progress", False) and dist.is_main):
        counts[1] += bad
        if not images:
            continue
        with autocast(device, cfg.get("amp")):
            outputs = model([x.to(device) for x in images])
        outputs = [rescale_prediction({k: v.float().cpu() for k, v in o.items()}, t["img_size"], t["orig_size"])
                   for o, t in zip(outputs, targets)]
        results += to_coco_results(outputs, [int(t["image_id"]) for t in targets], dataset.label_to_category_id,
                                   cfg["mask_threshold"])
        counts[0] += len(images)
    seconds = time.perf_counter() - start
    all_reduce_sum(counts, dist)
    gathered = gather_objects(results, dist)
    everything = [r for part in gathered for r in part]
    scores: Dict[str, Any] = {}
    if dist.is_main:  # COCOeval once; every rank gets the figures (they decide best.pth together)
        iou_types = ("bbox", "segm") if model.roi_heads.has_mask else ("bbox",)
        scores = coco_evaluate(str(dataset.ann_file), everything, iou_types,
                               backend=cfg.get("eval_backend", "pycocotools"))
    scores = dict(broadcast_object(scores, dist), results=everything)
    model.train(was_training)
    scores.update(images=int(counts[0]), bad_images=int(counts[1]), seconds=seconds,
                  images_per_s=counts[0].item() / max(seconds, 1e-9))
    return scores


def _score_row(scores: Mapping[str, Any], prefix: str = "val_") -> Dict[str, float]:
    row = {}
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        for metric in COCO_METRICS:
            if iou_type in scores:
                row[f"{prefix}{name}_{metric}"] = round(float(scores[iou_type][metric]), 6)
    return row


# ----------------------------------------------------------------------------------------------- training
def _prepare_train(cfg: Dict[str, Any], found: Dict[str, Any]) -> Dict[str, Any]:
    """Check the model and the data before the run folder exists; fill in what the data decides."""
    check_model_name(cfg["model"])
    if str(cfg["data"]) == DIGIT_DETECTION:  # written into the run folder once it exists
        return cfg
    root = _data_root(cfg, None)
    found.update(root=root, train=_split_paths(cfg, root, "train"), val=_split_paths(cfg, root, "val"))
    return cfg


@user_errors()
def train_det(overrides: Optional[Mapping[str, Any]] = None,
              config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Train a detector: the `DET_TRAIN` table's defaults <- `config_path` <- `overrides`.

    Returns the final figures on rank 0 (None on other ranks): val_box_AP, val_box_AP50, ..., val_mask_AP, ...,
    best_val_box_AP, best_iter, iters, train_loss, checkpoint (best.pth), last_checkpoint, output, ..."""
    found: Dict[str, Any] = {}
    with open_run(DET_TRAIN, overrides, config_path, lambda cfg: f"det-{cfg['model']}",
                  lambda cfg: _prepare_train(cfg, found)) as run:
        return DetectionTask(run, found).train()


class DetectionTask(DenseTask):
    """(Cascade) Mask R-CNN on a plain backbone, trained as mmdetection trains it (on the dense template)."""

    command, task_name, what, score_name = "det train", "detection", "images", "box_AP"
    generated = DIGIT_DETECTION
    curves, shown = _CURVES, _SHOWN
    loss_parts = _LOSS_PARTS
    collate = staticmethod(collate_detection)

    def find_data(self, run_dir: Optional[str]) -> Dict[str, Any]:
        root = _data_root(self.cfg, run_dir)
        return dict(root=root, train=_split_paths(self.cfg, root, "train"), val=_split_paths(self.cfg, root, "val"))

    def datasets(self, data: Mapping[str, Any]):
        cfg, size = self.cfg, self.cfg["img_size"]
        train_ds = CocoDetectionDataset(*data["train"], LSJTrainTransform(size, tuple(cfg["lsj_ratio"]), cfg["hflip"]),
                                        skip_bad=True)
        val_ds = CocoDetectionDataset(*data["val"], LSJTestTransform(size), skip_bad=True)
        self.class_names = train_ds.class_names
        if val_ds.class_names != self.class_names:
            raise UserError(f"the training and validation JSONs have different categories: {self.class_names[1:]} "
                            f"vs {val_ds.class_names[1:]}")
        num_classes = len(self.class_names) - 1
        if cfg.get("num_classes") and cfg["num_classes"] != num_classes:
            raise UserError(f"num_classes is {cfg['num_classes']} but {data['train'][1]} has {num_classes} "
                            "categories")
        cfg["num_classes"] = num_classes
        if self.dist.is_main and (train_ds.removed_boxes or train_ds.crowd_count or train_ds.nonfinite_boxes
                                  or train_ds.degenerate_polygons):
            note(f"{data['train'][1]}: {train_ds.removed_boxes} zero-size / out-of-image boxes, "
                 f"{train_ds.nonfinite_boxes} boxes with NaN / infinite numbers and {train_ds.degenerate_polygons} "
                 f"polygons of fewer than three points removed, {train_ds.crowd_count} crowd annotations left out "
                 "of training")
        self.label_to_category_id = dict(train_ds.label_to_category_id)
        return train_ds, val_ds

    def build_model(self, num_classes: int) -> nn.Module:
        return _build(self.cfg, num_classes)

    def load_init(self, model: nn.Module, path: str) -> None:
        _load_weights(model, path, "init_checkpoint", whole_only=False)

    def describe(self, data: Mapping[str, Any]) -> str:
        return f"{self.cfg['model']} + {self.cfg['kind']}"

    def make_val_loader(self, dataset) -> DataLoader:
        return _val_loader(dataset, self.cfg, self.dist)

    def to_device(self, inputs: Tuple) -> Tuple:
        return _to_device(inputs, self.dist.device)

    def losses(self, model: nn.Module, images, targets) -> Dict[str, torch.Tensor]:
        return detection_losses(model, images, targets)

    def evaluate(self, model: nn.Module, count: int) -> Tuple[Dict[str, Any], float]:
        scores = evaluate_detector(model, self.val_ds, self.val_loader, self.dist, self.cfg, desc=f"val {count}")
        self.check_val_bad(scores["bad_images"], len(self.val_ds), "in the validation set")
        return _score_row(scores), float(scores["bbox"]["AP"])

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {**super().checkpoint_extra(), "label_to_category_id": self.label_to_category_id}

    def result_extra(self) -> Dict[str, Any]:
        return {"kind": self.cfg["kind"]}


# ----------------------------------------------------------------------------------------------- eval / predict
def _model_for(cfg: Dict[str, Any], ckpt: Optional[Mapping[str, Any]], names: Optional[Sequence[str]],
               device: torch.device) -> Tuple[Detector, List[str]]:
    """The detector of `cfg` with the checkpoint's weights, and its class names (background first)."""
    return model_for(cfg, ckpt, names, device, lambda n: _build(cfg, n),
                     lambda model: _load_weights(model, ckpt, cfg["checkpoint"], whole_only=True), True, "detector")


@user_errors()
def evaluate_det(overrides: Optional[Mapping[str, Any]] = None,
                 config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Score `checkpoint` on a COCO-format set (default: the run's validation set): box and mask AP, AP50,
    AP75, APs, APm, APl. Returns None on ranks other than 0."""
    cfg, ckpt = config_from_checkpoint(DET_EVAL, config_path, overrides, _FROM_CHECKPOINT, DIGIT_DETECTION)
    with session(cfg["device"], cfg["threads"], "det eval") as dist:
        root = _data_root(cfg, None)
        image_dir, ann_file = _split_paths(cfg, root, "val", cfg.get("images"), cfg.get("annotations"))
        dataset = CocoDetectionDataset(image_dir, ann_file, LSJTestTransform(cfg["img_size"]), skip_bad=True)
        model, names = _model_for(cfg, ckpt, dataset.class_names, dist.device)
        if len(dataset.class_names) != len(names):
            raise UserError(f"{ann_file} has {len(dataset.class_names) - 1} categories, the model {len(names) - 1}")
        if len(dataset) == 0:
            raise UserError(f"no images to evaluate in {ann_file}")
        scores = evaluate_detector(model, dataset, _val_loader(dataset, cfg, dist), dist, cfg)
        check_bad_samples(scores["bad_images"], len(dataset), cfg, "images", f"in {image_dir}")
        if not dist.is_main:
            return None
        if cfg.get("results_json"):
            write_text(cfg["results_json"], json.dumps(scores["results"]))
        return {**{k: round(float(v), 6) for k, v in _score_row(scores, "").items()},
                "detections": len(scores["results"]), "images": scores["images"], "bad_images": scores["bad_images"],
                "images_per_s": round(scores["images_per_s"], 3), "model": cfg["model"], "kind": cfg["kind"],
                "checkpoint": cfg.get("checkpoint"), "annotations": ann_file, "device": str(dist.device)}


def draw_detections(rgb: np.ndarray, prediction: Mapping[str, torch.Tensor], names: Sequence[str],
                    colours: np.ndarray, mask_threshold: float = 0.5, alpha: float = 0.5):
    """A PIL image of `rgb` with each detection's mask blended in its class colour, its box and a
    "name score" label."""
    from PIL import Image, ImageDraw

    canvas = rgb.astype(np.float32)
    masks = prediction.get("masks")
    for k in range(len(prediction["boxes"])):
        colour = colours[int(prediction["labels"][k])].astype(np.float32)
        if masks is not None:
            inside = (masks[k].reshape(masks.shape[-2:]) >= mask_threshold).numpy()
            canvas[inside] = canvas[inside] * (1 - alpha) + colour * alpha
    image = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for k in range(len(prediction["boxes"])):
        label = int(prediction["labels"][k])
        colour = tuple(int(c) for c in colours[label])
        x1, y1, x2, y2 = (float(v) for v in prediction["boxes"][k])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(1, round(min(rgb.shape[:2]) / 200)))
        text = f"{names[label]} {float(prediction['scores'][k]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        top_y = max(0.0, y1 - (bottom - top) - 2)
        draw.rectangle([x1, top_y, x1 + (right - left) + 2, top_y + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 1, top_y), text, fill=(0, 0, 0) if sum(colour) > 380 else (255, 255, 255))
    return image


@user_errors()
def predict_det(overrides: Optional[Mapping[str, Any]] = None,
                config_path: Optional[str] = None) -> Dict[str, Any]:
    """Detect objects in each input image: <output>/<stem>_detections.png (masks, boxes and "class score"
    labels of the detections scoring at least draw_threshold) and <output>/detections.json (every detection:
    file, class, score, box x1 y1 x2 y2 in the file's pixels)."""
    cfg, ckpt = config_from_checkpoint(DET_PREDICT, config_path, overrides, _FROM_CHECKPOINT, DIGIT_DETECTION)
    images = input_images(cfg.get("inputs"))
    with session(cfg["device"], cfg["threads"], "det predict", distributed=False) as dist:
        model, names = _model_for(cfg, ckpt, None, dist.device)
        colours = class_palette(names)
        transform = LSJTestTransform(cfg["img_size"])
        out_dir = os.path.abspath(os.path.expanduser(cfg["output"]))
        make_dir(out_dir)  # a WriteError naming the folder when it cannot be made
        listing, counts = [], {}
        start = time.perf_counter()
        for path in progress(images, desc="predict", enabled=cfg["progress"]):
            rgb = read_image(path)  # DataError naming the file: one line, as every bad input
            empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                     "masks": np.zeros((0, *rgb.shape[:2]), np.uint8), "image_id": np.int64(0),
                     "iscrowd": np.zeros(0, np.int64), "area": np.zeros(0, np.float32)}
            tensor, target = transform(rgb, empty)
            with torch.no_grad(), autocast(dist.device, cfg.get("amp")):
                output = model([tensor.to(dist.device)])[0]
            output = rescale_prediction({k: v.float().cpu() for k, v in output.items()}, target["img_size"],
                                        target["orig_size"])
            keep = output["scores"] >= cfg["draw_threshold"]
            shown = {k: v[keep] for k, v in output.items()}
            picture = draw_detections(rgb, shown, names, colours, cfg["mask_threshold"])
            with atomic_path(os.path.join(out_dir, f"{path.stem}_detections.png")) as tmp:
                picture.save(tmp, format="PNG")
            for k in range(len(shown["boxes"])):
                name = names[int(shown["labels"][k])]
                counts[name] = counts.get(name, 0) + 1
                listing.append({"file": path.name, "class": name, "score": round(float(shown["scores"][k]), 4),
                                "box": [round(float(v), 2) for v in shown["boxes"][k]]})
        write_text(os.path.join(out_dir, "detections.json"), json.dumps(listing, indent=1))
        seconds = time.perf_counter() - start
    return {"images": len(images), "output": out_dir, "detections": len(listing), "model": cfg["model"],
            "checkpoint": cfg.get("checkpoint"), "seconds": round(seconds, 3), "detections_per_class": counts}
