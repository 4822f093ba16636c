"""`lbmamba export` (a checkpoint or a timm model -> a verified model.onnx) and `lbmamba predict` (top-k classes
of images, through PyTorch or onnxruntime). See docs/deploy.md."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..data import DIGITS_CLASSES
from ..models import load_checkpoint, unwrap_state_dict
from .classification import TRAIN
from .config import ConfigTable, Key
from .dense import input_images
from .detection import DET_TRAIN
from .distributed import session
from .errors import UserError, user_errors
from .files import atomic_path
from .mil import MIL_TRAIN
from .models import create_classifier
from .runs import load_training_checkpoint
from .segmentation import SEG_TRAIN, segmentor_for

__all__ = ["EXPORT", "PREDICT", "export_model", "predict", "checkpoint_task", "preprocess_image"]

_WRITER = {"classification": "train", "segmentation": "seg train", "detection": "det train", "mil": "mil train"}
TASKS = ("auto", "classification", "segmentation")
_TASK_TABLES = (("classification", TRAIN), ("segmentation", SEG_TRAIN), ("detection", DET_TRAIN), ("mil", MIL_TRAIN))

EXPORT = ConfigTable("export", {
    "checkpoint": Key(None, "one of our checkpoints (last.pth / best.pth of train or seg train), or a weights file "
                      "for --model (null: random weights)", kind="str", flag=True),
    "model": Key(None, "timm model name (null: the one the checkpoint recorded)", kind="str", flag=True),
    "model_kwargs": Key({}, "extra model constructor arguments (null entries: the checkpoint's)"),
    "task": Key("auto", "auto (from the checkpoint), classification or segmentation", choices=TASKS, flag=True),
    "img_size": Key(None, "input size in pixels (null: the checkpoint's / the model's); fixed in the file, and "
                    "with it the LB window", kind="int", positive=True, flag=True),
    "in_chans": Key(None, "image channels (null: the checkpoint's, else 3)", kind="int", positive=True),
    "num_classes": Key(None, "classes (null: the checkpoint's, else the model's default)", kind="int", positive=True),
    "class_names": Key(None, "class names stored in the file (null: the checkpoint's)", kind="str_list"),
    "output": Key("model.onnx", "the ONNX file to write", flag=True),
    "quantize": Key("none", "none, or dynamic: int8 MatMul weights (onnxruntime dynamic quantisation)",
                    choices=("none", "dynamic"), flag=True),
    "tolerance": Key(1e-4, "largest relative difference to PyTorch accepted (fp32)", positive=True, flag=True),
    "opset": Key(18, "ONNX opset", positive=True),
    "threads": Key(None, "CPU threads (null: the default)", kind="int", positive=True, effect="none"),
})

PREDICT = ConfigTable("predict", {
    "checkpoint": Key(None, "a classifier checkpoint (.pth / .safetensors) or an exported model.onnx", kind="str",
                      flag=True),
    "model": Key(None, "timm model name for a weights file without our config", kind="str", flag=True),
    "model_kwargs": Key({}, "extra model constructor arguments"),
    "img_size": Key(None, "input size (null: the checkpoint's)", kind="int", positive=True, flag=True),
    "engine": Key("auto", "torch, onnxruntime, or auto (onnxruntime for a .onnx file, else torch)",
                  choices=("auto", "torch", "onnxruntime"), flag=True),
    "inputs": Key(None, "an image, or a folder of images", kind="str", flag=True),
    "top_k": Key(5, "classes listed per image", positive=True, flag=True),
    "output": Key("predictions.csv", "CSV file: image, then class and score for each of the top k", flag=True),
    "batch_size": Key(16, "images per forward pass", positive=True, flag=True),
    "threads": Key(None, "CPU threads (null: the default)", kind="int", positive=True, effect="none"),
})


# ----------------------------------------------------------------------------------------------- the model
def checkpoint_task(ckpt: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The command that wrote one of our checkpoints ("classification", "segmentation", "detection", "mil"), from
    the keys of its config: the table holding all of them (the smallest such); None without a config."""
    saved = (ckpt or {}).get("config") if isinstance(ckpt, Mapping) else None
    if not isinstance(saved, Mapping):
        return None
    keys = set(saved)
    fits = [(len(table.keys), task) for task, table in _TASK_TABLES if keys <= set(table.keys)]
    if fits:
        return min(fits)[1]
    best = max(_TASK_TABLES, key=lambda item: len(keys & set(item[1].keys)))
    return best[0]


