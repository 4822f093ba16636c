"""Test-time inference of a `Segmentor` with mmseg's semantics: whole image or sliding window
(mmseg's `slide_inference`), horizontal flip, several scales."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int
from .segmentor import Segmentor
from .uper_head import resize

__all__ = ["PREDICT_MODES", "predict_logits"]

PREDICT_MODES = ("whole", "slide")


def _pair(name: str, value) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return check_int(name, value[0]), check_int(name, value[1])
    if isinstance(value, int) and not isinstance(value, bool):
        check_int(name, value)
        return value, value
    raise ValueError(f"{name} must be an int >= 1 or a pair (height, width) of them, got {value!r}")


def _slide(model: Segmentor, images: torch.Tensor, crop: Tuple[int, int], stride: Tuple[int, int]) -> torch.Tensor:
    """mmseg's slide_inference: a grid of crops (the last row / column flush with the image's edge),
    logits summed and divided by how many crops cover each pixel. A side shorter than the crop is taken
    whole, without padding."""
    batch, _, height, width = images.shape
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = images.new_zeros((batch, model.num_classes, height, width))
    count = images.new_zeros((1, 1, height, width))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            preds[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def predict_logits(model: Segmentor, images: torch.Tensor, *, mode: str = "whole", crop=512, stride=341,
                   flip: bool = False, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """(B, K, H, W) class scores at the images' size, with mmseg's test-time semantics (the model in eval
    mode; runs without gradients).

    mode "whole": one pass over each image. mode "slide": crops of `crop` every `stride` pixels (int or
    (h, w)), overlapping logits averaged. flip: also the horizontally flipped images, their output flipped
    back. scales: the images resized by each factor (bilinear), run, and the output resized back.

    One pass (no flip, one scale) returns its logits. With several passes mmseg averages the passes'
    softmax probabilities; this returns the log of that average, so softmax / argmax of the output are
    mmseg's probabilities / prediction in both cases.
    """
    if not isinstance(model, Segmentor):
        raise TypeError(f"model must be a Segmentor, got {type(model).__name__}")
    if model.training:
        raise ValueError("predict_logits needs the model in eval mode (model.eval()): in training mode BatchNorm "
                         "would normalise with, and update its statistics from, the test images")
    model.check_images(images)
    check_choice("mode", mode, PREDICT_MODES)
    crop, stride = _pair("crop", crop), _pair("stride", stride)
    if mode == "slide" and (stride[0] > crop[0] or stride[1] > crop[1]):
        raise ValueError(f"stride {stride} must not exceed crop {crop} (the crops would leave gaps)")
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    if isinstance(scales, (int, float)) or not scales or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    height, width = images.shape[-2:]

    def run(x: torch.Tensor) -> torch.Tensor:
        return _slide(model, x, crop, stride) if mode == "slide" else model(x)

    total, passes = None, 0
    with torch.no_grad():
        for scale in scales:
            x = images
            if scale != 1:
                size = (max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1))
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flipped in ((False, True) if flip else (False,)):
                out = run(x.flip(-1)).flip(-1) if flipped else run(x)
                out = resize(out, (height, width))
                passes += 1
                if len(scales) == 1 and not flip:
                    return out
                probs = out.float().softmax(dim=1)
                total = probs if total is None else total + probs
    return (total / passes).log()
