"""ImageFolder / ImageNet-layout data through timm: checks, a bad-image-tolerant dataset, transforms.

Layout: `ROOT/train/<class>/*.{jpg,jpeg,png}` and `ROOT/val/<class>/...` (the ImageNet layout the
reference code bases read). The class index is the sorted order of the training class folders; the
validation set uses the same map.

`SafeImageDataset` opens each image itself (and decodes it fully) so an unreadable or truncated file
does not stop a run: it is skipped with a warning on stderr, the next readable image of the dataset is
returned in its place, and the sample is flagged (`(image, target, 1)` instead of `(image, target, 0)`)
so the training loop can count bad images and fail when there are more than `max_bad_fraction`, and
evaluation can leave the substitutes out of its figures.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .digits import DIGITS_CLASSES

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "open_image",
    "resolve_split_dir",
    "check_image_folder",
    "SafeImageDataset",
    "build_image_folder",
    "build_transforms",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """Bad input data (missing folder, empty class folder, too many unreadable images).

    The engine re-raises it as `lbmamba.engine.UserError`; the command line prints it as a one-line error.
    """


#: modes of more than 8 bits per channel: scaled to 8 bits by `open_image`
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit / 32-bit integer or float grey image as mode "L": 16-bit values (I;16*, and "I" images
    whose values exceed 255, as 16-bit PNGs and TIFFs open) are divided by 257 (0..65535 -> 0..255), float
    images in [0, 1] multiplied by 255; anything beyond the range is clipped."""
    values = np.asarray(img)
    if img.mode == "F":
        peak = float(np.nanmax(values)) if values.size else 0.0
        scaled = values * 255.0 if peak <= 1.0 else values
    elif img.mode.startswith("I;16") or (values.size and values.max() > 255):
        scaled = values.astype(np.float64) / 257.0
    else:
        scaled = values
    return Image.fromarray(np.nan_to_num(np.asarray(scaled, dtype=np.float64)).round().clip(0, 255).astype(np.uint8))


