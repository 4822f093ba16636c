"""COCO-format detection data: loading (polygons, RLE, crowd, category mapping, degenerate boxes), bad input,
the LSJ transforms, and the digit-scenes detection set."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from lbmamba.data import DataError
from lbmamba.data.detection import (
    DIGIT_DETECTION_CATEGORIES,
    CocoDetectionDataset,
    LSJTestTransform,
    LSJTrainTransform,
    collate_detection,
    digit_detection_paths,
    mask_to_polygons,
    rescale_prediction,
    write_digit_detection,
)

H, W = 40, 60


def _rect_mask(x0, y0, x1, y1, h=H, w=W):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def small_coco(tmp_path, annotations=None, categories=None, images=None):
    """A 3-image COCO set: image 1 with a polygon, an uncompressed-RLE and a compressed-RLE instance, a crowd
    instance and two degenerate boxes; image 2 with one polygon instance; image 3 without annotations."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image_dir / name)
    rle_plain = mask_utils.encode(np.asfortranarray(_rect_mask(30, 5, 40, 15)))
    uncompressed = {"size": [H, W], "counts": _uncompressed_counts(_rect_mask(30, 5, 40, 15))}
    compressed = dict(mask_utils.encode(np.asfortranarray(_rect_mask(45, 20, 55, 35))))
    compressed["counts"] = compressed["counts"].decode("ascii")
    assert mask_utils.area(rle_plain) == 100
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 5, 10, 10], "area": 100, "iscrowd": 0,
         "segmentation": uncompressed},
        {"id": 3, "image_id": 1, "category_id": 90, "bbox": [45, 20, 10, 15], "area": 150, "iscrowd": 0,
         "segmentation": compressed},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [0, 20, 20, 20], "area": 400, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": _uncompressed_counts(_rect_mask(0, 20, 20, 40))}},
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0,
         "segmentation": []},
        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [70, 5, 5, 5], "area": 25, "iscrowd": 0,
         "segmentation": [[70, 5, 75, 5, 75, 10, 70, 10]]},
        {"id": 7, "image_id": 2, "category_id": 90, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
    ]
    coco = {
        "images": images if images is not None else [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
            {"id": 3, "file_name": "c.png", "height": H, "width": W},
        ],
        "annotations": annotations if annotations is not None else anns,
        "categories": categories if categories is not None else [
            {"id": 90, "name": "ninety"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(coco))
    return image_dir, ann_file


def _uncompressed_counts(mask):
    """COCO's uncompressed RLE counts (column-major runs starting with zeros)."""
    flat = mask.T.ravel()
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return [int(c) for c in counts]


def test_loading_polygons_rle_crowd_mapping_and_degenerate_boxes(tmp_path):
    ds = CocoDetectionDataset(*small_coco(tmp_path))
    assert len(ds) == 3
    assert ds.class_names == ["background", "three", "seven", "ninety"]
    assert ds.category_id_to_label == {3: 1, 7: 2, 90: 3}
    assert ds.label_to_category_id == {1: 3, 2: 7, 3: 90}
    assert ds.removed_boxes == 2  # zero width, and outside the image after clipping
    assert ds.crowd_count == 1
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["labels"].tolist() == [2, 1, 3]
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [30, 5, 40, 15], [45, 20, 55, 35]]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, H, W)
    assert torch.equal(target["masks"][1], torch.from_numpy(_rect_mask(30, 5, 40, 15)))
    assert torch.equal(target["masks"][2], torch.from_numpy(_rect_mask(45, 20, 55, 35)))
    assert target["masks"][0].sum() == 80  # polygon on pixel corners: exactly the 10 x 8 pixels
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert target["area"].tolist() == [80, 100, 150]
    assert int(target["image_id"]) == 1
    # an image without annotations is a negative
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, H, W)


def test_keep_crowd_keeps_the_flag(tmp_path):
    ds = CocoDetectionDataset(*small_coco(tmp_path), keep_crowd=True)
    _, target = ds[0]
    assert target["iscrowd"].tolist() == [0, 0, 0, 1]
    assert ds.crowd_count == 0
    assert torch.equal(target["masks"][3], torch.from_numpy(_rect_mask(0, 20, 20, 40)))


def test_annotation_naming_a_missing_image_is_a_one_line_error(tmp_path):
    anns = [{"id": 11, "image_id": 42, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 0}]
    image_dir, ann_file = small_coco(tmp_path, annotations=anns)
    with pytest.raises(DataError) as info:
        CocoDetectionDataset(image_dir, ann_file)
    message = str(info.value)
    assert str(ann_file) in message and "42" in message and "\n" not in message


