"""PlainMamba's four continuous zig-zag scan orders over an H x W token grid, and their direction labels.

Tokens are numbered in raster (row-major) order, index i * W + j. The four orders are continuous paths
(every step moves to a neighbouring token):

    0  rows, snaking from the top-left: row 0 left to right, row 1 right to left, ...
    1  the reverse of order 0 (rows snaking upward; it starts at the bottom-left when H is even and at
       the bottom-right when H is odd, wherever order 0 ended)
    2  columns, snaking from the top-left: column 0 downward, column 1 upward, ...
    3  the reverse of order 2 (columns snaking leftward; it starts at the top-right when W is even and
       at the bottom-right when W is odd)

Each position of an order carries the label of the move that reached its token:
0 start, 1 right, 2 left, 3 up, 4 down (PlainMamba adds `direction_Bs[label]` to B there).

The tables are built once per (H, W) with tensor ops (no loop over tokens) and cached; applying them is
an `index_select` / gather.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .tables import table_cache

__all__ = ["ZigZagTables", "zigzag_tables", "DIRECTION_LABELS", "NUM_ORDERS", "NUM_LABELS"]

#: label -> the move that reached a token
DIRECTION_LABELS = ("start", "right", "left", "up", "down")
NUM_ORDERS = 4
NUM_LABELS = len(DIRECTION_LABELS)


class ZigZagTables(NamedTuple):
    """Index tables for one grid size, all int64 of shape (4, H * W).

    orders[k, t]: raster index of the token at position t of order k (scan = raster[..., orders[k]]).
    inverse[k, p]: position in order k of raster token p (raster = scan[..., inverse[k]]).
    labels[k, t]: direction label (0 start, 1 right, 2 left, 3 up, 4 down) of position t of order k.
    """

    orders: torch.Tensor
    inverse: torch.Tensor
    labels: torch.Tensor


def _snake_rows(height: int, width: int) -> torch.Tensor:
    rows = torch.arange(height).unsqueeze(1)
    cols = torch.arange(width).unsqueeze(0)
    cols = torch.where(rows % 2 == 0, cols, width - 1 - cols)  # odd rows run right to left
    return (rows * width + cols).reshape(-1)


def _snake_cols(height: int, width: int) -> torch.Tensor:
    cols = torch.arange(width).unsqueeze(1)
    rows = torch.arange(height).unsqueeze(0)
    rows = torch.where(cols % 2 == 0, rows, height - 1 - rows)  # odd columns run bottom to top
    return (rows * width + cols).reshape(-1)


def _labels(order: torch.Tensor, width: int) -> torch.Tensor:
    rows, cols = order // width, order % width
    d_row, d_col = rows.diff(), cols.diff()
    moves = torch.zeros_like(d_row)
    moves[d_col == 1] = 1
    moves[d_col == -1] = 2
    moves[d_row == -1] = 3
    moves[d_row == 1] = 4
    return torch.cat([torch.zeros(1, dtype=order.dtype), moves])


@table_cache(maxsize=64)
def _cpu_tables(height: int, width: int) -> ZigZagTables:
    rows, cols = _snake_rows(height, width), _snake_cols(height, width)
    orders = torch.stack([rows, rows.flip(0), cols, cols.flip(0)])
    length = height * width
    inverse = torch.empty_like(orders)
    inverse.scatter_(1, orders, torch.arange(length).expand(NUM_ORDERS, length))
    labels = torch.stack([_labels(o, width) for o in orders])
    return ZigZagTables(orders, inverse, labels)


@table_cache(maxsize=64)
def _device_tables(height: int, width: int, device: torch.device) -> ZigZagTables:
    return ZigZagTables(*(t.to(device) for t in _cpu_tables(height, width)))


def zigzag_tables(height: int, width: int, device="cpu") -> ZigZagTables:
    """The four orders, their inverses and direction labels for an H x W grid (cached per size and device)."""
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"the token grid must be at least 1 x 1, got {height} x {width}")
    return _device_tables(height, width, torch.device(device))
