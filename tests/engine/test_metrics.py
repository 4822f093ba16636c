"""Bag classification metrics: scikit-learn's, with NaN where a metric is undefined; segmentation scores as
mmsegmentation's IoUMetric."""

import math

import numpy as np
import pytest
import torch

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


# ----------------------------------------------------------------------------------------------- segmentation
def test_confusion_matrix_leaves_ignored_pixels_out_and_adds_up():
    from lbmamba.engine.metrics import confusion_matrix

    target = torch.tensor([[0, 0, 0], [1, 1, 255], [255, 0, 1]])
    pred = torch.tensor([[0, 0, 1], [1, 2, 3], [0, 0, 1]])
    want = torch.tensor([[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # rows: target
    got = confusion_matrix(pred, target, 4)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    halves = confusion_matrix(pred[:2], target[:2], 4) + confusion_matrix(pred[2:], target[2:], 4)
    assert torch.equal(halves, want)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(pred[:2], target, 4)


def test_segmentation_scores_match_a_hand_computation():
    from lbmamba.engine.metrics import segmentation_scores

    confusion = torch.tensor([[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    scores = segmentation_scores(confusion, ["a", "b", "c", "d"])
    # class a: 3 of 4 right, predicted 3 times; b: 2 of 3, predicted 3 times; c: predicted once, never
    # in the target (IoU 0, Acc undefined); d: in neither (both undefined, left out of the means)
    iou, acc = [row["IoU"] for row in scores["per_class"]], [row["Acc"] for row in scores["per_class"]]
    assert iou[:3] == pytest.approx([3 / 4, 2 / 4, 0.0]) and math.isnan(iou[3])
    assert acc[:2] == pytest.approx([3 / 4, 2 / 3]) and math.isnan(acc[2]) and math.isnan(acc[3])
    assert scores["mIoU"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert scores["mAcc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert scores["aAcc"] == pytest.approx(5 / 7)
    assert [row["class"] for row in scores["per_class"]] == ["a", "b", "c", "d"]
    assert [row["class"] for row in segmentation_scores(confusion)["per_class"]] == ["0", "1", "2", "3"]
    empty = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(empty[k]) for k in ("mIoU", "mAcc", "aAcc"))


def test_miou_is_dataset_wide_intersection_over_union_per_class():
    """The confusion-matrix scores against IoU / accuracy computed from pixel sets over a whole random data
    set (torchmetrics' MulticlassJaccardIndex(average="macro", ignore_index=255) is the same definition;
    it is not a dependency)."""
    from lbmamba.engine.metrics import confusion_matrix, segmentation_scores

    rng = np.random.default_rng(0)
    k = 5
    targets = [rng.integers(0, k - 1, size=(7, 9)) for _ in range(4)]  # class 4 never in the target
    for t in targets:
        t[rng.random(t.shape) < 0.2] = 255
    preds = [np.where(rng.random(t.shape) < 0.6, t % 255, rng.integers(0, k, size=t.shape)) for t in targets]
    total = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), k) for p, t in zip(preds, targets))
    scores = segmentation_scores(total)
    target, pred = np.concatenate([t.ravel() for t in targets]), np.concatenate([p.ravel() for p in preds])
    keep = target != 255
    target, pred = target[keep], pred[keep]
    ious, accs = [], []
    for c in range(k):
        inter, union = np.sum((target == c) & (pred == c)), np.sum((target == c) | (pred == c))
        ious.append(inter / union if union else np.nan)
        accs.append(inter / np.sum(target == c) if np.sum(target == c) else np.nan)
    assert [r["IoU"] for r in scores["per_class"]] == pytest.approx(ious, nan_ok=True)
    assert [r["Acc"] for r in scores["per_class"]] == pytest.approx(accs, nan_ok=True)
    assert scores["mIoU"] == pytest.approx(np.nanmean(ious)) and scores["mAcc"] == pytest.approx(np.nanmean(accs))
    assert scores["aAcc"] == pytest.approx(np.mean(target == pred))
    assert scores["per_class"][4]["IoU"] == 0.0  # predicted, never in the target: counts as 0 in the mean
