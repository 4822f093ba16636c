"""Classification metrics of bag (slide) predictions, through scikit-learn: ROC AUC, macro F1, accuracy,
and their mean and standard deviation over folds. A metric that is undefined (AUC of a split with one
class, anything of an empty split) is NaN, never an exception."""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Sequence

import numpy as np

__all__ = ["roc_auc", "macro_f1", "accuracy", "classification_metrics", "mean_std"]


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
