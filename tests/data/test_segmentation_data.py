"""Segmentation data: the ADE20K and generic layouts, bad samples, mmseg's train / test pipelines, batch
padding, and the digit-scenes set."""

import colorsys
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lbmamba.data import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    DIGIT_SCENE_CLASSES,
    SEG_MEAN,
    SEG_STD,
    DataError,
    SegmentationDataset,
    SegTestTransform,
    SegTrainTransform,
    collate_pad,
    find_pairs,
    read_class_names,
    read_image,
    rescale_size,
    write_digit_scenes,
)
from lbmamba.data.segmentation import _hsv_to_rgb, _resize_mask, _rgb_to_hsv


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _generic_tree(root, masks, classes=("bg", "a", "b")):
    """A generic-layout tree: one image per mask (same size), split train."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, mask in masks.items():
        mask = np.asarray(mask, dtype=np.uint8)
        _save(root / "images" / "train" / f"{name}.png", _image(*mask.shape))
        _save(root / "masks" / "train" / f"{name}.png", mask)
    return root


# ----------------------------------------------------------------------------------------------- layouts
def test_ade20k_layout_shifts_labels_and_lists_mmsegs_classes(tmp_path):
    raw = np.array([[0, 1, 2, 150], [255, 1, 0, 150], [3, 3, 3, 3]], dtype=np.uint8)
    for split in ("training", "validation"):
        _save(tmp_path / "images" / split / "ADE_1.jpg", np.full((3, 4, 3), 90, np.uint8))
        _save(tmp_path / "annotations" / split / "ADE_1.png", raw)
    pairs = find_pairs(tmp_path, "ade20k", "training")
    assert pairs == [(tmp_path / "images/training/ADE_1.jpg", tmp_path / "annotations/training/ADE_1.png")]
    assert find_pairs(tmp_path, "ade20k", "val") == find_pairs(tmp_path, "ade20k", "validation")  # alias
    names = read_class_names(tmp_path, "ade20k")
    assert len(names) == 150 == len(ADE20K_PALETTE) and names == list(ADE20K_CLASSES)
    assert names[:3] == ["wall", "building", "sky"] and names[7] == "bed" and names[-1] == "flag"
    assert ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[-1] == (92, 0, 255)

    image, mask = SegmentationDataset(pairs, 150, None, reduce_zero_label=True)[0]
    # ADE20K: 0 is "other" -> ignored, k -> k - 1, 255 stays ignored (mmseg's LoadAnnotations)
    assert mask.dtype == torch.int64 and mask.tolist() == [[255, 0, 1, 149], [255, 0, 255, 149], [2, 2, 2, 2]]
    pixels = torch.from_numpy(read_image(pairs[0][0]).astype(np.float32)).permute(2, 0, 1)
    want = (pixels - torch.tensor(SEG_MEAN).view(3, 1, 1)) / torch.tensor(SEG_STD).view(3, 1, 1)
    assert image.shape == (3, 3, 4) and torch.allclose(image, want)


def test_generic_layout_keeps_labels_and_reads_classes_txt(tmp_path):
    root = _generic_tree(tmp_path, {"b": [[0, 1], [2, 255]], "a": [[2, 2], [0, 1]]})
    assert read_class_names(root, "generic") == ["bg", "a", "b"]
    pairs = find_pairs(root, "generic", "train")
    assert [p[0].name for p in pairs] == ["a.png", "b.png"]  # sorted by stem
    ds = SegmentationDataset(pairs, 3, None, reduce_zero_label=False)
    assert ds[1][1].tolist() == [[0, 1], [2, 255]]
    with pytest.raises(DataError, match="no images folder for split 'val'"):
        find_pairs(root, "generic", "val")


@pytest.mark.parametrize("text, message", [(None, "class names file not found"), ("a\n\nb\n", "line 2 is blank"),
                                           ("a\nb\na\n", "listed twice: a"), ("\n\n", "lists no classes")])
def test_classes_txt_errors(tmp_path, text, message):
    if text is not None:
        (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(DataError, match=message):
        read_class_names(tmp_path, "generic")


def test_unmatched_files_are_named(tmp_path):
    root = _generic_tree(tmp_path, {"a": [[0]], "b": [[1]]})
    (root / "masks" / "train" / "b.png").unlink()
    with pytest.raises(DataError, match=r"image without a mask: .*images/train/b\.png"):
        find_pairs(root, "generic", "train")
    _save(root / "masks" / "train" / "b.png", [[1]])
    _save(root / "masks" / "train" / "c.png", [[1]])
    with pytest.raises(DataError, match=r"mask without an image: .*masks/train/c\.png"):
        find_pairs(root, "generic", "train")
    _save(root / "images" / "train" / "a.jpg", _image(1, 1))
    with pytest.raises(DataError, match="two image files with the stem 'a'"):
        find_pairs(root, "generic", "train")


# ----------------------------------------------------------------------------------------------- bad samples
def test_bad_samples_raise_naming_the_file_or_are_skipped_and_counted(tmp_path, capsys):
    root = _generic_tree(tmp_path, {"good": [[0, 1], [2, 255]], "label": [[0, 3], [1, 1]],
                                    "size": [[0, 1], [1, 1]], "broken": [[0, 1], [1, 1]],
                                    "rgbmask": [[0, 1], [1, 1]]})
    _save(root / "images" / "train" / "size.png", _image(3, 2))
    (root / "images" / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    _save(root / "masks" / "train" / "rgbmask.png", np.zeros((2, 2, 3)))
    pairs = find_pairs(root, "generic", "train")
    names = [p[0].stem for p in pairs]
    expect = {"label": r"mask .*masks/train/label\.png holds label value\(s\) 3 outside the 3 classes",
              "size": r"mask .*masks/train/size\.png is 2x2 but its image .*images/train/size\.png is 2x3",
              "broken": r"unreadable image .*images/train/broken\.png",
              "rgbmask": r"mask .*masks/train/rgbmask\.png is a RGB image"}
    strict = SegmentationDataset(pairs, 3, None)
    for stem, pattern in expect.items():
        with pytest.raises(DataError, match=pattern) as info:
            strict[names.index(stem)]
        assert "\n" not in str(info.value)

    lenient = SegmentationDataset(pairs, 3, None, skip_bad=True)
    items = [lenient[i] for i in range(len(lenient))]
    assert [item is None for item in items] == [stem != "good" for stem in names]
    assert lenient.bad_count == 4 and capsys.readouterr().err.count("warning: skipped") == 4
    images, masks, n_bad = collate_pad(items)
    assert n_bad == 4 and images.shape == (1, 3, 2, 2) and masks.tolist() == [[[0, 1], [2, 255]]]


def test_ade20k_values_above_150_are_out_of_range(tmp_path):
    _save(tmp_path / "images" / "training" / "x.jpg", _image(2, 2))
    _save(tmp_path / "annotations" / "training" / "x.png", [[0, 151], [150, 255]])
    ds = SegmentationDataset(find_pairs(tmp_path, "ade20k", "training"), 150, None, reduce_zero_label=True)
    with pytest.raises(DataError, match=r"annotations/training/x\.png holds label value\(s\) 151"):
        ds[0]


# ----------------------------------------------------------------------------------------------- transforms
def test_train_transform_gives_crops_of_valid_labels():
    mask = np.random.default_rng(1).integers(0, 5, size=(200, 300)).astype(np.uint8)
    mask[:20] = 255
    t = SegTrainTransform(scale=(256, 64), ratio_range=(0.5, 2.0), crop=64)
    for seed in range(5):
        x, y = t(_image(200, 300), mask, rng=seed)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.shape == (64, 64) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3, 4, 255}


def test_train_transform_pads_small_crops_with_zero_and_ignore():
    # (w, h) 40x30 rescaled into (64, 32): factor min(64/40, 32/30) -> 43x32, then padded to the 48x80 crop
    t = SegTrainTransform(scale=(64, 32), ratio_range=(1.0, 1.0), crop=(48, 80), photometric=False)
    x, y = t(_image(30, 40), np.ones((30, 40), np.uint8), rng=0)
    assert x.shape == (3, 48, 80) and y.shape == (48, 80)
    assert (x[:, 32:] == 0).all() and (x[:, :, 43:] == 0).all() and (x[:, :32, :43] != 0).any()
    assert (y[32:] == 255).all() and (y[:, 43:] == 255).all() and (y[:32, :43] == 1).all()


def _largest_share(mask):
    counts = torch.bincount(mask[mask != 255].flatten(), minlength=2).double()
    counts = counts[counts > 0]
    return 1.0 if len(counts) < 2 else float(counts.max() / counts.sum())


def test_crop_is_redrawn_until_no_class_covers_cat_max_ratio():
    # 40x80 mask: class 0 left, class 1 right, the top rows ignored (left out of the shares). A 40x40 window
    # at column x holds x / 40 of class 1, so about half the windows (10 < x < 30) pass 0.75
    mask = np.zeros((40, 80), np.uint8)
    mask[:, 40:] = 1
    mask[:8] = 255
    image = _image(40, 80)

    def passing(cat_max_ratio):
        t = SegTrainTransform(scale=(80, 40), ratio_range=(1.0, 1.0), crop=40, cat_max_ratio=cat_max_ratio, flip=0.0,
                              photometric=False)
        return sum(_largest_share(t(image, mask, rng=seed)[1]) < 0.75 for seed in range(100))

    assert passing(1.0) < 70  # no redraws
    assert passing(0.75) >= 98  # up to 10 redraws; the 11th draw is kept however it is


def test_flip_mirrors_image_and_mask_together():
    image = _image(32, 48)
    mask = np.random.default_rng(3).integers(0, 4, size=(32, 48)).astype(np.uint8)
    common = dict(scale=(48, 32), ratio_range=(1.0, 1.0), crop=(32, 48), photometric=False)
    x0, y0 = SegTrainTransform(flip=0.0, **common)(image, mask, rng=7)
    x1, y1 = SegTrainTransform(flip=1.0, **common)(image, mask, rng=7)
    assert torch.equal(x1, x0.flip(-1)) and torch.equal(y1, y0.flip(-1))
    assert torch.equal(y0, torch.from_numpy(mask).long())  # same size, no crop: the mask itself


def test_train_transform_is_a_function_of_its_seed():
    image, mask = _image(90, 120), np.random.default_rng(2).integers(0, 3, size=(90, 120)).astype(np.uint8)
    t = SegTrainTransform(scale=(160, 64), crop=48)
    a, b, c = t(image, mask, rng=11), t(image, mask, rng=np.random.default_rng(11)), t(image, mask, rng=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    np.random.seed(5)  # without rng: one draw of numpy's global generator, which the engine seeds per sample
    d = t(image, mask)
    np.random.seed(5)
    assert torch.equal(t(image, mask)[0], d[0])


def test_hsv_conversion_is_cv2s_8bit_one():
    rgb = _image(16, 16, seed=4)
    hsv = _rgb_to_hsv(rgb)
    for r, g, b in rgb.reshape(-1, 3)[:50]:
        h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        got = hsv[(rgb == (r, g, b)).all(-1)][0].astype(int)
        assert min(abs(got[0] - h * 180), 180 - abs(got[0] - h * 180)) <= 0.5 + 1e-6  # half degrees, rounded
        assert abs(got[1] - s * 255) <= 0.5 + 1e-6 and got[2] == v * 255
    assert np.abs(_hsv_to_rgb(hsv).astype(int) - rgb).max() <= 4  # the 8-bit round trip loses a little


def test_masks_are_resized_by_cv2s_nearest_rule():
    row = np.arange(4, dtype=np.uint8)[None]
    assert _resize_mask(row, (6, 1)).tolist() == [[0, 0, 1, 2, 2, 3]]  # floor(x * 4 / 6)
    assert _resize_mask(np.arange(6, dtype=np.uint8)[None], (4, 1)).tolist() == [[0, 1, 3, 4]]  # floor(x * 1.5)


@pytest.mark.parametrize("size, want", [((683, 512), (683, 512)), ((100, 50), (1024, 512)),
                                        ((4000, 500), (2048, 256)), ((512, 2048), (512, 2048)),
                                        ((300, 301), (512, 514))])
def test_test_transform_keeps_the_ratio_within_2048x512(size, want):
    # f = min(2048 / long edge, 512 / short edge); size (int(w f + 0.5), int(h f + 0.5)), as mmcv's rescale_size
    assert rescale_size(size, (2048, 512)) == want
    w, h = size
    if w * h <= 1_000_000:
        x, y = SegTestTransform()(np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8))
        assert x.shape == (3, want[1], want[0]) and y.shape == (h, w)  # the mask keeps its size


def test_test_transform_without_a_mask():
    x, y = SegTestTransform(scale=(64, 32))(Image.new("RGB", (20, 10), (123, 116, 103)))
    assert y is None and x.shape == (3, 32, 64) and x.abs().max() < 0.05


def test_collate_pads_to_the_largest_size_and_drops_bad_samples():
    a = (torch.ones(3, 4, 6), torch.zeros(4, 6, dtype=torch.long))
    b = (torch.ones(3, 5, 3), torch.ones(7, 2, dtype=torch.long))
    images, masks, n_bad = collate_pad([a, None, b])
    assert n_bad == 1 and images.shape == (2, 3, 5, 6) and masks.shape == (2, 7, 6)
    assert images[0, :, 4:].eq(0).all() and images[1, :, :, 3:].eq(0).all() and images[1, :, :, :3].eq(1).all()
    assert masks[0, 4:].eq(255).all() and masks[1, :, 2:].eq(255).all() and masks[1, :, :2].eq(1).all()
    images, masks, n_bad = collate_pad([None, None])
    assert n_bad == 2 and len(images) == 0 and len(masks) == 0


# ----------------------------------------------------------------------------------------------- digit scenes
def _load(path):
    with Image.open(path) as img:
        return np.asarray(img), img.mode


def _read_set(root):
    """{split/stem: (image, mask, image mode, mask mode)} of a generic-layout set."""
    return {f"{split}/{image.stem}": (*_load(image), *_load(mask))
            for split in ("train", "val") for image, mask in find_pairs(root, "generic", split)}


def test_digit_scenes_are_deterministic_and_consistent(tmp_path):
    small = dict(n_train=12, n_val=4, seed=3)
    a = _read_set(write_digit_scenes(tmp_path / "a", **small))
    b = _read_set(write_digit_scenes(tmp_path / "b", **small))
    c = _read_set(write_digit_scenes(tmp_path / "c", **dict(small, seed=4)))
    assert len(a) == 16 and a.keys() == b.keys()
    assert all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][2], b[k][2]) for k in a)
    assert any(not np.array_equal(a[k][0], c[k][0]) for k in a)
    assert read_class_names(tmp_path / "a", "generic") == list(DIGIT_SCENE_CLASSES)
    assert DIGIT_SCENE_CLASSES == ("background", *"0123456789")
    for image, image_mode, mask, mask_mode in a.values():
        assert image_mode == "RGB" and mask_mode == "L" and image.shape[:2] == mask.shape
        assert 64 <= mask.shape[0] <= 128 and 64 <= mask.shape[1] <= 128
        assert mask.max() <= 10 and 0 in mask and len(np.unique(mask)) >= 2  # background and >= 1 digit
        assert image.std() > 10  # a textured canvas, not a flat one
    ds = SegmentationDataset(find_pairs(tmp_path / "a", "generic", "train"), 11, SegTrainTransform(
        scale=(128, 64), crop=64))
    x, y = collate_pad([ds[0], ds[1]])[:2]
    assert x.shape == (2, 3, 64, 64) and set(torch.unique(y).tolist()) <= set(range(11)) | {255}


def test_digit_scenes_are_written_once_and_whole(tmp_path):
    root = tmp_path / "scenes"
    write_digit_scenes(root, n_train=3, n_val=2)
    marker = root / "digit_scenes.json"
    stamp = marker.stat().st_mtime_ns
    assert write_digit_scenes(root, n_train=3, n_val=2) == root and marker.stat().st_mtime_ns == stamp  # reused
    assert json.loads(marker.read_text())["n_train"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["scenes"]  # no temporary folder left
    with pytest.raises(DataError, match=re.escape(f"{root} holds digit scenes made with other settings (n_train)")):
        write_digit_scenes(root, n_train=4, n_val=2)
    partial = tmp_path / "partial"
    (partial / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no complete digit scenes"):
        write_digit_scenes(partial, n_train=3, n_val=2)
    (tmp_path / "empty").mkdir()
    assert (write_digit_scenes(tmp_path / "empty", n_train=1, n_val=1) / "digit_scenes.json").is_file()