def open_image(path, mode: str = "RGB") -> Image.Image:
    """The one image reader of every command (training, eval, predict, `mil extract`): the image at `path`
    decoded now (truncated files fail here), turned as its EXIF orientation says (what every viewer shows),
    more than 8 bits per channel scaled to 8 bits (16-bit grey: value / 257), and converted to `mode`
    (palette, CMYK, grey + alpha, RGBA, 1-bit: PIL's conversion; an alpha channel is dropped).
    Raises what PIL raises for an unreadable file (OSError, ValueError, SyntaxError)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        if img.mode in _WIDE_MODES:
            img = _to_8bit(img)
        return img.convert(mode) if img.mode != mode else img.copy()


def same_spelling_groups(names) -> List[List[str]]:
    """The groups of distinct names that differ only in letter case or spaces ("Positive", "positive ",
    "po sitive" is not one), each sorted; [] when there are none."""
    groups: Dict[str, List[str]] = {}
    for name in dict.fromkeys(str(n) for n in names):
        groups.setdefault(" ".join(name.split()).casefold(), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def check_spellings(names, where: str) -> None:
    """DataError naming both spellings when two class names of `where` differ only in case or spaces."""
    groups = same_spelling_groups(names)
    if groups:
        shown = "; ".join(" and ".join(repr(n) for n in g) for g in groups[:5])
        raise DataError(f"{where}: class names that differ only in letter case or spaces: {shown}; give each class "
                        "one spelling")


def read_or_skip(dataset, index: int):
    """dataset.read(index), or None (counted in dataset.bad_count, with a warning) when it raises a DataError
    and dataset.skip_bad is set: the samples of the dense-prediction data sets, which the collate drops."""
    try:
        return dataset.read(index)
    except DataError as exc:
        if not dataset.skip_bad:
            raise
        dataset.bad_count += 1
        print(f"warning: skipped {exc}", file=sys.stderr, flush=True)
        return None


_MAX_CONSECUTIVE_BAD = 50


def _image_extensions() -> Tuple[str, ...]:
    try:
        from timm.data.readers.img_extensions import get_img_extensions

        return tuple(get_img_extensions())
    except Exception:  # pragma: no cover - older timm
        return IMAGE_EXTENSIONS


def resolve_split_dir(root: str, split: str, what: str = "data") -> str:
    """`root/split` when it exists (also `validation` for `val`), else `root` itself when it holds class
    folders directly (e.g. `--data imagenet/val` for eval). DataError when neither exists."""
    if not os.path.exists(root):
        raise DataError(f"{what} directory not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"{what} must be a directory (ImageFolder layout), got a file: {root}")
    candidates = [split] + (["validation"] if split == "val" else []) + (["val"] if split == "validation" else [])
    for name in candidates:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return root


def _has_image(folder: str, extensions: Sequence[str]) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            return True
    return False


def check_image_folder(folder: str, split: str = "train") -> List[str]:
    """The class names of an ImageFolder split (sorted); DataError for a missing folder, no class
    folders, or a class folder without images."""
    if not os.path.isdir(folder):
        raise DataError(f"{split} directory not found: {folder}")
    extensions = _image_extensions()
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    check_spellings(classes, f"class folders of {folder}")
    if not classes:
        raise DataError(
            f"no class folders in {folder}: expected the ImageFolder layout {folder}/<class>/<image>"
            f"{'/'.join(extensions)}"
        )
    for name in classes:
        if not _has_image(os.path.join(folder, name), extensions):
            raise DataError(
                f"empty class folder: {os.path.join(folder, name)} (no {', '.join(extensions)} files); "
                "remove it or add its images"
            )
    return classes


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class SafeImageDataset(Dataset):
    """Samples (image, target, bad) of a list of (path, target); unreadable images are replaced.

    Args:
        samples: (path, class index) pairs.
        transform: applied to the RGB (or `mode`) PIL image.
        mode: PIL mode to convert to ("RGB", "L").
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], transform=None, mode: str = "RGB",
                 classes: Optional[List[str]] = None):
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.mode = mode
        self.classes = list(classes or [])

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int):
        path, target = self.samples[index]
        return open_image(path, self.mode), target  # decoded now: corrupt files fail here, not in a transform

    def __getitem__(self, index: int):
        bad = 0
        for attempt in range(_MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self.samples)
            try:
                img, target = self._load(i)
                break
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
                # PIL raises UnidentifiedImageError (an OSError) / OSError for truncated data / SyntaxError
                detail = str(exc).splitlines()[0] if str(exc) else ""
                _warn(f"skipped unreadable image {self.samples[i][0]} ({type(exc).__name__}: {detail})")
                if attempt == 0:
                    bad = 1
        else:
            raise DataError(f"{_MAX_CONSECUTIVE_BAD} consecutive unreadable images from {self.samples[index][0]} on")
        if self.transform is not None:
            img = self.transform(img)
        return img, target, bad


def build_image_folder(folder: str, transform=None, class_to_idx: Optional[Dict[str, int]] = None, mode: str = "RGB",
                       split: str = "train") -> SafeImageDataset:
    """A SafeImageDataset over `folder` (class folders inside), listed with timm's folder reader."""
    classes = check_image_folder(folder, split)
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(f"{folder} has class folders the training set / model does not know: {shown}")
    else:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    from timm.data import create_dataset

    try:
        base = create_dataset("", root=folder, split=split, search_split=False, class_map=class_to_idx)
    except RuntimeError as exc:  # timm: "Found 0 images in subfolders of ..."
        raise DataError(str(exc)) from exc
    samples = list(base.reader.samples)
    names = [None] * len(class_to_idx)
    for name, idx in class_to_idx.items():
        if 0 <= idx < len(names):
            names[idx] = name
    return SafeImageDataset(samples, transform=transform, mode=mode, classes=names)