def _patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The patch size of the model's (first) patch embedding, or None for a model without one."""
    for module in model.modules():
        size = getattr(module, "patch_size", None)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2):
            size = (size, size) if isinstance(size, int) else size
            return int(size[0]), int(size[1])
    return None


def _check_divisible(model: nn.Module, img_size: int, name: str) -> None:
    patch = _patch_size(model)
    if patch is not None and (img_size % patch[0] or img_size % patch[1]):
        raise UserError(f"img_size must be a multiple of {name}'s patch size {patch[0]}, got {img_size}")


def _preprocessing(cfg: Mapping[str, Any], saved: Mapping[str, Any], model: nn.Module, img_size: int,
                   in_chans: int) -> Dict[str, Any]:
    """mean, std, interpolation and crop fraction the model was trained with (values scaled to [0, 1] first)."""
    if saved.get("data") == "digits":
        return {"mean": [0.5] * in_chans, "std": [0.5] * in_chans, "interpolation": "bilinear", "crop_pct": 1.0}
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    mean = list(pretrained.get("mean") or (0.485, 0.456, 0.406))
    std = list(pretrained.get("std") or (0.229, 0.224, 0.225))
    if len(mean) != in_chans:
        mean, std = [float(np.mean(mean))] * in_chans, [float(np.mean(std))] * in_chans
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "interpolation": saved.get("interpolation") or pretrained.get("interpolation") or "bicubic",
            "crop_pct": float(saved.get("crop_pct") or pretrained.get("crop_pct") or 0.875)}


def _classifier(cfg: Mapping[str, Any], ckpt: Optional[Mapping[str, Any]], checkpoint: Optional[str]):
    """(model, metadata) of a classifier: from one of our checkpoints' config, or from cfg['model'] (+ weights)."""
    saved = dict((ckpt or {}).get("config") or {})
    name = cfg.get("model") or saved.get("model")
    if not name:
        raise UserError("no model given (set --model NAME; the checkpoint does not record one)")
    kwargs = dict(saved.get("model_kwargs") or {}) if name == saved.get("model") else {}
    kwargs.update(cfg.get("model_kwargs") or {})
    in_chans = cfg.get("in_chans") or saved.get("in_chans") or (1 if saved.get("data") == "digits" else 3)
    img_size = cfg.get("img_size") or saved.get("img_size") or (32 if saved.get("data") == "digits" else None)
    names = list(cfg.get("class_names") or (ckpt or {}).get("class_names") or
                 (DIGITS_CLASSES if saved.get("data") == "digits" else []))
    num_classes = cfg.get("num_classes") or (ckpt or {}).get("num_classes")
    if num_classes is None and ckpt is not None:
        head = [v for k, v in unwrap_state_dict(ckpt).items()
                if k.startswith("head") and k.endswith("weight") and v.dim() == 2]
        num_classes = int(head[-1].shape[0]) if head else None
    num_classes = num_classes or (len(names) if names else 1000)
    model = create_classifier({"model": name, "model_kwargs": kwargs, "in_chans": in_chans, "img_size": img_size},
                              int(num_classes))
    if img_size is None:
        img_size = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    _check_divisible(model, int(img_size), name)
    if ckpt is not None:
        load_checkpoint(model, ckpt, source=checkpoint)
    if names and len(names) != num_classes:
        raise UserError(f"{len(names)} class names for a model with {num_classes} classes")
    meta = {"task": "classification", "model": name, "model_kwargs": kwargs, "num_classes": int(num_classes),
            "class_names": names or [str(i) for i in range(int(num_classes))], "checkpoint": checkpoint,
            **_preprocessing(cfg, saved, model, int(img_size), int(in_chans))}
    return model.eval(), meta, int(img_size), int(in_chans)


def _segmentor(cfg: Mapping[str, Any], ckpt: Mapping[str, Any], checkpoint: str):
    saved = dict(ckpt.get("config") or {})
    seg_cfg = SEG_TRAIN.apply(SEG_TRAIN.defaults(), {k: v for k, v in saved.items() if k in SEG_TRAIN.keys})
    if cfg.get("model"):
        seg_cfg["model"] = cfg["model"]
    seg_cfg["checkpoint"] = checkpoint
    model, names = segmentor_for(seg_cfg, ckpt, None, torch.device("cpu"))
    img_size = int(cfg.get("img_size") or seg_cfg["crop_size"])
    _check_divisible(model, img_size, seg_cfg["model"])
    meta = {"task": "segmentation", "model": seg_cfg["model"], "num_classes": int(model.num_classes),
            "class_names": list(names), "checkpoint": checkpoint, "mean": [123.675 / 255, 116.28 / 255, 103.53 / 255],
            "std": [58.395 / 255, 57.12 / 255, 57.375 / 255], "interpolation": "bilinear", "crop_pct": 1.0}
    return model.eval(), meta, img_size, 3


