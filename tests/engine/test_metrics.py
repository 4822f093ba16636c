"""Bag classification metrics: scikit-learn's, with NaN where a metric is undefined."""

import math

import numpy as np
import pytest

from lbmamba.engine.metrics import accuracy, classification_metrics, macro_f1, mean_std, roc_auc


def test_binary_and_multiclass_auc_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(10):
        n = int(rng.integers(5, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        score = np.round(rng.random(n), 1)  # ties
        assert roc_auc(y, np.stack([1 - score, score], 1)) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        c = int(rng.integers(3, 6))
        y = rng.integers(0, c, n)
        y[:c] = np.arange(c)
        logits = rng.normal(size=(n, c)).round(1)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        want = roc_auc_score(y, probs, multi_class="ovr", average="macro")
        assert roc_auc(y, probs) == pytest.approx(want, abs=1e-12)


def test_multiclass_auc_averages_over_the_classes_present():
    y = np.array([0, 0, 1, 1])  # class 2 absent
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    assert roc_auc(y, probs) == pytest.approx(1.0)


def test_undefined_metrics_are_nan():
    assert math.isnan(roc_auc([1, 1, 1], np.array([[0.2, 0.8]] * 3)))
    out = classification_metrics([], np.zeros((0, 2)))
    assert all(math.isnan(v) for v in out.values())


def test_f1_and_accuracy():
    y = [0, 1, 2, 2, 1]
    pred = [0, 1, 1, 2, 1]  # class 2 half right
    assert accuracy(y, pred) == pytest.approx(0.8)
    assert macro_f1(y, pred) == pytest.approx(np.mean([1.0, 0.8, 2 / 3]))
    assert macro_f1([0, 0, 1], [0, 0, 0]) == pytest.approx(np.mean([0.8, 0.0]))  # a never-predicted class scores 0
    assert classification_metrics([1, 0], np.array([[0.3, 0.7], [0.9, 0.1]])) == {"auc": 1.0, "f1": 1.0, "acc": 1.0}


def test_fold_mean_and_sample_std_skip_undefined_values():
    import statistics

    folds = [0.91, float("nan"), 0.87, None, 0.95, 0.9]
    got = mean_std(folds)
    assert got["mean"] == pytest.approx(statistics.mean([0.91, 0.87, 0.95, 0.9]))
    assert got["std"] == pytest.approx(statistics.stdev([0.91, 0.87, 0.95, 0.9]))  # ddof 1, as pandas .std()
    assert math.isnan(mean_std([0.8])["std"]) and mean_std([0.8])["mean"] == 0.8
    assert all(math.isnan(v) for v in mean_std([float("nan")]).values())
