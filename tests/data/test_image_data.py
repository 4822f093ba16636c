"""Image data: the digits split of the default run, ImageFolder checks, unreadable images."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lbmamba.data import DataError, build_image_folder, check_image_folder, load_digits_split


def test_digits_split_is_fixed_and_stratified():
    train_a, val_a = load_digits_split(img_size=32, shift=0)
    train_b, val_b = load_digits_split(img_size=32, shift=0)
    assert len(train_a) + len(val_a) == 1797 and len(val_a) == 360
    assert torch.equal(val_a.targets, val_b.targets) and torch.equal(val_a.images, val_b.images)
    counts = torch.bincount(val_a.targets, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    img, target, bad = train_a[0]
    assert img.shape == (1, 32, 32) and bad == 0 and 0 <= target < 10


def _write_png(path, value=128, size=12):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_safe_image_dataset_flags_and_replaces_unreadable_images(tmp_path, capsys):
    root = tmp_path / "train"
    for i in range(3):
        _write_png(str(root / "a" / f"{i}.png"), 10 * i)
    _write_png(str(root / "b" / "0.png"), 200)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = build_image_folder(str(root), transform=None)
    assert ds.classes == ["a", "b"] and len(ds) == 5
    flags = [ds[i][2] for i in range(len(ds))]
    assert sum(flags) == 1
    bad_index = flags.index(1)
    img, target, _ = ds[bad_index]
    assert isinstance(img, Image.Image)  # a readable substitute
    assert "skipped unreadable image" in capsys.readouterr().err


def test_image_folder_checks(tmp_path):
    with pytest.raises(DataError, match="not found"):
        check_image_folder(str(tmp_path / "nope"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        check_image_folder(str(tmp_path / "train"))
    _write_png(str(tmp_path / "train" / "a" / "0.png"))
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DataError, match="empty class folder.*b"):
        check_image_folder(str(tmp_path / "train"))


def test_augmentation_keys_reach_timms_transforms():
    from torchvision import transforms as T

    from lbmamba.data import build_transforms
    from lbmamba.engine import TRAIN

    cfg = TRAIN.load(overrides={"data": "x", "img_size": 32, "in_chans": 3, "scale": "0.5,1", "ratio": [0.9, 1.1],
                                "hflip": 0.0, "vflip": 0.25})
    steps = build_transforms(cfg, None, is_training=True).transforms
    crop = next(t for t in steps if type(t).__name__.startswith("RandomResizedCrop"))
    assert tuple(crop.scale) == (0.5, 1.0) and tuple(crop.ratio) == (0.9, 1.1)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in steps)
    assert [t.p for t in steps if isinstance(t, T.RandomVerticalFlip)] == [0.25]
    defaults = build_transforms(TRAIN.load(overrides={"data": "x", "img_size": 32}), None, is_training=True).transforms
    assert [t.p for t in defaults if isinstance(t, T.RandomHorizontalFlip)] == [0.5]