def _load(cfg: Mapping[str, Any], want: str) -> Tuple[nn.Module, Dict[str, Any], int, int]:
    """The model a command's config names, its metadata, image size and channels."""
    checkpoint = cfg.get("checkpoint")
    ckpt = load_training_checkpoint(os.fspath(checkpoint)) if checkpoint else None
    task = checkpoint_task(ckpt) or "classification"
    if want not in ("auto", task):
        raise UserError(f"checkpoint {checkpoint} holds a {task} model (written by `lbmamba {_WRITER[task]}`), "
                        f"not a {want} one")
    if task == "detection":
        raise UserError(f"checkpoint {checkpoint} holds a detector, which cannot be exported: its inference keeps a "
                        "data-dependent number of proposals and boxes (RPN top-k and NMS per image, RoIAlign on "
                        "them, masks pasted per box); export a classifier or segmentor")
    if task == "mil":
        raise UserError(f"checkpoint {checkpoint} holds a whole-slide MIL model (bags of features, not images); "
                        "export takes image classifiers and segmentors")
    if task == "segmentation":
        return _segmentor(cfg, ckpt, checkpoint)
    return _classifier(cfg, ckpt, checkpoint)


# ----------------------------------------------------------------------------------------------- export
@user_errors()
def export_model(overrides: Optional[Mapping[str, Any]] = None,
                 config_path: Optional[str] = None) -> Dict[str, Any]:
    """Write `output` (an ONNX file plain onnxruntime runs) from a checkpoint or a timm model, verified against
    PyTorch; with quantize=dynamic the file holds int8 MatMul weights (checked for agreement with fp32)."""
    from ..export import ExportError, OnnxModel, export_onnx, quantize_dynamic, relative_error

    cfg = EXPORT.validate(EXPORT.apply(EXPORT.defaults(), EXPORT.given(config_path, overrides)))
    output = os.path.abspath(os.path.expanduser(cfg["output"]))
    if os.path.isdir(output):
        raise UserError(f"output must be a file path (model.onnx), got the folder {output}")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with session("cpu", cfg.get("threads"), "export", distributed=False):
        model, meta, img_size, in_chans = _load(cfg, cfg["task"])
        quantized = cfg["quantize"] == "dynamic"
        meta["quantize"] = cfg["quantize"]
        try:
            with tempfile.TemporaryDirectory(dir=os.path.dirname(output) or None) as tmp:
                fp32_path = os.path.join(tmp, "fp32.onnx") if quantized else output
                result = export_onnx(model, fp32_path, img_size=(img_size, img_size), in_chans=in_chans,
                                     metadata=meta, opset=cfg["opset"], tolerance=cfg["tolerance"],
                                     threads=cfg.get("threads"))
                if quantized:
                    q = quantize_dynamic(fp32_path, os.path.join(tmp, "int8.onnx"))
                    images = np.random.default_rng(0).standard_normal((4, in_chans, img_size, img_size),
                                                                      dtype=np.float32)
                    want = OnnxModel(fp32_path, cfg.get("threads"))(images)
                    got = OnnxModel(os.path.join(tmp, "int8.onnx"), cfg.get("threads"))(images)
                    if not np.isfinite(got).all():
                        raise ExportError("the int8 model gives non-finite outputs; nothing written")
                    result.update(int8_bytes=q["bytes"], int8_rel_error=round(relative_error(got, want), 6),
                                  int8_same_top1=float((got.reshape(4, -1).argmax(1) ==
                                                        want.reshape(4, -1).argmax(1)).mean()))
                    os.replace(os.path.join(tmp, "int8.onnx"), output)
                    result["bytes"] = os.path.getsize(output)
        except ExportError as exc:
            raise UserError(f"{meta['model']}: {exc}") from exc
    result.pop("op_types", None)
    result.update(output=output, model=meta["model"], task=meta["task"], img_size=img_size, in_chans=in_chans,
                  checkpoint=cfg.get("checkpoint"), quantize=cfg["quantize"])
    return result


