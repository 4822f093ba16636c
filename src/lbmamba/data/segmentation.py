"""Semantic segmentation data: the ADE20K and generic layouts, a checking dataset, mmsegmentation's ADE20K
train / test pipelines, batch padding, and the generated "digit scenes" set.

Layouts (a split is a subfolder in both; `find_pairs` pairs images and masks by file stem):

    ade20k   ROOT/images/{training,validation}/*.jpg       150 classes (`ADE20K_CLASSES`, mmseg's order);
             ROOT/annotations/{training,validation}/*.png  label 0 is "other" -> 255 (ignored), k -> k - 1
    generic  ROOT/images/{train,val}/*.{png,jpg,...}       ROOT/classes.txt: one class name per line, line i
             ROOT/masks/{train,val}/*.png                  is label i; 255 is ignored

`train` / `val` and `training` / `validation` stand for each other when only the other folder exists.
Masks are single-channel label images (PNG mode L / P / I;16); a value outside the classes (other than
255, and ADE20K's 0) is an error, as are a mask whose size differs from its image and an unreadable file:
`DataError` naming the file, or with `skip_bad=True` the sample is None and `collate_pad` drops it and
counts it.

Transforms follow mmsegmentation 1.x's ADE20K configs (`configs/_base_/datasets/ade20k.py`, the
`SegDataPreProcessor` of the UperNet configs; Vim's mmseg 0.29 pipeline draws the same): RandomResize of
(2048, 512) by a ratio in [0.5, 2.0] keeping the aspect ratio (mmcv's `rescale_size`), RandomCrop 512 with
cat_max_ratio 0.75, RandomFlip 0.5, PhotoMetricDistortion, then normalisation with mean (123.675, 116.28,
103.53) / std (58.395, 57.12, 57.375) on 0-255 RGB values and padding to the crop with 0 (image, after
normalising) / 255 (mask). Resizing: images by PIL's bilinear filter (mmcv's `backend='pillow'`; the
default cv2 backend does not low-pass when shrinking, so shrunk images differ slightly), masks by cv2's
INTER_NEAREST rule (source index floor(x * src / dst)), reproduced exactly in numpy.

Randomness: every draw of a transform comes from one `numpy.random.Generator`, passed as `rng` (or an int
seed); without one, the generator is seeded by one draw of numpy's global generator, which the engine
seeds per sample (or `lbmamba.engine.rng.seed_worker` per worker), so a sample's augmentation is a
function of its seed and a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .generated import digit_pools, write_set
from .images import DataError, check_spellings, open_image, read_or_skip

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "DIGIT_SCENE_CLASSES",
    "LAYOUTS",
    "SPLITS",
    "SEG_MEAN",
    "SEG_STD",
    "IGNORE_INDEX",
    "find_pairs",
    "read_class_names",
    "read_image",
    "read_mask",
    "rescale_size",
    "photometric_distortion",
    "SegmentationDataset",
    "SegTrainTransform",
    "SegTestTransform",
    "collate_pad",
    "write_digit_scenes",
]

LAYOUTS = ("ade20k", "generic")
SPLITS: Dict[str, Tuple[str, str]] = {"ade20k": ("training", "validation"), "generic": ("train", "val")}
IGNORE_INDEX = 255
# mmseg's SegDataPreProcessor (ImageNet's mean / std in 0-255 units), RGB order
SEG_MEAN = (123.675, 116.28, 103.53)
SEG_STD = (58.395, 57.12, 57.375)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")  # lossless formats only
_SPLIT_ALIASES = {"train": "training", "training": "train", "val": "validation", "validation": "val"}
_FOLDERS = {"ade20k": ("images", "annotations"), "generic": ("images", "masks")}
CLASSES_FILE = "classes.txt"

# mmsegmentation's ADE20KDataset.METAINFO (mmseg/datasets/ade.py), in its order; mmseg spells "bed " with a
# trailing space, dropped here
ADE20K_CLASSES: Tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)

ADE20K_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

DIGIT_SCENE_CLASSES: Tuple[str, ...] = ("background",) + tuple(str(d) for d in range(10))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise DataError(f"unknown segmentation layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


# ----------------------------------------------------------------------------------------------- files
def _split_dir(parent: Path, split: str) -> Optional[Path]:
    for name in (split, _SPLIT_ALIASES.get(split)):
        if name and (parent / name).is_dir():
            return parent / name
    return None


def _listing(folder: Path, suffixes: Sequence[str], what: str) -> Dict[str, Path]:
    """{stem: path} of the files with one of `suffixes`; two files with one stem are an error."""
    found: Dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.suffix.lower() not in suffixes or not entry.is_file():
            continue
        if entry.stem in found:
            raise DataError(f"two {what} files with the stem {entry.stem!r}: {found[entry.stem]} and {entry}")
        found[entry.stem] = entry
    return found


def find_pairs(root: Union[str, Path], layout: str, split: str) -> List[Tuple[Path, Path]]:
    """(image, mask) paths of one split, sorted by file stem; DataError for a missing folder, an empty split,
    or an image without its mask (or a mask without its image), naming the file."""
    _check_layout(layout)
    root = Path(root)
    image_folder, mask_folder = _FOLDERS[layout]
    expected = f"ROOT/{image_folder}/{split}/ and ROOT/{mask_folder}/{split}/ (the {layout} layout)"
    images_dir = _split_dir(root / image_folder, split)
    masks_dir = _split_dir(root / mask_folder, split)
    for folder, found in ((image_folder, images_dir), (mask_folder, masks_dir)):
        if found is None:
            raise DataError(f"no {folder} folder for split {split!r}: {root / folder / split} not found; "
                            f"expected {expected}")
    images = _listing(images_dir, IMAGE_SUFFIXES, "image")
    masks = _listing(masks_dir, MASK_SUFFIXES, "mask")
    if not images:
        raise DataError(f"no images in {images_dir} ({', '.join(IMAGE_SUFFIXES)} files)")
    lonely_images = [images[s] for s in images if s not in masks]
    lonely_masks = [masks[s] for s in masks if s not in images]
    if lonely_images:
        more = f" (and {len(lonely_images) - 1} more)" if len(lonely_images) > 1 else ""
        raise DataError(f"image without a mask: {lonely_images[0]} (no {masks_dir}/{lonely_images[0].stem}.png)"
                        f"{more}")
    if lonely_masks:
        more = f" (and {len(lonely_masks) - 1} more)" if len(lonely_masks) > 1 else ""
        raise DataError(f"mask without an image: {lonely_masks[0]} (no {images_dir}/{lonely_masks[0].stem}.*)"
                        f"{more}")
    return [(images[s], masks[s]) for s in sorted(images)]


def read_class_names(root: Union[str, Path], layout: str) -> List[str]:
    """The class names in label order: ADE20K's 150, or the generic layout's ROOT/classes.txt (one per
    line; blank lines only at the end; at most 255 classes, since 255 is the ignore label)."""
    _check_layout(layout)
    if layout == "ade20k":
        return list(ADE20K_CLASSES)
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise DataError(f"class names file not found: {path} (one class name per line, line i is label i)")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path} lists no classes (one class name per line)")
    if "" in lines:
        raise DataError(f"{path}: line {lines.index('') + 1} is blank; every line up to the last is a class name")
    repeated = sorted({name for name in lines if lines.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: class name(s) listed twice: {', '.join(repeated)}")
    check_spellings(lines, str(path))
    if len(lines) > IGNORE_INDEX:
        raise DataError(f"{path}: {len(lines)} classes; at most {IGNORE_INDEX} fit (label {IGNORE_INDEX} is ignore)")
    return lines


_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_image(path: Union[str, Path]) -> np.ndarray:
    """The image as RGB uint8 (H, W, 3); DataError naming the file when it cannot be read."""
    try:
        return np.asarray(open_image(path, "RGB"))  # the one reader: EXIF orientation, 16-bit, palette, CMYK ...
    except _READ_ERRORS as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"unreadable image {path}: {detail}") from exc


def _read_label_image(path: Union[str, Path]) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "1"):
                raise DataError(f"mask {path} is a {img.mode} image; expected a single-channel label image "
                                "(PNG mode L, P or I;16: one class index per pixel)")
            return np.asarray(img).astype(np.int64)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"unreadable mask {path}: {detail}") from exc


def read_mask(path: Union[str, Path], num_classes: int, reduce_zero_label: bool = False,
              ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The mask as uint8 labels 0..num_classes-1 and `ignore_index`.

    reduce_zero_label (ADE20K, as mmseg's LoadAnnotations): 0 -> ignore, k -> k - 1 (ignore stays ignore).
    DataError naming the file for a value outside the classes."""
    raw = _read_label_image(path)
    if reduce_zero_label:
        labels = np.where(raw == 0, ignore_index, raw - 1)
        labels[raw == ignore_index] = ignore_index
        allowed = f"0..{num_classes} and {ignore_index} (reduce_zero_label: 0 is ignored, k becomes k - 1)"
    else:
        labels = raw
        allowed = f"0..{num_classes - 1} and {ignore_index} (ignore)"
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(v) for v in values[:5]) + (" ..." if len(values) > 5 else "")
        raise DataError(f"mask {path} holds label value(s) {shown} outside the {num_classes} classes; "
                        f"allowed: {allowed}")
    return labels.astype(np.uint8)


