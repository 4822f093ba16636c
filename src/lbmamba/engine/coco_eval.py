"""COCO evaluation of detections and instance masks: pycocotools' `COCOeval` (or faster-coco-eval's drop-in,
same numbers, when installed and asked for) on COCO result dicts, and the conversion of torchvision's
detector outputs to such dicts.

Metrics per IoU type ("bbox", "segm"): AP (IoU 0.50:0.95), AP50, AP75, APs, APm, APl, COCOeval's `stats[0:6]`
in 0..1; an area range without ground truth gives COCO's -1. No results at all give zeros (pycocotools'
`loadRes` cannot take an empty list).

Mask AP is computed without the results' boxes, as detectron2's COCOEvaluator does: with a `bbox` in a
result, `loadRes` takes the box's area as the instance's area, which changes the small / medium / large split.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Union

import numpy as np
import torch

__all__ = ["COCO_METRICS", "coco_evaluate", "load_coco", "to_coco_results", "faster_coco_eval_available"]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_IOU_TYPES = ("bbox", "segm")


def faster_coco_eval_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _backend(backend: str):
    """(COCO class, COCOeval class) of a backend: "pycocotools", "faster" (faster-coco-eval), or "auto"
    (faster-coco-eval when installed, else pycocotools)."""
    if backend not in ("pycocotools", "faster", "auto"):
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; expected pycocotools, faster or auto")
    if backend == "faster" or (backend == "auto" and faster_coco_eval_available()):
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as exc:
            raise ImportError("backend 'faster' needs faster-coco-eval: pip install faster-coco-eval") from exc
        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def load_coco(gt: Union[str, Path, Mapping, object], backend: str = "pycocotools"):
    """A COCO ground-truth object of `backend` from a JSON path, a dict, or a COCO object (returned as it is
    when it is of the backend's class, else rebuilt from its `dataset`)."""
    coco_cls, _ = _backend(backend)
    if isinstance(gt, coco_cls):
        return gt
    if hasattr(gt, "dataset") and isinstance(gt.dataset, dict):
        gt = gt.dataset
    if isinstance(gt, (str, Path)):
        gt = json.loads(Path(gt).read_text(encoding="utf-8"))
    coco = coco_cls()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.dataset = copy.deepcopy(dict(gt))
        coco.createIndex()
    return coco


def coco_evaluate(gt, results: Sequence[Mapping], iou_types: Iterable[str] = _IOU_TYPES,
                  backend: str = "pycocotools", verbose: bool = False) -> Dict[str, Dict[str, float]]:
    """{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}} of COCO result dicts (image_id, category_id,
    score, bbox [x, y, w, h] and / or segmentation RLE) against the ground truth `gt` (JSON path, dict or COCO
    object). Images of `gt` without results count as misses. backend: "pycocotools" (the reference),
    "faster" (faster-coco-eval) or "auto". verbose prints COCOeval's summary table."""
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in _IOU_TYPES:
            raise ValueError(f"unknown IoU type {t!r}; expected one of {', '.join(_IOU_TYPES)}")
    coco_gt = load_coco(gt, backend)
    _, eval_cls = _backend(backend)
    out: Dict[str, Dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            dts = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        else:
            dts = [dict(r) for r in results if "bbox" in r]
        if not dts:
            out[iou_type] = dict.fromkeys(COCO_METRICS, 0.0)
            continue
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            known = set(coco_gt.getImgIds())
            unknown = sorted({int(r["image_id"]) for r in dts} - known)
            if unknown:
                raise ValueError(f"results name image id(s) {unknown[:5]} not in the ground truth")
            coco_dt = coco_gt.loadRes(copy.deepcopy(dts))
            evaluator = eval_cls(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(s) for s in evaluator.stats[: len(COCO_METRICS)]]
        out[iou_type] = dict(zip(COCO_METRICS, stats))
    return out


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # JSON-writable
    return rle


def to_coco_results(predictions: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                    label_to_category_id: Mapping[int, int], mask_threshold: float = 0.5) -> List[dict]:
    """COCO result dicts of torchvision detector outputs (one dict per image: "boxes" (N, 4) x1 y1 x2 y2,
    "labels" (N,), "scores" (N,), optional "masks" (N, 1, H, W) or (N, H, W) probabilities), in the images'
    original coordinates: bbox [x, y, w, h]; segmentation the RLE (compressed counts as a str) of
    mask >= `mask_threshold` when masks are given; category_id through `label_to_category_id`."""
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
    results: List[dict] = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = pred["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        labels = pred["labels"].detach().cpu().numpy().reshape(-1)
        scores = pred["scores"].detach().float().cpu().numpy().reshape(-1)
        masks = pred.get("masks")
        if masks is not None:
            masks = masks.detach().cpu()
            if masks.dim() == 4:
                masks = masks[:, 0]
            masks = (masks.float() >= mask_threshold).numpy()
        for k in range(len(boxes)):
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            result = {"image_id": int(image_id), "category_id": int(label_to_category_id[int(labels[k])]),
                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k])}
            if masks is not None:
                result["segmentation"] = _rle(masks[k])
            results.append(result)
    return results