# ----------------------------------------------------------------------------------------------- predict
def preprocess_image(path, meta: Mapping[str, Any]) -> np.ndarray:
    """One image file as the (C, H, W) float32 array the model expects: resized (shorter side to size / crop_pct,
    then centre-cropped), scaled to [0, 1], normalised with the metadata's mean and std."""
    from PIL import Image, UnidentifiedImageError

    size = int(meta["img_size"][0]) if isinstance(meta["img_size"], list) else int(meta["img_size"])
    try:
        with Image.open(path) as image:
            image = image.convert("L" if int(meta["in_chans"]) == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
        meta.get("interpolation", "bilinear"), Image.BICUBIC)
    crop_pct = float(meta.get("crop_pct") or 1.0)
    if crop_pct >= 1.0:
        image = image.resize((size, size), method)
    else:
        scale = size / crop_pct / min(image.size)
        w, h = max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))
        image = image.resize((w, h), method)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    mean = np.asarray(meta["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(meta["std"], dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((array - mean) / std)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@user_errors()
def predict(overrides: Optional[Mapping[str, Any]] = None, config_path: Optional[str] = None) -> Dict[str, Any]:
    """Top-k classes and scores (softmax) of each image, into a CSV; the first images also in the result."""
    cfg = PREDICT.validate(PREDICT.apply(PREDICT.defaults(), PREDICT.given(config_path, overrides)))
    checkpoint = cfg.get("checkpoint")
    if not checkpoint and not cfg.get("model"):
        raise UserError("no model given (set --checkpoint FILE, a .pth or an exported .onnx)")
    is_onnx = bool(checkpoint) and str(checkpoint).lower().endswith(".onnx")
    engine = cfg["engine"] if cfg["engine"] != "auto" else ("onnxruntime" if is_onnx else "torch")
    if engine == "onnxruntime" and not is_onnx:
        raise UserError(f"engine onnxruntime needs an exported .onnx file as checkpoint, got {checkpoint} (write one "
                        "with `lbmamba export --checkpoint ...`)")
    if engine == "torch" and is_onnx:
        raise UserError(f"engine torch needs a PyTorch checkpoint, got the ONNX file {checkpoint}")
    images = input_images(cfg.get("inputs"))
    with session("cpu", cfg.get("threads"), "predict", distributed=False):
        if is_onnx:
            from ..export import OnnxModel

            if not os.path.isfile(checkpoint):
                raise UserError(f"checkpoint not found: {checkpoint}")
            try:
                runner = OnnxModel(checkpoint, cfg.get("threads"))
            except Exception as exc:
                raise UserError(f"cannot load {checkpoint} in onnxruntime: {str(exc).splitlines()[0]}") from exc
            meta = runner.metadata
            if not meta.get("task"):
                raise UserError(f"{checkpoint} has no lbmamba metadata (preprocessing, classes); export it with "
                                "`lbmamba export`")
            if meta.get("task") != "classification":
                raise UserError(f"{checkpoint} holds a {meta.get('task')} model; predict takes classifiers")
            run = runner
        else:
            model, meta, img_size, in_chans = _load(cfg, "classification")
            meta.update(img_size=[img_size, img_size], in_chans=in_chans)

            def run(batch: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return model(torch.from_numpy(batch)).float().numpy()

        names = list(meta.get("class_names") or [])
        k = min(cfg["top_k"], int(meta.get("num_classes") or len(names)))
        rows: List[Dict[str, Any]] = []
        start = time.perf_counter()
        for i in range(0, len(images), cfg["batch_size"]):
            chunk = images[i:i + cfg["batch_size"]]
            probs = _softmax(run(np.stack([preprocess_image(p, meta) for p in chunk])).astype(np.float64))
            for path, p in zip(chunk, probs):
                top = np.argsort(-p, kind="stable")[:k]
                rows.append({"image": str(path), "classes": [names[j] if j < len(names) else str(j) for j in top],
                             "scores": [round(float(p[j]), 6) for j in top]})
        seconds = time.perf_counter() - start
    out = os.path.abspath(os.path.expanduser(cfg["output"]))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image"] + [f"{what}_{r}" for r in range(1, k + 1) for what in ("class", "score")])
    for row in rows:
        writer.writerow([row["image"]] + [v for pair in zip(row["classes"], row["scores"]) for v in pair])
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text.getvalue(), encoding="utf-8")
    return {"images": len(rows), "output": out, "engine": engine, "model": meta.get("model"),
            "checkpoint": checkpoint, "top_k": k, "seconds": round(seconds, 3),
            "predictions": [{"image": Path(r["image"]).name, "classes": r["classes"], "scores": r["scores"]}
                            for r in rows[:20]]}
