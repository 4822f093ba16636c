"""Object detection / instance segmentation data: a checking COCO-format dataset, the large-scale-jitter (LSJ)
train transform and its test transform, batching, and the generated "digit scenes" detection set.

Layout: an images folder and a COCO instances JSON (`images`, `annotations`, `categories`), e.g.
COCO's `train2017/` + `annotations/instances_train2017.json`. Per annotation: `bbox` [x, y, w, h] (converted
to x1, y1, x2, y2), `segmentation` as polygons (a list of [x0, y0, x1, y1, ...]) or RLE (a dict with `size`
and `counts`, compressed or not), `iscrowd`, `category_id`.

Items follow torchvision's detection models: (image float32 (3, H, W) with values in 0..1, NOT normalised
(torchvision's `GeneralizedRCNNTransform` normalises inside the model), target dict) with target
{"boxes": (N, 4) float32 x1 y1 x2 y2, "labels": (N,) int64 in 1..K (0 is background), "masks": (N, H, W) uint8,
"image_id": int64 scalar, "iscrowd": (N,) int64, "area": (N,) float32 (COCO's area; after LSJ the masks' pixel counts),
"orig_size": (2,) int64 (h, w) of the file, "img_size": (2,) int64 (h, w) of the image inside the padding}.

Category ids are mapped to contiguous labels 1..K in increasing id order (`category_id_to_label`,
`label_to_category_id` to write results back). Crowd annotations are left out of the targets, as
torchvision's reference `ConvertCocoPolysToMask` does (keep_crowd=True keeps them with iscrowd = 1).
Boxes clipped to the image that have no width or height are removed and counted (`removed_boxes`, counted
once when the JSON is read, from its image sizes). Images without annotations are kept (negatives).
Bad input: an annotation naming an image id missing from `images`, or a category id missing from
`categories`, is a one-line `DataError` naming the JSON file and the id; an unreadable image (or one whose
size differs from the JSON's) is a `DataError` naming the file, or with skip_bad=True the sample is None,
which `collate_detection` drops and counts.

Randomness as in `segmentation`: every draw of a transform comes from a `numpy.random.Generator` `rng`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .generated import digit_pools, write_set
from .images import DataError, check_spellings, read_or_skip
from .segmentation import read_image, rescale_size, resize_image, scene_instances, seeded_generator

__all__ = [
    "DIGIT_DETECTION_CATEGORIES",
    "LSJ_PAD_VALUE",
    "CocoDetectionDataset",
    "LSJTrainTransform",
    "LSJTestTransform",
    "collate_detection",
    "digit_detection_paths",
    "mask_to_polygons",
    "rescale_prediction",
    "write_digit_detection",
]

#: the image padding value of the LSJ transforms, in 0..255 units (the item holds 114 / 255)
LSJ_PAD_VALUE = 114
#: the digit-scenes detection categories: COCO "categories" entries, ids 1..10 for the digits 0..9
DIGIT_DETECTION_CATEGORIES: Tuple[Dict[str, object], ...] = tuple(
    {"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10))


# ----------------------------------------------------------------------------------------------- masks
def _mask_utils():
    from pycocotools import mask as mask_utils

    return mask_utils


def _segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """uint8 (height, width) mask of a COCO polygon list or RLE (compressed or not)."""
    mask_utils = _mask_utils()
    if isinstance(segmentation, list):
        polygons = [list(map(float, p)) for p in segmentation if len(p) >= 6 and _finite(p)]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"segmentation is neither polygons nor RLE: {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's __array__(copy=) deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _trace_loops(mask: np.ndarray) -> List[List[Tuple[int, int]]]:
    """Closed loops of pixel-corner vertices (x, y) along the boundary between mask and background; the
    foreground is on the right of the direction of travel (image axes, y down), so outer boundaries have
    positive shoelace area and holes negative. At a corner where two pixels touch diagonally the loop turns
    toward its own pixel (4-connected components)."""
    m = np.pad(mask.astype(bool), 1)
    out: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}

    def add(a, b):
        out.setdefault(a, []).append(b)

    ys, xs = np.nonzero(m[1:-1, 1:-1])
    for y, x in zip(ys.tolist(), xs.tolist()):
        py, px = y + 1, x + 1
        if not m[py - 1, px]:
            add((x, y), (x + 1, y))
        if not m[py, px + 1]:
            add((x + 1, y), (x + 1, y + 1))
        if not m[py + 1, px]:
            add((x + 1, y + 1), (x, y + 1))
        if not m[py, px - 1]:
            add((x, y + 1), (x, y))
    loops: List[List[Tuple[int, int]]] = []
    while out:
        start = min(out)
        loop = [start]
        prev, cur = start, out[start][0]
        out[start].remove(cur)
        if not out[start]:
            del out[start]
        while cur != start:
            loop.append(cur)
            options = out[cur]
            if len(options) > 1:  # a diagonal pinch: turn right (toward this loop's pixel)
                dx, dy = cur[0] - prev[0], cur[1] - prev[1]
                right = (cur[0] - dy, cur[1] + dx)
                nxt = right if right in options else options[0]
            else:
                nxt = options[0]
            options.remove(nxt)
            if not options:
                del out[cur]
            prev, cur = cur, nxt
        loops.append(loop)
    return loops


def _simplify(loop: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The loop without its vertices in the middle of straight runs (turns and reversals are kept)."""
    n = len(loop)
    keep = []
    for i in range(n):
        (x0, y0), (x1, y1), (x2, y2) = loop[i - 1], loop[i], loop[(i + 1) % n]
        cross = (x1 - x0) * (y2 - y1) - (y1 - y0) * (x2 - x1)
        dot = (x1 - x0) * (x2 - x1) + (y1 - y0) * (y2 - y1)
        if cross != 0 or dot <= 0:
            keep.append(loop[i])
    return keep