# ----------------------------------------------------------------------------------------------- resizing
def rescale_size(size: Tuple[int, int], scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv's `rescale_size` for a (w, h) size and a scale pair: the largest size that keeps the aspect
    ratio with its long edge <= max(scale) and its short edge <= min(scale); factor
    f = min(max(scale) / max(h, w), min(scale) / min(h, w)); new size int(w * f + 0.5), int(h * f + 0.5)."""
    w, h = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5))


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _resize_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """cv2's INTER_NEAREST: source index floor(x / fx) with fx = dst / src, computed as cv2 computes it."""
    w, h = size
    src_h, src_w = mask.shape
    if (src_w, src_h) == (w, h):
        return mask
    ifx, ify = 1.0 / (w / src_w), 1.0 / (h / src_h)
    cols = np.minimum(np.floor(np.arange(w) * ifx).astype(np.int64), src_w - 1)
    rows = np.minimum(np.floor(np.arange(h) * ify).astype(np.int64), src_h - 1)
    return mask[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------------------------- transforms
def seeded_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:  # one draw of the global generator, which the engine seeds per sample / per worker
        return np.random.default_rng(int(np.random.randint(0, 2**31 - 1)))
    return np.random.default_rng(int(rng))


def _as_arrays(image, mask) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    image = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from the image's {image.shape[:2]}")
        if mask.dtype != np.uint8 and mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask labels must lie in 0..255, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    return image, mask


def _normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float],
               size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(3, H, W) float32 (x - mean) / std; with `size` (h, w), padded bottom / right with 0 after normalising."""
    h, w = size or image.shape[:2]
    out = np.zeros((3, h, w), dtype=np.float32)
    view = out[:, : image.shape[0], : image.shape[1]]
    view[...] = image.transpose(2, 0, 1)
    view -= np.asarray(mean, dtype=np.float32)[:, None, None]
    view /= np.asarray(std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(out)


def _labels(mask: np.ndarray, size: Optional[Tuple[int, int]] = None, fill: int = IGNORE_INDEX) -> torch.Tensor:
    """(H, W) int64 labels; with `size` (h, w), padded bottom / right with `fill`."""
    h, w = size or mask.shape
    out = np.full((h, w), fill, dtype=np.int64)
    out[: mask.shape[0], : mask.shape[1]] = mask
    return torch.from_numpy(out)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's PhotoMetricDistortion.convert: x * alpha + beta, clipped to 0..255, truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """cv2's 8-bit RGB -> HSV: H in half degrees 0..179, S and V 0..255 (rounded as cv2 rounds)."""
    f = image.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    v = f.max(axis=-1)
    diff = v - f.min(axis=-1)
    safe = np.maximum(diff, 1e-6)
    hue = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)) * 30.0
    hue = np.where(diff == 0, 0.0, hue)
    hue = np.floor(hue + 0.5) % 180
    sat = np.floor(diff * 255.0 / np.maximum(v, 1.0) + 0.5)
    return np.stack([hue, sat, v], axis=-1).astype(np.uint8)