def test_unknown_category_is_a_one_line_error(tmp_path):
    anns = [{"id": 11, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5], "iscrowd": 0}]
    image_dir, ann_file = small_coco(tmp_path, annotations=anns)
    with pytest.raises(DataError) as info:
        CocoDetectionDataset(image_dir, ann_file)
    message = str(info.value)
    assert str(ann_file) in message and "category id 5" in message and "\n" not in message


def test_annotation_without_a_box_is_a_one_line_error(tmp_path):
    anns = [{"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": []}]
    image_dir, ann_file = small_coco(tmp_path, annotations=anns)
    with pytest.raises(DataError, match="annotation 12 has no 'bbox'"):
        CocoDetectionDataset(image_dir, ann_file)


def test_items_train_torchvision_mask_rcnn(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    ds = CocoDetectionDataset(*small_coco(tmp_path), transform=LSJTrainTransform(size=64))
    np.random.seed(0)  # the transform's generator is seeded from numpy's global one, as the engine does per sample
    first = [ds[i] for i in range(3)]
    np.random.seed(0)
    again = [ds[i] for i in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in zip(first, again))
    images, targets, n_bad = collate_detection(first)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(ds.class_names),
                                  min_size=64, max_size=64, trainable_backbone_layers=0)
    model.train()
    losses = model(images, targets)
    assert n_bad == 0 and {"loss_classifier", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_unreadable_image_is_an_error_or_a_counted_skip(tmp_path):
    image_dir, ann_file = small_coco(tmp_path)
    (image_dir / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="b.png"):
        CocoDetectionDataset(image_dir, ann_file)[1]
    ds = CocoDetectionDataset(image_dir, ann_file, skip_bad=True)
    assert ds[1] is None and ds.bad_count == 1
    images, targets, n_bad = collate_detection([ds[0], ds[1], ds[2]])
    assert len(images) == len(targets) == 2 and n_bad == 1


def test_missing_json_and_wrong_size_name_the_file(tmp_path):
    image_dir, ann_file = small_coco(tmp_path)
    with pytest.raises(DataError, match="nothere.json"):
        CocoDetectionDataset(image_dir, tmp_path / "nothere.json")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(image_dir / "c.png")
    with pytest.raises(DataError, match="c.png"):
        CocoDetectionDataset(image_dir, ann_file)[2]


def _check_consistent(image, target, size):
    assert image.shape == (3, size, size)
    boxes, masks = target["boxes"], target["masks"]
    assert masks.shape == (len(boxes), size, size)
    h, w = target["img_size"].tolist()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert target["area"].tolist() == masks.sum((1, 2)).float().tolist()
    for box, mask in zip(boxes, masks):  # the box is the mask's tight box
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    # padding: 114 / 255 outside the image, masks 0
    if w < size:
        assert torch.allclose(image[:, :, w:], torch.tensor(114 / 255.0))
        assert masks[:, :, w:].sum() == 0
    if h < size:
        assert torch.allclose(image[:, h:, :], torch.tensor(114 / 255.0))


def test_lsj_train_size_boxes_masks_and_determinism(tmp_path):
    ds = CocoDetectionDataset(*small_coco(tmp_path))
    transform = LSJTrainTransform(size=64)
    image, target = ds.read(0)
    seen_flip = seen_crop = False
    for seed in range(40):
        out_image, out = transform(image, target, rng=np.random.default_rng(seed))
        _check_consistent(out_image, out, 64)
        assert out["labels"].shape == out["iscrowd"].shape == out["area"].shape == (len(out["boxes"]),)
        again_image, again = transform(image, target, rng=np.random.default_rng(seed))
        assert torch.equal(out_image, again_image)
        assert all(torch.equal(out[k], again[k]) for k in out)
        rng = np.random.default_rng(seed)
        ratio = rng.random() * 1.9 + 0.1
        seen_crop |= int(64 * ratio) > 64 * W / W and len(out["boxes"]) < 3
        rng.integers(0, 10), rng.integers(0, 10)
        seen_flip |= bool(rng.random() < 0.5)
    assert seen_flip and seen_crop


def test_lsj_flip_mirrors_boxes_and_masks(tmp_path):
    ds = CocoDetectionDataset(*small_coco(tmp_path))
    image, target = ds.read(0)
    # ratio range pinned to 1 with a 60-wide image in a 60 square: no crop; flip always / never
    flipped_image, flipped = LSJTrainTransform(size=60, ratio_range=(1, 1), flip=1.0)(image, target, rng=0)
    plain_image, plain = LSJTrainTransform(size=60, ratio_range=(1, 1), flip=0.0)(image, target, rng=0)
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert torch.equal(flipped_image[:, :H], plain_image[:, :H].flip(-1))
    b = plain["boxes"]
    assert torch.equal(flipped["boxes"], torch.stack([60 - b[:, 2], b[:, 1], 60 - b[:, 0], b[:, 3]], 1))
    assert plain["boxes"].tolist() == [[2, 3, 12, 11], [30, 5, 40, 15], [45, 20, 55, 35]]


def test_lsj_crop_drops_vanished_instances():
    image = np.zeros((100, 100, 3), np.uint8)
    masks = np.stack([_rect_mask(0, 0, 10, 10, 100, 100), _rect_mask(90, 90, 100, 100, 100, 100)])
    target = {"boxes": np.float32([[0, 0, 10, 10], [90, 90, 100, 100]]), "labels": np.int64([1, 2]),
              "masks": masks, "image_id": np.int64(1), "iscrowd": np.int64([0, 0]), "area": np.float32([100, 100])}
    transform = LSJTrainTransform(size=50, ratio_range=(1, 1), flip=0.0)  # 100 -> 50: no crop
    _, out = transform(image, target, rng=0)
    assert out["boxes"].tolist() == [[0, 0, 5, 5], [45, 45, 50, 50]]
    assert out["area"].tolist() == [25, 25]
    counts = set()
    for seed in range(30):  # at ratio 2 (100 px) the 50 crop keeps at most one of the corners
        _, out = LSJTrainTransform(size=50, ratio_range=(2, 2), flip=0.0)(image, target, rng=seed)
        counts.add(len(out["boxes"]))
        _check_consistent(_, out, 50)
    assert counts <= {0, 1} and 0 in counts


def test_lsj_test_transform_and_rescale_back(tmp_path):
    ds = CocoDetectionDataset(*small_coco(tmp_path), transform=LSJTestTransform(size=120))
    image, target = ds[0]
    assert image.shape == (3, 120, 120)
    assert target["img_size"].tolist() == [80, 120] and target["orig_size"].tolist() == [H, W]
    assert target["boxes"].tolist() == [[4, 6, 24, 22], [60, 10, 80, 30], [90, 40, 110, 70]]
    assert torch.allclose(image[:, 80:], torch.tensor(114 / 255.0))
    prediction = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(3),
                  "masks": target["masks"][:, None].float()}
    back = rescale_prediction(prediction, target["img_size"], target["orig_size"])
    assert back["boxes"].tolist() == [[2, 3, 12, 11], [30, 5, 40, 15], [45, 20, 55, 35]]
    assert back["masks"].shape == (3, 1, H, W)
    original = CocoDetectionDataset(*small_coco(tmp_path))[0][1]["masks"]
    assert torch.equal((back["masks"][:, 0] >= 0.5).to(torch.uint8), original)


