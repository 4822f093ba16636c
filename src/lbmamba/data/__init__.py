"""Datasets: ImageFolder / ImageNet layouts through timm, scikit-learn's digits for the default run, and
segmentation data (ADE20K and generic layouts, mmseg's pipelines, the digit scenes)."""

from .digits import DIGITS_CLASSES, DigitsDataset, load_digits_split
from .images import (
    DataError,
    SafeImageDataset,
    build_image_folder,
    build_transforms,
    check_image_folder,
    resolve_split_dir,
)
from .segmentation import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    DIGIT_SCENE_CLASSES,
    SEG_MEAN,
    SEG_STD,
    SegmentationDataset,
    SegTestTransform,
    SegTrainTransform,
    collate_pad,
    find_pairs,
    read_class_names,
    read_image,
    read_mask,
    rescale_size,
    write_digit_scenes,
)

__all__ = [
    "DataError",
    "DigitsDataset",
    "DIGITS_CLASSES",
    "load_digits_split",
    "SafeImageDataset",
    "build_image_folder",
    "build_transforms",
    "check_image_folder",
    "resolve_split_dir",
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "DIGIT_SCENE_CLASSES",
    "SEG_MEAN",
    "SEG_STD",
    "SegmentationDataset",
    "SegTestTransform",
    "SegTrainTransform",
    "collate_pad",
    "find_pairs",
    "read_class_names",
    "read_image",
    "read_mask",
    "rescale_size",
    "write_digit_scenes",
]