# candidates (v, q, p, t) per hue sector 0..5 for r, g, b: the standard HSV -> RGB table
_SECTOR_PICK = np.array([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]])


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """cv2's 8-bit HSV -> RGB (H in half degrees)."""
    h = hsv[..., 0].astype(np.float32) / 30.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    frac = h - np.floor(h)
    candidates = np.stack([v, v * (1 - s * frac), v * (1 - s), v * (1 - s * (1 - frac))])
    channels = [np.take_along_axis(candidates, _SECTOR_PICK[c][sector][None], axis=0)[0] for c in range(3)]
    return np.clip(np.floor(np.stack(channels, axis=-1) + 0.5), 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range: Tuple[float, float] = (0.5, 1.5),
                           saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an RGB uint8 image, each step with probability 0.5, in its order and
    with its draws: brightness (+uniform(-32, 32)); a coin `mode`: contrast (x uniform(0.5, 1.5)) here when
    mode is 1; saturation (x uniform(0.5, 1.5) in HSV); hue (+integers(-18, 18), upper bound excluded as
    numpy's randint in mmseg, modulo 180); contrast here when mode is 0. Values are truncated to uint8 after
    every step as mmseg does."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)

    def contrast(img):
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    if mode == 1:
        image = contrast(image)
    if rng.integers(2):
        hsv = _rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = _hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = _rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
        image = _hsv_to_rgb(hsv)
    if mode == 0:
        image = contrast(image)
    return image


def _pair(value) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, np.integer)) else (int(value[0]), int(value[1]))


