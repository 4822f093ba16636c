"""COCO evaluation: ground truth used as predictions scores AP 1.0 (boxes and masks) on a hand-written COCO
JSON and on the digit-scenes detection set; faster-coco-eval agrees with pycocotools; empty results give
zeros."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lbmamba.data.detection import CocoDetectionDataset, digit_detection_paths, write_digit_detection
from lbmamba.engine.coco_eval import COCO_METRICS, coco_evaluate, faster_coco_eval_available, to_coco_results


def _write_small_coco(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images, anns = [], []
    rng = np.random.default_rng(0)
    sizes = [(6, 6), (20, 20), (50, 40), (50, 12)]  # areas 27, 300, 1500 (medium), 450
    for i in range(3):
        h, w = 120, 160
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_dir / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "height": h, "width": w})
        x = 2
        for k, (bw, bh) in enumerate(sizes[: i + 2]):
            y = 5 + 3 * k
            # an L-shaped polygon inside the box, so mask and box AP differ in what they compare
            poly = [x, y, x + bw, y, x + bw, y + bh // 2, x + bw // 2, y + bh // 2, x + bw // 2, y + bh, x, y + bh]
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": [5, 9][k % 2],
                         "bbox": [x, y, bw, bh], "area": 0.75 * bw * bh, "iscrowd": 0,
                         "segmentation": [[float(v) for v in poly]]})
            x += bw + 4
    anns.append({"id": len(anns) + 1, "image_id": 12, "category_id": 5, "bbox": [100, 60, 30, 30], "area": 900,
                 "iscrowd": 1, "segmentation": [[100, 60, 130, 60, 130, 90, 100, 90]]})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return image_dir, path


def _ground_truth_predictions(ds):
    predictions, image_ids = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        n = len(target["boxes"])
        predictions.append({"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
                            "masks": target["masks"][:, None].float()})
        image_ids.append(int(target["image_id"]))
    return predictions, image_ids


def test_ground_truth_as_predictions_scores_one(tmp_path):
    image_dir, ann_file = _write_small_coco(tmp_path)
    ds = CocoDetectionDataset(image_dir, ann_file)
    predictions, image_ids = _ground_truth_predictions(ds)
    results = to_coco_results(predictions, image_ids, ds.label_to_category_id)
    assert {r["category_id"] for r in results} == {5, 9}
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    json.dumps(results)  # writable as a results JSON
    metrics = coco_evaluate(ann_file, results)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm"):
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)
        assert metrics[iou_type]["APl"] == -1.0  # no large ground truth: COCO's -1
    # a miss: dropping a result lowers the AP
    fewer = coco_evaluate(ann_file, results[1:], iou_types=("bbox",))
    assert set(fewer) == {"bbox"} and fewer["bbox"]["AP"] < 1.0


def test_wrong_labels_score_zero_and_empty_results_give_zeros(tmp_path):
    image_dir, ann_file = _write_small_coco(tmp_path)
    ds = CocoDetectionDataset(image_dir, ann_file)
    predictions, image_ids = _ground_truth_predictions(ds)
    for p in predictions:
        p["labels"] = 3 - p["labels"]  # swap the two classes
    swapped = coco_evaluate(ann_file, to_coco_results(predictions, image_ids, ds.label_to_category_id))
    assert swapped["bbox"]["AP"] == pytest.approx(0.0) and swapped["segm"]["AP"] == pytest.approx(0.0)
    empty = coco_evaluate(ann_file, [])
    assert empty == {t: dict.fromkeys(COCO_METRICS, 0.0) for t in ("bbox", "segm")}
    none = to_coco_results([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 120, 160)}], [10], {1: 9, 2: 5})
    assert none == []


def test_box_only_results_evaluate_boxes_only(tmp_path):
    image_dir, ann_file = _write_small_coco(tmp_path)
    ds = CocoDetectionDataset(image_dir, ann_file)
    predictions, image_ids = _ground_truth_predictions(ds)
    for p in predictions:
        del p["masks"]
    results = to_coco_results(predictions, image_ids, ds.label_to_category_id)
    assert all("segmentation" not in r for r in results)
    metrics = coco_evaluate(ann_file, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == 0.0


def test_digit_detection_ground_truth_scores_one(tmp_path):
    root = write_digit_detection(tmp_path / "digits", n_train=2, n_val=12, seed=1)
    image_dir, ann_file = digit_detection_paths(root, "val")
    ds = CocoDetectionDataset(image_dir, ann_file)
    predictions, image_ids = _ground_truth_predictions(ds)
    metrics = coco_evaluate(ann_file, to_coco_results(predictions, image_ids, ds.label_to_category_id))
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)


def test_faster_coco_eval_gives_the_same_numbers(tmp_path):
    assert faster_coco_eval_available()  # a dev dependency: the comparison always runs
    image_dir, ann_file = _write_small_coco(tmp_path)
    ds = CocoDetectionDataset(image_dir, ann_file)
    predictions, image_ids = _ground_truth_predictions(ds)
    rng = np.random.default_rng(0)
    for p in predictions:  # imperfect predictions: jittered boxes, eroded masks, random scores
        p["boxes"] = p["boxes"] + torch.from_numpy(rng.uniform(-2, 2, p["boxes"].shape).astype(np.float32))
        p["scores"] = torch.from_numpy(rng.uniform(0.1, 1.0, len(p["scores"])).astype(np.float32))
        p["masks"][:, :, :, ::3] = 0
    results = to_coco_results(predictions, image_ids, ds.label_to_category_id)
    reference = coco_evaluate(ann_file, results, backend="pycocotools")
    faster = coco_evaluate(ann_file, results, backend="faster")
    assert 0 < reference["bbox"]["AP"] < 1 and 0 < reference["segm"]["AP"] < 1
    for iou_type in ("bbox", "segm"):
        for name in COCO_METRICS:
            assert faster[iou_type][name] == pytest.approx(reference[iou_type][name], abs=1e-6), (iou_type, name)


def test_results_for_unknown_images_are_an_error(tmp_path):
    _, ann_file = _write_small_coco(tmp_path)
    result = {"image_id": 999, "category_id": 5, "bbox": [0, 0, 5, 5], "score": 1.0}
    with pytest.raises(ValueError, match="999"):
        coco_evaluate(ann_file, [result], iou_types=("bbox",))


def test_faster_coco_eval_rasterises_the_digit_polygons_alike(tmp_path):
    from faster_coco_eval.core import mask as faster_mask
    from pycocotools import mask as mask_utils

    root = write_digit_detection(tmp_path / "digits", n_train=2, n_val=12, seed=2)
    _, ann_file = digit_detection_paths(root, "val")
    coco = json.loads(ann_file.read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    for ann in coco["annotations"]:
        h, w = sizes[ann["image_id"]]
        ours = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w)))
        theirs = faster_mask.decode(faster_mask.merge(faster_mask.frPyObjects(ann["segmentation"], h, w)))
        assert np.array_equal(ours, theirs)
        assert ours.sum() == ann["area"]