def _signed_area(loop: List[Tuple[int, int]]) -> int:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(loop, loop[1:] + loop[:1]))


def _inside(point: Tuple[float, float], loop: List[Tuple[int, int]]) -> bool:
    """Even-odd test of a point that lies on no edge of the loop (pixel centres against corner loops)."""
    px, py = point
    inside = False
    for (x0, y0), (x1, y1) in zip(loop, loop[1:] + loop[:1]):
        if (y0 > py) != (y1 > py) and px < x0 + (py - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _splice_hole(outer: List[Tuple[int, int]], hole: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """`outer` with `hole` joined to it by a vertical slit from the hole's top-left corner H up to the nearest
    horizontal edge of `outer` above it (a keyhole polygon: the slit's two sides coincide)."""
    hx, hy = min(hole, key=lambda v: (v[1], v[0]))
    best = None
    n = len(outer)
    for i in range(n):
        (x0, y0), (x1, y1) = outer[i], outer[(i + 1) % n]
        if y0 == y1 and y0 < hy and min(x0, x1) <= hx < max(x0, x1) and (best is None or y0 > best[1]):
            best = (i, y0)
    if best is None:  # cannot happen for a hole inside `outer`; kept as a separate loop by the caller
        raise ValueError("no edge above the hole")
    i, py = best
    k = hole.index((hx, hy))
    keyhole = hole[k:] + hole[:k] + [(hx, hy), (hx, py)]
    after = [] if outer[i] == (hx, py) else [(hx, py)]
    return outer[: i + 1] + after + keyhole + outer[i + 1:]


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons ([x0, y0, x1, y1, ...] in pixel-corner coordinates) of a binary mask: one per 4-connected
    component, tracing its outer boundary, with each hole joined to it by a zero-width vertical slit (a
    keyhole polygon, since COCO's polygons of one object are unioned and cannot cut holes otherwise).
    pycocotools' rasteriser (`frPyObjects`, even-odd per column; vertical edges add no crossings) turns the
    polygons back into exactly the mask."""
    loops = [_simplify(loop) for loop in _trace_loops(np.asarray(mask))]
    outers = [loop for loop in loops if _signed_area(loop) > 0]
    holes = [loop for loop in loops if _signed_area(loop) < 0]
    sizes = [_signed_area(loop) for loop in outers]
    for hole in sorted(holes, key=lambda h: min((v[1], v[0]) for v in h)):  # top to bottom
        hx, hy = min(hole, key=lambda v: (v[1], v[0]))
        centre = (hx + 0.5, hy + 0.5)  # the hole's top-left pixel
        owners = [j for j, outer in enumerate(outers) if _inside(centre, outer)]
        if not owners:
            continue
        j = min(owners, key=lambda j: sizes[j])  # the innermost component around the hole
        outers[j] = _splice_hole(outers[j], hole)
    return [[float(v) for xy in outer for v in xy] for outer in outers]


# ----------------------------------------------------------------------------------------------- dataset
def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"unreadable COCO annotation file {path}: {detail}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("categories"), list):
        raise DataError(f"{path} is not a COCO instances file (needs 'images' and 'categories' lists)")
    return data


def _finite(values) -> bool:
    try:
        return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())
    except (TypeError, ValueError):
        return False


def _good_polygons(segmentation: list) -> bool:
    """Whether a polygon list has at least one polygon of three or more points, all of finite numbers."""
    return any(isinstance(p, (list, tuple)) and len(p) >= 6 and _finite(p) for p in segmentation)


def _clip_box(bbox, width: float, height: float) -> Tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


class CocoDetectionDataset(Dataset):
    """(image float (3, H, W) in 0..1, target dict) of a COCO-format set; see the module's docstring.

    image_dir: the folder the images' `file_name`s are relative to. ann_file: the instances JSON.
    transform: called as transform(image RGB uint8 (H, W, 3), target of numpy arrays, rng=None) and returning
        (image tensor, target of tensors), e.g. `LSJTrainTransform`; None converts only.
    keep_crowd: keep crowd annotations in the targets (flagged by `iscrowd`); off for training.
    skip_bad: an unreadable image is None (with a warning on stderr) instead of a DataError.

    Attributes: `image_ids` (the JSON's order), `categories`, `class_names` (["background", names...]),
    `category_id_to_label`, `label_to_category_id`, `removed_boxes` (degenerate boxes dropped),
    `nonfinite_boxes` (boxes with NaN / infinite numbers dropped), `degenerate_polygons` (instances whose
    polygons all have fewer than three points or non-finite numbers, dropped),
    `crowd_count` (crowd annotations left out), `bad_count` (this process's skipped images).
    """

    def __init__(self, image_dir: Union[str, Path], ann_file: Union[str, Path], transform=None,
                 keep_crowd: bool = False, skip_bad: bool = False):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.keep_crowd = bool(keep_crowd)
        self.skip_bad = bool(skip_bad)
        self.bad_count = 0
        data = _load_json(self.ann_file)
        self.categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.category_id_to_label = {int(c["id"]): k + 1 for k, c in enumerate(self.categories)}
        self.label_to_category_id = {k: c for c, k in self.category_id_to_label.items()}
        self.class_names = ["background"] + [str(c.get("name", c["id"])) for c in self.categories]
        check_spellings(self.class_names[1:], f"the categories of {self.ann_file}")
        self.images = {int(img["id"]): img for img in data["images"]}
        self.image_ids = [int(img["id"]) for img in data["images"]]
        self.annotations: Dict[int, List[dict]] = {i: [] for i in self.image_ids}
        self.removed_boxes = 0
        self.nonfinite_boxes = 0
        self.degenerate_polygons = 0
        self.crowd_count = 0
        for ann in data.get("annotations", []):
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            if image_id not in self.images:
                raise DataError(f"{self.ann_file}: annotation {ann.get('id')} names image id {image_id}, which is "
                                "not in its 'images' list")
            if cat not in self.category_id_to_label:
                raise DataError(f"{self.ann_file}: annotation {ann.get('id')} has category id {cat}, which is not "
                                f"in its 'categories' list (ids {sorted(self.category_id_to_label)})")
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise DataError(f"{self.ann_file}: annotation {ann.get('id')} has no 'bbox' [x, y, w, h] "
                                f"(got {bbox!r})")
            if ann.get("iscrowd", 0) and not self.keep_crowd:
                self.crowd_count += 1
                continue
            if not _finite(bbox):  # NaN passes every comparison of the clipping check: dropped and counted here
                self.nonfinite_boxes += 1
                continue
            if isinstance(ann.get("segmentation"), list) and ann["segmentation"] and not _good_polygons(
                    ann["segmentation"]):
                self.degenerate_polygons += 1
                continue
            img = self.images[image_id]
            if "width" in img and "height" in img:
                x1, y1, x2, y2 = _clip_box(ann["bbox"], img["width"], img["height"])
                if x2 <= x1 or y2 <= y1:
                    self.removed_boxes += 1
                    continue
            self.annotations[image_id].append(ann)

    def __len__(self) -> int:
        return len(self.image_ids)

    def read(self, index: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """The checked (RGB uint8 image, target of numpy arrays) of a sample, before the transform."""
        image_id = self.image_ids[index]
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        image = read_image(path)
        h, w = image.shape[:2]
        if ("width" in info and int(info["width"]) != w) or ("height" in info and int(info["height"]) != h):
            raise DataError(f"image {path} is {w}x{h} but {self.ann_file} says {info.get('width')}x"
                            f"{info.get('height')} (width x height)")
        boxes, labels, masks, crowd, area = [], [], [], [], []
        for ann in self.annotations[image_id]:
            box = _clip_box(ann["bbox"], w, h)
            if box[2] <= box[0] or box[3] <= box[1]:  # files without sizes in the JSON: removed here
                continue
            boxes.append(box)
            labels.append(self.category_id_to_label[int(ann["category_id"])])
            crowd.append(int(ann.get("iscrowd", 0)))
            if ann.get("segmentation"):
                try:
                    masks.append(_segmentation_mask(ann["segmentation"], h, w))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{self.ann_file}: annotation {ann.get('id')}: bad segmentation: {exc}") from exc
            else:  # a box-only annotation: its box is its mask
                m = np.zeros((h, w), dtype=np.uint8)
                m[int(box[1]):int(np.ceil(box[3])), int(box[0]):int(np.ceil(box[2]))] = 1
                masks.append(m)
            area.append(float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1]))))
        target = {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "masks": np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8),
            "image_id": np.int64(image_id),
            "iscrowd": np.asarray(crowd, dtype=np.int64),
            "area": np.asarray(area, dtype=np.float32),
        }
        return image, target

    def __getitem__(self, index: int):
        sample = read_or_skip(self, index)
        if sample is None:
            return None
        image, target = sample
        if self.transform is None:
            return _to_tensors(image, target, image.shape[:2], image.shape[:2])
        return self.transform(image, target)


def _to_tensors(image: np.ndarray, target: Dict[str, np.ndarray], orig_size, img_size,
                size: Optional[Tuple[int, int]] = None, pad_value: int = LSJ_PAD_VALUE):
    """(image float (3, h, w) in 0..1 padded bottom / right to `size` with pad_value / 255, target of tensors
    with masks padded with 0)."""
    h, w = size or image.shape[:2]
    out = np.full((3, h, w), pad_value / 255.0, dtype=np.float32)
    out[:, : image.shape[0], : image.shape[1]] = image.transpose(2, 0, 1) / np.float32(255.0)
    masks = np.zeros((len(target["masks"]), h, w), dtype=np.uint8)
    masks[:, : target["masks"].shape[1], : target["masks"].shape[2]] = target["masks"]
    return torch.from_numpy(out), {
        "boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"], dtype=np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(np.ascontiguousarray(target["labels"], dtype=np.int64)),
        "masks": torch.from_numpy(masks),
        "image_id": torch.tensor(int(target["image_id"]), dtype=torch.int64),
        "iscrowd": torch.from_numpy(np.ascontiguousarray(target["iscrowd"], dtype=np.int64)),
        "area": torch.from_numpy(np.ascontiguousarray(target["area"], dtype=np.float32)),
        "orig_size": torch.tensor([int(orig_size[0]), int(orig_size[1])], dtype=torch.int64),
        "img_size": torch.tensor([int(img_size[0]), int(img_size[1])], dtype=torch.int64),
    }


def collate_detection(batch):
    """(list of images, list of targets, n_bad): None samples dropped and counted; torchvision's detectors
    take the lists as they are."""
    items = [item for item in batch if item is not None]
    return [x for x, _ in items], [t for _, t in items], len(batch) - len(items)


# ----------------------------------------------------------------------------------------------- transforms
def _nearest_index(src: int, dst: int) -> np.ndarray:
    """cv2's INTER_NEAREST source indices (as `segmentation._resize_mask`)."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight (x1, y1, x2 + 1, y2 + 1) boxes of masks (N, H, W) (mmdet's BitmapMasks.get_bboxes); empty: 0."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, m in enumerate(masks):
        cols, rows = np.nonzero(m.any(axis=0))[0], np.nonzero(m.any(axis=1))[0]
        if len(cols) and len(rows):
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def _select(target: Dict[str, np.ndarray], keep: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: (v[keep] if k in ("boxes", "labels", "masks", "iscrowd", "area") else v) for k, v in target.items()}


def _check(image, target) -> np.ndarray:
    image = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if target["masks"].shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {target['masks'].shape} do not match the image's size {image.shape[:2]}")
    return image


class LSJTrainTransform:
    """Large-scale jitter as ViTDet's / mmdet's LSJ pipeline (`projects/ViTDet`, `lsj-100e_coco-instance`):
    RandomResize of a `size` x `size` square by a ratio uniform in `ratio_range` keeping the aspect ratio
    (the image fits the square scaled by the ratio: mmcv's `rescale_size`), RandomCrop of
    min(h, size) x min(w, size) at a uniform offset (the crop's boxes shifted and clipped; boxes with no width
    or height dropped; then, as mmdet's recompute_bbox=True, boxes recomputed as the tight boxes of the
    cropped masks, and instances whose box is under 0.01 px wide or high dropped: FilterAnnotations),
    horizontal flip with probability `flip`, padding bottom / right to size x size with `pad_value` (masks 0).

    Images are resized by PIL's bilinear filter (mmdet's default is cv2's, which does not low-pass when
    shrinking), masks by cv2's nearest rule, boxes by the scale factors; areas are the masks' pixel counts
    after the crop (with recompute_boxes; else COCO's areas scaled). Draw order from `rng`:
    ratio, crop y, crop x, flip. Returns (image float (3, size, size) in 0..1, target of tensors).
    """

    def __init__(self, size: int = 1024, ratio_range=(0.1, 2.0), flip: float = 0.5, pad_value: int = LSJ_PAD_VALUE,
                 recompute_boxes: bool = True):
        self.size = int(size)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")
        self.flip = float(flip)
        self.pad_value = int(pad_value)
        self.recompute_boxes = bool(recompute_boxes)

    def __call__(self, image, target, rng=None):
        rng = seeded_generator(rng)
        image = _check(image, target)
        orig = image.shape[:2]
        ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        side = int(self.size * ratio)
        rw, rh = rescale_size((orig[1], orig[0]), (max(side, 1), max(side, 1)))
        sx, sy = rw / orig[1], rh / orig[0]
        ch, cw = min(rh, self.size), min(rw, self.size)
        y0 = int(rng.integers(0, rh - ch + 1))
        x0 = int(rng.integers(0, rw - cw + 1))
        flip = rng.random() < self.flip
        image = resize_image(image, (rw, rh))[y0:y0 + ch, x0:x0 + cw]
        rows = _nearest_index(orig[0], rh)[y0:y0 + ch]
        cols = _nearest_index(orig[1], rw)[x0:x0 + cw]
        masks = target["masks"][:, rows][:, :, cols]
        boxes = target["boxes"].astype(np.float32) * np.float32([sx, sy, sx, sy]) - np.float32([x0, y0, x0, y0])
        boxes = np.clip(boxes, 0, np.float32([cw, ch, cw, ch]))
        target = dict(target, boxes=boxes, masks=masks, area=target["area"].astype(np.float32) * np.float32(sx * sy))
        target = _select(target, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        if self.recompute_boxes:  # the crop cut some instances: boxes and areas from what is left of the masks
            target["boxes"] = _mask_boxes(target["masks"])
            target["area"] = target["masks"].sum(axis=(1, 2), dtype=np.int64).astype(np.float32)
        b = target["boxes"]
        target = _select(target, (b[:, 2] - b[:, 0] > 1e-2) & (b[:, 3] - b[:, 1] > 1e-2))
        if flip:
            image = image[:, ::-1]
            target["masks"] = target["masks"][:, :, ::-1]
            b = target["boxes"].copy()
            target["boxes"] = np.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], axis=1).reshape(-1, 4)
        return _to_tensors(np.ascontiguousarray(image), target, orig, (ch, cw), (self.size, self.size),
                           self.pad_value)


class LSJTestTransform:
    """The LSJ test pipeline: resize so the long side is `size` keeping the ratio (bilinear; masks nearest;
    boxes and areas scaled), pad bottom / right to size x size with `pad_value` (masks 0). `rng` is unused.
    Map predictions back to the file's size with `rescale_prediction`."""

    def __init__(self, size: int = 1024, pad_value: int = LSJ_PAD_VALUE):
        self.size = int(size)
        self.pad_value = int(pad_value)

    def __call__(self, image, target, rng=None):
        image = _check(image, target)
        orig = image.shape[:2]
        rw, rh = rescale_size((orig[1], orig[0]), (self.size, self.size))
        sx, sy = rw / orig[1], rh / orig[0]
        image = resize_image(image, (rw, rh))
        masks = target["masks"][:, _nearest_index(orig[0], rh)][:, :, _nearest_index(orig[1], rw)]
        boxes = target["boxes"].astype(np.float32) * np.float32([sx, sy, sx, sy])
        target = dict(target, boxes=boxes, masks=masks, area=target["area"].astype(np.float32) * np.float32(sx * sy))
        return _to_tensors(image, target, orig, (rh, rw), (self.size, self.size), self.pad_value)


def rescale_prediction(prediction: Dict[str, torch.Tensor], img_size, orig_size) -> Dict[str, torch.Tensor]:
    """A torchvision prediction on a (padded) transformed image mapped to the file's size: boxes scaled by
    orig / img and clipped, masks ((N, 1, H, W) or (N, H, W) probabilities) cut to `img_size` (h, w) and resized
    bilinearly to `orig_size` (h, w)."""
    ih, iw = (int(v) for v in img_size)
    oh, ow = (int(v) for v in orig_size)
    out = dict(prediction)
    boxes = prediction["boxes"] * torch.tensor([ow / iw, oh / ih, ow / iw, oh / ih], dtype=prediction["boxes"].dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
    out["boxes"] = boxes
    if "masks" in prediction:
        masks = prediction["masks"]
        squeeze = masks.dim() == 3
        masks = (masks[:, None] if squeeze else masks)[..., :ih, :iw].float()
        if len(masks):
            masks = torch.nn.functional.interpolate(masks, size=(oh, ow), mode="bilinear", align_corners=False)
        else:
            masks = masks.new_zeros((0, 1, oh, ow))
        out["masks"] = masks[:, 0] if squeeze else masks
    return out


# ----------------------------------------------------------------------------------------------- digit scenes
_MARKER = "digit_detection.json"
_FORMAT = "lbmamba digit detection"
_VERSION = 1


def write_digit_detection(root: Union[str, Path], n_train: int = 1000, n_val: int = 100, seed: int = 0,
                          min_size: int = 96, max_size: int = 160, digit_sizes: Tuple[int, int] = (16, 64),
                          max_digits: int = 5) -> Path:
    """The digit-scenes detection set under `root` in COCO format; returns `root`.

    Files: ROOT/images/{train,val}/scene_NNNNN.png and ROOT/annotations/instances_{train,val}.json. Scenes are
    drawn by the segmentation digit scenes' generator (`write_digit_scenes`: textured canvases of random
    height and width in [min_size, max_size], 1 to `max_digits` non-overlapping digits of scikit-learn's 8x8
    set upscaled to random sizes in `digit_sizes`; train / val from disjoint 80 / 20 halves of the digit
    images). Each digit is an instance of category id digit + 1 (names "0".."9"): its mask is where the
    upscaled digit is at least half its maximum; `segmentation` holds its polygons (`mask_to_polygons`:
    traced pixel boundaries, holes as in 0, 6, 8, 9 joined by keyhole slits), which pycocotools rasterises
    back to exactly the mask; `bbox` / `area` are pycocotools' of that mask, so box, mask and area agree.

    The same arguments give the same files; written to a temporary folder beside `root` and moved into place
    whole with its settings in `digit_detection.json`, so a complete set with the same settings is reused.
    """
    mask_utils = _mask_utils()
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if not 1 <= digit_sizes[0] <= digit_sizes[1] or digit_sizes[0] > min_size:
        raise ValueError(f"digit_sizes {digit_sizes} must be increasing and start at most at min_size {min_size}")

    def fill(folder: Path) -> None:
        rng, pools = digit_pools(seed)
        (folder / "annotations").mkdir()
        ann_id = 1
        for split, count in (("train", n_train), ("val", n_val)):
            (folder / "images" / split).mkdir(parents=True)
            digits, labels = pools[split]
            images, annotations = [], []
            for i in range(int(count)):
                image, instances = scene_instances(rng, digits, labels, min_size, max_size, tuple(digit_sizes),
                                                    max_digits)
                h, w = image.shape[:2]
                name = f"scene_{i:05d}.png"
                Image.fromarray(image).save(folder / "images" / split / name)
                image_id = i + 1
                images.append({"id": image_id, "file_name": name, "height": h, "width": w})
                for y, x, size, digit, inside in instances:
                    full = np.zeros((h, w), dtype=np.uint8)
                    full[y:y + size, x:x + size][inside] = 1
                    polygons = mask_to_polygons(full)
                    if not polygons:
                        continue
                    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
                    annotations.append({"id": ann_id, "image_id": image_id, "category_id": digit + 1,
                                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                        "area": float(mask_utils.area(rle)), "segmentation": polygons,
                                        "iscrowd": 0})
                    ann_id += 1
            coco = {"info": {"description": "lbmamba digit scenes (detection)", "version": str(_VERSION)},
                    "licenses": [], "images": images, "annotations": annotations,
                    "categories": [dict(c) for c in DIGIT_DETECTION_CATEGORIES]}
            (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco), encoding="utf-8")

    settings = {"format": _FORMAT, "version": _VERSION, "n_train": int(n_train), "n_val": int(n_val),
                "seed": int(seed), "min_size": int(min_size), "max_size": int(max_size),
                "digit_sizes": [int(d) for d in digit_sizes], "max_digits": int(max_digits)}
    return write_set(root, settings, _MARKER, "digit detection set", fill)

def digit_detection_paths(root: Union[str, Path], split: str) -> Tuple[Path, Path]:
    """(image folder, instances JSON) of a split ("train" / "val") of `write_digit_detection`'s set."""
    root = Path(root)
    return root / "images" / split, root / "annotations" / f"instances_{split}.json"

