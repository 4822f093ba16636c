"""Classification metrics of bag (slide) predictions, through scikit-learn: ROC AUC, macro F1, accuracy,
and their mean and standard deviation over folds; segmentation scores (mIoU, mAcc, aAcc) from a confusion
matrix. A metric that is undefined (AUC of a split with one class, anything of an empty split, the IoU
of a class seen in neither the target nor the prediction) is NaN, never an exception."""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = ["roc_auc", "macro_f1", "accuracy", "classification_metrics", "mean_std", "confusion_matrix",
           "segmentation_scores"]


def roc_auc(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Binary (probs (n, 2) or (n,)): ROC AUC of the positive class's probability. Multi-class: the mean
    one-vs-rest AUC over the classes present in y_true (scikit-learn's `roc_auc_score(multi_class="ovr",
    average="macro")` when every class is present). NaN when undefined (a single class in y_true)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    columns = [(y == 1, p)] if p.ndim == 1 else [(y == c, p[:, c]) for c in range(p.shape[1])]
    aucs = [roc_auc_score(target, score) for target, score in columns if 0 < target.sum() < target.size]
    return float(np.mean(aucs)) if aucs else float("nan")


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Macro F1 over the labels in y_true and y_pred (scikit-learn's `f1_score(average="macro")`)."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels with no predicted positives score 0, as they should
        return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")


def classification_metrics(y_true: Sequence[int], probs: np.ndarray) -> Dict[str, float]:
    """{"auc", "f1", "acc"} from labels and class probabilities (n, C); the prediction is the argmax."""
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    return {"auc": roc_auc(y_true, probs), "f1": macro_f1(y_true, pred), "acc": accuracy(y_true, pred)}


def mean_std(values: Iterable[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof=1, as pandas' `.std()` in the reference code) of the finite
    values; NaN where undefined (no values; one value for the deviation)."""
    good = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return {"mean": float(good.mean()) if good.size else float("nan"),
            "std": float(good.std(ddof=1)) if good.size > 1 else float("nan")}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 pixel counts on `target`'s device, rows the target class, columns the predicted one.

    `pred` and `target` are label maps of one shape (any shape, any device). Pixels whose target is
    `ignore_index` are left out, as in mmseg's `intersect_and_union`; so are target or predicted values
    outside 0..K-1 (a checked data set has none). Matrices of several batches / ranks add up."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    k = int(num_classes)
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    valid = (target != ignore_index) & (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
    return torch.bincount(target[valid] * k + pred[valid], minlength=k * k).reshape(k, k)


def segmentation_scores(confusion, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """mmseg's IoUMetric over a data set's confusion matrix (rows target, columns prediction), as fractions.

    Per class: IoU = intersection / union and Acc = intersection / target pixels, so a class absent from
    both target and prediction has NaN for both, and a class predicted but absent from the target has IoU 0
    and Acc NaN. mIoU and mAcc are the means over the non-NaN classes (numpy's nanmean, NaN when none);
    aAcc = correct / all target pixels. Returns {"mIoU", "mAcc", "aAcc", "per_class": [{"class", "IoU",
    "Acc"}, ...]}; the class is its name, or its index as a string without `class_names`."""
    if isinstance(confusion, torch.Tensor):
        c = confusion.detach().cpu().double()
    else:
        c = torch.as_tensor(np.asarray(confusion), dtype=torch.float64)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {tuple(c.shape)}")
    k = c.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    intersect = torch.diagonal(c)
    area_target, area_pred = c.sum(1), c.sum(0)
    iou = intersect / (area_target + area_pred - intersect)  # 0 / 0 is NaN, as in mmseg
    acc = intersect / area_target
    return {
        "mIoU": float(torch.nanmean(iou)) if k else float("nan"),
        "mAcc": float(torch.nanmean(acc)) if k else float("nan"),
        "aAcc": float(intersect.sum() / area_target.sum()),
        "per_class": [{"class": name, "IoU": float(i), "Acc": float(a)} for name, i, a in zip(names, iou, acc)],
    }
