"""Absolute position embeddings on a patch grid: the one resampler every plain model here uses, and the
class token's place in a token sequence.

A plain vision model's sequence holds the H x W patch tokens in raster order and, optionally, one class
token. Where the class token sits depends on the family:

* ``None``: no class token (LBVim, LocalVim-T / -S, PlainMamba);
* ``"head"``: before the patches, index 0 (ViT's place);
* ``"middle"``: between them, index num_patches // 2 (Vim's and LocalVim's middle class token: 98 of 197
  at 224 px);
* ``"tail"``: after them, index num_patches (Adventurer).

`resample_pos_embed` resizes the patch part of an embedding to another grid (timm's
`resample_abs_pos_embed`, with the class token's place as an argument instead of a number of prefix
tokens) and puts the class token's entry back, unchanged, at its place in the new sequence.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["CLASS_TOKEN_PLACES", "check_class_token", "class_token_index", "split_class_token",
           "insert_class_token", "resample_pos_embed"]

#: where a sequence's class token sits (None: it has none)
CLASS_TOKEN_PLACES = (None, "head", "middle", "tail")

Grid = Union[int, Sequence[int]]


def check_class_token(place: Optional[str], allowed: Sequence[Optional[str]] = CLASS_TOKEN_PLACES) -> Optional[str]:
    """`place` if it is one of `allowed` (a subset of CLASS_TOKEN_PLACES), else a ValueError naming both."""
    if place not in allowed:
        raise ValueError(f"class_token must be one of {tuple(allowed)}, got {place!r}")
    return place


def class_token_index(num_patches: int, place: Optional[str]) -> Optional[int]:
    """Index of the class token in a sequence of `num_patches` patch tokens plus the class token at `place`
    (None without one)."""
    if place is None:
        return None
    return {"head": 0, "middle": num_patches // 2, "tail": num_patches}[check_class_token(place)]


def split_class_token(x: torch.Tensor, place: Optional[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(patch tokens, class token or None) of a (..., tokens, C) sequence whose class token sits at `place`.

    The class token keeps its axis: (..., 1, C). At the head or tail both parts are views of `x`."""
    if place is None:
        return x, None
    index = class_token_index(x.shape[-2] - 1, place)
    if place == "head":
        return x[..., 1:, :], x[..., :1, :]
    if place == "tail":
        return x[..., :-1, :], x[..., -1:, :]
    return torch.cat([x[..., :index, :], x[..., index + 1:, :]], dim=-2), x[..., index:index + 1, :]


def insert_class_token(patches: torch.Tensor, token: Optional[torch.Tensor], place: Optional[str]) -> torch.Tensor:
    """Put `token` (..., 1, C) into the (..., patches, C) sequence at `place` (the inverse of
    `split_class_token`); `patches` as it is when `token` or `place` is None."""
    if token is None or place is None:
        return patches
    index = class_token_index(patches.shape[-2], place)
    return torch.cat([patches[..., :index, :], token, patches[..., index:, :]], dim=-2)


def _grid(value: Grid) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _square_grid(num_patches: int) -> Tuple[int, int]:
    side = int(round(math.sqrt(num_patches)))
    if side * side != num_patches:
        raise ValueError(f"cannot infer the position-embedding grid of {num_patches} patch tokens (not a square); "
                         "pass old_grid")
    return side, side


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Grid,
    old_grid: Optional[Grid] = None,
    class_token: Optional[str] = None,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a (..., tokens, C) absolute position embedding to `new_grid` (H, W) patches.

    The patch entries, laid out on `old_grid` (default: the square grid their number makes), are
    interpolated with `interpolation` (align_corners False) and `antialias`; the class token's entry
    (at `class_token`, one of CLASS_TOKEN_PLACES) is kept as it is and re-inserted at the class token's
    place in the new sequence. The same grid gives `pos_embed` itself. Half-precision embeddings are
    interpolated in float32, float32 and float64 ones in their own precision; the result has the input's
    dtype.

    With antialias=True this is timm's `resample_abs_pos_embed` (LBVim, Vim, Adventurer); with
    antialias=False it is the plain bicubic resize mmcls / mmseg use (PlainMamba's and LocalMamba's code).
    """
    check_class_token(class_token)
    num_old = pos_embed.shape[-2] - (class_token is not None)
    old_grid = _square_grid(num_old) if old_grid is None else _grid(old_grid)
    new_grid = _grid(new_grid)
    if old_grid[0] * old_grid[1] != num_old:
        raise ValueError(f"old_grid {old_grid} does not match {num_old} patch tokens in pos_embed")
    if old_grid == new_grid:
        return pos_embed
    patches, token = split_class_token(pos_embed, class_token)
    lead, channels, dtype = patches.shape[:-2], patches.shape[-1], patches.dtype
    grid = patches.reshape(-1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)
    if dtype not in (torch.float32, torch.float64):
        grid = grid.float()  # F.interpolate has no half-precision bicubic on every device
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, align_corners=None, antialias=antialias)
    patches = grid.permute(0, 2, 3, 1).reshape(*lead, new_grid[0] * new_grid[1], channels).to(dtype)
    return insert_class_token(patches, token, class_token)
