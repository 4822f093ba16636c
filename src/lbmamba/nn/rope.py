"""2-D rotary position embedding over a token grid (EVA-02's `VisionRotaryEmbeddingFast`, as LocalVim uses it).

For width C (C % 4 == 0) and a grid of H x W tokens in raster order, with F = C / 4 frequencies
f_i = theta ** (-2 i / (C / 2)), i = 0..F-1, and positions t_h = h / H * pt_seq_len, t_w = w / W * pt_seq_len:

* channels [0, C / 2) rotate with the row: angle t_h * f_i for the pair (2 i, 2 i + 1) (each frequency
  used for two neighbouring channels),
* channels [C / 2, C) rotate with the column: angle t_w * f_i likewise,

so ``freqs_cos`` / ``freqs_sin`` are (H * W, C) tables and the embedding is
``x * cos + rotate_half(x) * sin`` with ``rotate_half`` turning each channel pair (a, b) into (-b, a).
Every channel is rotated. The tables are buffers saved in the state dict (`rope.freqs_cos`,
`rope.freqs_sin`), as in the official code. On another grid than the one the tables were built for,
the official model resizes the tables bicubically (like a position embedding, align_corners=False,
no antialiasing) instead of recomputing them; `tables(grid)` does the same.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GridRope", "rope_tables", "rotate_half", "resize_grid_table"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> each channel pair (x[2i], x[2i+1]) becomes (-x[2i+1], x[2i])."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_tables(dim: int, grid: Tuple[int, int], pt_seq_len: int = 14, theta: float = 10000.0):
    """(cos, sin), each (H * W, dim) float32, of the 2-D RoPE described in the module docstring."""
    if dim % 4 != 0 or dim <= 0:
        raise ValueError(f"2-D RoPE needs a width divisible by 4, got {dim}")
    half = dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (dim / 4,)

    def axis(n: int) -> torch.Tensor:
        t = torch.arange(n) / n * pt_seq_len
        return torch.einsum("t,f->tf", t, freqs).repeat_interleave(2, dim=-1)  # (n, dim / 2)

    H, W = int(grid[0]), int(grid[1])
    rows = axis(H)[:, None, :].expand(H, W, half)
    cols = axis(W)[None, :, :].expand(H, W, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(H * W, dim)
    return angles.cos(), angles.sin()


def resize_grid_table(table: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Resize a (..., H * W, C) per-token table to `new_grid` bicubically (align_corners=False, no
    antialiasing: mmseg's `resize`, which the official code uses for position embeddings and RoPE tables)."""
    old_grid, new_grid = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
    if old_grid == new_grid:
        return table
    lead, (n, c) = table.shape[:-2], table.shape[-2:]
    if n != old_grid[0] * old_grid[1]:
        raise ValueError(f"a table of {n} tokens does not fit the grid {old_grid}")
    x = table.reshape(-1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    dtype = x.dtype
    x = F.interpolate(x.float() if dtype not in (torch.float32, torch.float64) else x, size=new_grid,
                      mode="bicubic", align_corners=False)
    return x.to(dtype).permute(0, 2, 3, 1).reshape(*lead, new_grid[0] * new_grid[1], c)


class GridRope(nn.Module):
    """2-D RoPE with its tables as (persistent) buffers ``freqs_cos`` / ``freqs_sin`` of shape (H * W, dim).

    Args:
        dim: width (divisible by 4).  grid: (H, W) the tables are built for.
        pt_seq_len: the positions are scaled to span this many steps (official: 14, the pre-training grid).
        theta: frequency base (10000).
    """

    def __init__(self, dim: int, grid: Tuple[int, int], pt_seq_len: int = 14, theta: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.pt_seq_len = pt_seq_len
        self.theta = theta
        cos, sin = rope_tables(dim, self.grid, pt_seq_len, theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def reset_tables(self) -> None:
        """Recompute the buffers (e.g. after building the model on the meta device)."""
        cos, sin = rope_tables(self.dim, self.grid, self.pt_seq_len, self.theta)
        with torch.no_grad():
            self.freqs_cos.copy_(cos)
            self.freqs_sin.copy_(sin)

    def tables(self, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `grid`: the buffers, resized bicubically when the grid differs (the official way)."""
        return (resize_grid_table(self.freqs_cos, self.grid, grid), resize_grid_table(self.freqs_sin, self.grid, grid))

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin over (..., H * W, dim) (float32 tables promote the result)."""
        return x * cos + rotate_half(x) * sin

    def forward(self, x: torch.Tensor, grid: Tuple[int, int] = None) -> torch.Tensor:
        cos, sin = self.tables(self.grid if grid is None else grid)
        return self.rotate(x, cos, sin)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, pt_seq_len={self.pt_seq_len}, theta={self.theta}"