class SegTrainTransform:
    """mmseg's ADE20K training pipeline on an (RGB uint8 image, uint8 mask) pair -> (image float (3, h, w)
    normalised, mask int64 (h, w)), both of the crop's size.

    Steps: random resize (ratio r = uniform in ratio_range; target scale (int(scale[0] r), int(scale[1] r));
    keep the aspect ratio by `rescale_size`), random crop (`crop` int or (h, w); with cat_max_ratio < 1 the
    window is redrawn up to 10 times until at least two classes are present and no class covers
    cat_max_ratio or more of the non-ignored pixels; after 10 failures the last draw is kept, as mmseg),
    horizontal flip with probability `flip`, photometric distortion, normalisation, padding to the crop
    (image 0 after normalising, mask `ignore_index`).

    `rng`: a numpy Generator or an int seed; None draws one seed from numpy's global generator.
    """

    def __init__(self, scale=(2048, 512), ratio_range=(0.5, 2.0), crop=512, cat_max_ratio=0.75, flip=0.5,
                 photometric=True, ignore_index=IGNORE_INDEX, mean=SEG_MEAN, std=SEG_STD):
        self.scale = _pair(scale)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")
        self.crop = _pair(crop)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip = float(flip)
        self.photometric = bool(photometric)
        self.ignore_index = int(ignore_index)
        self.mean, self.std = tuple(mean), tuple(std)

    def crop_box(self, mask: np.ndarray, rng: np.random.Generator) -> Tuple[int, int, int, int]:
        """(y1, y2, x1, x2) of the crop window, drawn as mmseg's RandomCrop.crop_bbox."""
        crop_h, crop_w = self.crop

        def draw():
            y = int(rng.integers(0, max(mask.shape[0] - crop_h, 0) + 1))
            x = int(rng.integers(0, max(mask.shape[1] - crop_w, 0) + 1))
            return y, y + crop_h, x, x + crop_w

        box = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                counts = np.bincount(mask[box[0]:box[1], box[2]:box[3]].ravel(), minlength=256)
                counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = draw()
        return box

    def __call__(self, image, mask, rng=None) -> Tuple[torch.Tensor, torch.Tensor]:
        rng = seeded_generator(rng)
        image, mask = _as_arrays(image, mask)
        if mask is None:
            raise ValueError("the training transform needs a mask")
        ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = rescale_size((image.shape[1], image.shape[0]), target)
        image, mask = resize_image(image, size), _resize_mask(mask, size)
        y1, y2, x1, x2 = self.crop_box(mask, rng)
        image, mask = image[y1:y2, x1:x2], mask[y1:y2, x1:x2]
        if rng.random() < self.flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        # a crop of a smaller image is padded bottom / right, as mmseg's SegDataPreProcessor(size=crop) does
        return _normalise(image, self.mean, self.std, self.crop), _labels(mask, self.crop, self.ignore_index)


class SegTestTransform:
    """mmseg's ADE20K test pipeline: resize keeping the aspect ratio by `rescale_size(size, scale)`, bilinear,
    normalise. The mask is not resized (scores are computed at the original size, as mmseg's test pipeline,
    which loads the annotation after Resize); it may be None (prediction)."""

    def __init__(self, scale=(2048, 512), mean=SEG_MEAN, std=SEG_STD):
        self.scale = _pair(scale)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image, mask=None, rng=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        image, mask = _as_arrays(image, mask)
        image = resize_image(image, rescale_size((image.shape[1], image.shape[0]), self.scale))
        return _normalise(image, self.mean, self.std), (None if mask is None else _labels(mask))