def test_mask_to_polygons_round_trips_exactly_through_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(200):  # random masks: holes, islands in holes, diagonal pinches, edges of the image
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        mask = (rng.random((h, w)) < rng.uniform(0.3, 0.8)).astype(np.uint8)
        polygons = mask_to_polygons(mask)
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))) if polygons else 0 * mask
        assert np.array_equal(decoded, mask)
    ring = np.ones((7, 7), np.uint8)
    ring[2:5, 2:5] = 0
    ring[3, 3] = 1  # an island inside the hole: its own polygon
    polygons = mask_to_polygons(ring)
    assert len(polygons) == 2 and polygons[1] == [3, 3, 4, 3, 4, 4, 3, 4]


def test_digit_detection_set_is_coco_deterministic_and_idempotent(tmp_path):
    kwargs = dict(n_train=6, n_val=4, seed=3)
    root = write_digit_detection(tmp_path / "a", **kwargs)
    write_digit_detection(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len(files) == 6 + 4 + 2 + 1
    for rel in files:
        assert (root / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert write_digit_detection(root, **kwargs) == root  # reused, not rewritten
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other settings"):
        write_digit_detection(root, n_train=7, n_val=4, seed=3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    image_dir, ann_file = digit_detection_paths(root, "train")
    coco = json.loads(ann_file.read_text())
    assert coco["categories"] == [dict(c) for c in DIGIT_DETECTION_CATEGORIES]
    assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
    assert all(isinstance(a["segmentation"], list) and a["segmentation"] for a in coco["annotations"])
    ds = CocoDetectionDataset(image_dir, ann_file)
    assert ds.removed_boxes == 0 and len(ds) == 6
    n = 0
    for i in range(len(ds)):
        image, target = ds[i]
        n += len(target["boxes"])
        for box, mask, area in zip(target["boxes"], target["masks"], target["area"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert mask.sum().item() == area.item()
    assert n == len(coco["annotations"]) > 0