def build_transforms(cfg: dict, model=None, is_training: bool = True):
    """timm transforms for training (RandAugment, colour jitter, random erasing ...) or evaluation (resize,
    centre crop `crop_pct`), with the model's mean / std."""
    from timm.data import create_transform, resolve_data_config

    data_cfg = resolve_data_config({}, model=model) if model is not None else {}
    mean = data_cfg.get("mean", (0.485, 0.456, 0.406))
    std = data_cfg.get("std", (0.229, 0.224, 0.225))
    in_chans = cfg.get("in_chans") or 3
    if in_chans != len(mean):
        mean = tuple(mean)[:1] * in_chans if in_chans == 1 else tuple(mean)
        std = tuple(std)[:1] * in_chans if in_chans == 1 else tuple(std)
    size = cfg.get("img_size") or data_cfg.get("input_size", (3, 224, 224))[-1]
    if is_training:
        return create_transform(
            input_size=size,
            is_training=True,
            auto_augment=cfg.get("aa") or None,
            color_jitter=cfg.get("color_jitter") or 0.0,
            scale=tuple(cfg["scale"]) if cfg.get("scale") else None,
            ratio=tuple(cfg["ratio"]) if cfg.get("ratio") else None,
            hflip=cfg.get("hflip", 0.5),
            vflip=cfg.get("vflip", 0.0),
            interpolation=cfg.get("train_interpolation") or "bicubic",
            re_prob=cfg.get("reprob") or 0.0,
            re_mode=cfg.get("remode") or "pixel",
            re_count=cfg.get("recount") or 1,
            mean=mean,
            std=std,
        )
    return create_transform(
        input_size=size,
        is_training=False,
        interpolation=cfg.get("interpolation") or "bicubic",
        crop_pct=cfg.get("crop_pct") or 0.875,
        mean=mean,
        std=std,
    )


def find_classification_data(cfg: Mapping[str, Any], need_train: bool = True) -> Dict[str, Any]:
    """Where an image-classification data set is and which classes it has (no images read yet): `cfg`'s
    `data` ("digits", or an ImageFolder root), `train_split` and `val_split`. {"kind": "digits" | "folder",
    "classes", and for a folder "root", "train_dir", "val_dir"}."""
    data = cfg.get("data")
    if data is None:
        raise DataError("no data given (set --data DIR, an ImageFolder root, or --data digits)")
    if str(data).lower() == "digits":
        return {"kind": "digits", "classes": list(DIGITS_CLASSES)}
    root = os.path.expanduser(str(data))
    if not os.path.exists(root):
        raise DataError(f"data directory not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"data must be a directory (ImageFolder layout with train/ and val/), got a file: {root}")
    info: Dict[str, Any] = {"kind": "folder", "root": root}
    val_dir = resolve_split_dir(root, cfg["val_split"])
    if need_train:
        train_dir = os.path.join(root, cfg["train_split"])
        if not os.path.isdir(train_dir) or val_dir == root:
            missing = [p for p in (train_dir, os.path.join(root, cfg["val_split"])) if not os.path.isdir(p)]
            raise DataError(
                f"expected {root}/{cfg['train_split']}/<class>/* and {root}/{cfg['val_split']}/<class>/* "
                f"(missing: {', '.join(missing)})"
            )
        info["train_dir"] = train_dir
        info["classes"] = check_image_folder(train_dir, cfg["train_split"])
    val_classes = check_image_folder(val_dir, cfg["val_split"])
    info.setdefault("classes", val_classes)
    info["val_dir"] = val_dir
    unknown = sorted(set(val_classes) - set(info["classes"]))
    if unknown:
        raise DataError(f"{val_dir} has class folders that {info.get('train_dir', 'the model')} lacks: "
                        f"{', '.join(unknown[:5])}")
    return info