# ----------------------------------------------------------------------------------------------- dataset
class SegmentationDataset(Dataset):
    """(image float (3, H, W) normalised, mask int64 (H, W), 255 = ignore) of a list of (image, mask) paths.

    transform: called as transform(image RGB uint8 (H, W, 3), mask uint8 (H, W)); None normalises only.
    reduce_zero_label: ADE20K's rule (0 -> ignore, k -> k - 1).
    skip_bad: a sample that cannot be read or is inconsistent (unreadable file, mask of another size, label
        outside the classes) is None instead of a DataError, with a warning on stderr; `collate_pad` drops
        it and returns how many it dropped, which is the count to use under DataLoader workers
        (`bad_count` counts this process's copy only).
    """

    def __init__(self, pairs: Sequence[Tuple[Union[str, Path], Union[str, Path]]], num_classes: int, transform=None,
                 reduce_zero_label: bool = False, skip_bad: bool = False, ignore_index: int = IGNORE_INDEX):
        self.pairs = [(Path(i), Path(m)) for i, m in pairs]
        self.num_classes = int(num_classes)
        self.transform = transform
        self.reduce_zero_label = bool(reduce_zero_label)
        self.skip_bad = bool(skip_bad)
        self.ignore_index = int(ignore_index)
        self.bad_count = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The checked (RGB uint8 image, uint8 mask) of a sample, before the transform; DataError if bad."""
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_mask(mask_path, self.num_classes, self.reduce_zero_label, self.ignore_index)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                            f"{image.shape[1]}x{image.shape[0]} (width x height)")
        return image, mask

    def __getitem__(self, index: int):
        sample = read_or_skip(self, index)
        if sample is None:
            return None
        image, mask = sample
        if self.transform is None:
            return _normalise(image, SEG_MEAN, SEG_STD), _labels(mask)
        return self.transform(image, mask)


def collate_pad(batch: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]]):
    """(images (B, 3, H, W), masks (B, h, w) int64, n_bad): the None samples dropped and counted, images padded
    bottom / right with 0 to the largest height and width in the batch, masks padded with 255 to theirs (the
    test transform leaves masks at their own size). All samples bad: B = 0."""
    items = [item for item in batch if item is not None]
    n_bad = len(batch) - len(items)
    if not items:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.long), n_bad
    ih = max(x.shape[-2] for x, _ in items)
    iw = max(x.shape[-1] for x, _ in items)
    mh = max(y.shape[-2] for _, y in items)
    mw = max(y.shape[-1] for _, y in items)
    images = items[0][0].new_zeros((len(items), items[0][0].shape[0], ih, iw))
    masks = torch.full((len(items), mh, mw), IGNORE_INDEX, dtype=torch.long)
    for k, (x, y) in enumerate(items):
        images[k, :, : x.shape[-2], : x.shape[-1]] = x
        masks[k, : y.shape[-2], : y.shape[-1]] = y
    return images, masks, n_bad


# ----------------------------------------------------------------------------------------------- digit scenes
_MARKER = "digit_scenes.json"
_FORMAT = "lbmamba digit scenes"
_VERSION = 1


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float (h, w, 3) background in 0..255: smooth noise, a gradient or stripes, plus grain."""
    base = rng.uniform(40, 215, size=3)
    kind = rng.integers(3)
    if kind == 0:  # low-frequency colour noise: a small random grid upsampled
        grid = rng.uniform(-60, 60, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3)).astype(np.float32)
        field = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(grid[..., c])).resize((w, h), Image.BILINEAR))
                          for c in range(3)], axis=-1)
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        along = (xx * np.cos(angle) + yy * np.sin(angle)) / max(h, w)
        direction = rng.uniform(-60, 60, size=3).astype(np.float32)
        if kind == 1:  # a linear gradient between two colours
            field = (along - 0.5)[..., None] * 2 * direction
        else:  # stripes of a random period and angle
            period = rng.uniform(0.08, 0.3)
            field = np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi))[..., None] * direction
    grain = rng.normal(0, 6, size=(h, w, 3))
    return np.clip(base + field + grain, 0, 255)


def _digit_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour far from the background's mean luminance (dark on light, light on dark), of random hue."""
    light = background.mean() < 128
    colour = rng.uniform(0, 70, size=3)
    return 255 - colour if light else colour


#: places tried for each digit of a scene before it is left out
_PLACEMENT_TRIES = 20


