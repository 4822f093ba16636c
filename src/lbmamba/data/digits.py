"""scikit-learn's handwritten digits (bundled with scikit-learn, no download) as a small image task.

1,797 grey 8x8 images of the digits 0-9 (values 0..16), upsampled (bilinear) to `img_size` pixels,
scaled to [0, 1] and normalised with mean 0.5 / std 0.5. A fixed stratified split (seed 0) keeps
`val_fraction` of every class for validation (360 images at 0.2). Training images are randomly
translated by up to `shift` pixels (zero padding), drawn from torch's RNG (deterministic given the
seed: the training loop reseeds every epoch).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "load_digits_split", "DIGITS_CLASSES", "DIGITS_MEAN", "DIGITS_STD"]

DIGITS_CLASSES: List[str] = [str(i) for i in range(10)]
DIGITS_MEAN = 0.5
DIGITS_STD = 0.5


class DigitsDataset(Dataset):
    """(image (C, S, S) float, target, 0) samples; the trailing 0 is the bad-image flag of
    `lbmamba.data.images.SafeImageDataset` (digits are never bad)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, shift: int = 0, in_chans: int = 1):
        self.images = images
        self.targets = targets
        self.shift = int(shift)
        self.in_chans = int(in_chans)
        self.classes = list(DIGITS_CLASSES)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.shift > 0:
            s = self.shift
            dy, dx = (torch.randint(-s, s + 1, (2,))).tolist()
            padded = F.pad(img, (s, s, s, s))
            h, w = img.shape[-2:]
            img = padded[:, s + dy : s + dy + h, s + dx : s + dx + w]
        if self.in_chans != img.shape[0]:
            img = img.expand(self.in_chans, -1, -1)
        return img.contiguous(), int(self.targets[index]), 0


def load_digits_split(img_size: int = 32, val_fraction: float = 0.2, shift: int = 2, in_chans: int = 1,
                      split_seed: int = 0) -> Tuple[DigitsDataset, DigitsDataset]:
    """(train, val) DigitsDatasets: a stratified split with a fixed seed, images at `img_size` pixels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    index = np.arange(len(y))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, stratify=y, random_state=split_seed)
    images = torch.from_numpy(x.astype(np.float32)).view(-1, 1, 8, 8) / 16.0
    if img_size != 8:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = ((images - DIGITS_MEAN) / DIGITS_STD).contiguous()
    targets = torch.from_numpy(y.astype(np.int64))
    train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
    train = DigitsDataset(images[train_idx], targets[train_idx], shift=shift, in_chans=in_chans)
    val = DigitsDataset(images[val_idx], targets[val_idx], shift=0, in_chans=in_chans)
    return train, val
