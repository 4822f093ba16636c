"""Datasets: ImageFolder / ImageNet layouts through timm, and scikit-learn's digits for the default run."""

from .digits import DIGITS_CLASSES, DigitsDataset, load_digits_split
from .images import (
    DataError,
    SafeImageDataset,
    build_image_folder,
    build_transforms,
    check_image_folder,
    resolve_split_dir,
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
]