def scene_instances(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, min_size: int,
                     max_size: int, digit_sizes: Tuple[int, int], max_digits: int
                     ) -> Tuple[np.ndarray, List[Tuple[int, int, int, int, np.ndarray]]]:
    """A scene's RGB uint8 image and its digits as (y, x, size, digit, bool (size, size) mask) in pasting order
    (shared by the segmentation and the detection digit scenes)."""
    h, w = (int(rng.integers(min_size, max_size + 1)) for _ in range(2))
    image = _texture(rng, h, w)
    instances: List[Tuple[int, int, int, int, np.ndarray]] = []
    boxes: List[Tuple[int, int, int]] = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        k = int(rng.integers(len(digits)))
        size = int(rng.integers(digit_sizes[0], min(digit_sizes[1], h, w) + 1))
        # the 8x8 digit (0..16) upscaled: its intensity is the ink's opacity; the mask is where it is >= 0.5
        alpha = np.asarray(Image.fromarray(digits[k] / np.float32(16.0)).resize((size, size), Image.BILINEAR))
        alpha = np.clip(alpha, 0.0, 1.0)[..., None]
        # digits do not overlap (an occluded digit's class cannot be told from what is left): a few tries
        # for a free place, else the digit is left out
        for _ in range(_PLACEMENT_TRIES):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            if all(y + size <= by or by + bs <= y or x + size <= bx or bx + bs <= x for by, bx, bs in boxes):
                break
        else:
            continue
        boxes.append((y, x, size))
        patch = image[y:y + size, x:x + size]
        image[y:y + size, x:x + size] = patch * (1 - alpha) + _digit_colour(rng, patch) * alpha
        instances.append((y, x, size, int(labels[k]), alpha[..., 0] >= 0.5))
    return np.floor(image + 0.5).astype(np.uint8), instances


def _scene(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, min_size: int, max_size: int,
           digit_sizes: Tuple[int, int], max_digits: int) -> Tuple[np.ndarray, np.ndarray]:
    image, instances = scene_instances(rng, digits, labels, min_size, max_size, digit_sizes, max_digits)
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    for y, x, size, digit, inside in instances:
        mask[y:y + size, x:x + size][inside] = digit + 1
    return image, mask


def _settings(n_train, n_val, seed, min_size, max_size, digit_sizes, max_digits) -> Dict[str, object]:
    return {"format": _FORMAT, "version": _VERSION, "n_train": int(n_train), "n_val": int(n_val), "seed": int(seed),
            "min_size": int(min_size), "max_size": int(max_size), "digit_sizes": [int(d) for d in digit_sizes],
            "max_digits": int(max_digits)}


def write_digit_scenes(root: Union[str, Path], n_train: int = 2000, n_val: int = 100, seed: int = 0,
                       min_size: int = 64, max_size: int = 128, digit_sizes: Tuple[int, int] = (32, 56),
                       max_digits: int = 3) -> Path:
    """The digit-scenes set in the generic layout under `root`; returns `root`.

    Each scene is a canvas of random height and width in [min_size, max_size] with a textured background
    (smooth colour noise, a gradient or stripes, plus grain), and 1 to `max_digits` digits of scikit-learn's
    bundled 8x8 set, upscaled (bilinear) to a random size in `digit_sizes` and blended at random places that do
    not overlap, in a colour that contrasts with the background under them. Mask: 0 background,
    digit + 1 where the upscaled digit's intensity is at least half its maximum (classes
    `DIGIT_SCENE_CLASSES`). Training and validation scenes draw from disjoint halves (80 / 20) of the 1,797
    digit images. Images are RGB PNGs, masks mode-L PNGs, with `classes.txt`.

    The same arguments give the same files. The set is written to a temporary folder beside `root` and moved
    into place whole, with its settings in `digit_scenes.json` written last, so a complete set with the same
    settings is reused, an interrupted write leaves no partial set, and processes writing at once agree.
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if not 1 <= digit_sizes[0] <= digit_sizes[1] or digit_sizes[0] > min_size:
        raise ValueError(f"digit_sizes {digit_sizes} must be increasing and start at most at min_size {min_size}")

    def fill(folder: Path) -> None:
        rng, pools = digit_pools(seed)
        for split, count in (("train", n_train), ("val", n_val)):
            (folder / "images" / split).mkdir(parents=True)
            (folder / "masks" / split).mkdir(parents=True)
            digits, labels = pools[split]
            for i in range(int(count)):
                image, mask = _scene(rng, digits, labels, min_size, max_size, tuple(digit_sizes), max_digits)
                Image.fromarray(image).save(folder / "images" / split / f"scene_{i:05d}.png")
                Image.fromarray(mask).save(folder / "masks" / split / f"scene_{i:05d}.png")
        (folder / CLASSES_FILE).write_text("\n".join(DIGIT_SCENE_CLASSES) + "\n", encoding="utf-8")

    settings = _settings(n_train, n_val, seed, min_size, max_size, digit_sizes, max_digits)
    return write_set(root, settings, _MARKER, "digit scenes", fill)
