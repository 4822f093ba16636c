"""LocalMamba's scan directions as index tables: raster, column-major and windowed orders, and their flips.

A direction puts the tokens of an H x W grid (raster order, index h * W + w) into the order one scan
reads them. LocalMamba (arXiv 2403.09338) uses eight of them:

* ``h``: raster order (row by row, left to right).
* ``v``: column-major order (column by column, top to bottom).
* ``wK`` (``w2``, ``w7``; any K >= 1 is accepted): raster order inside K x K windows, the windows
  themselves in raster order. As in the official ``local_scan``, the grid is first padded at the
  bottom and the right to (ceil(H / K) K) x (ceil(W / K) K) with zero tokens, and the scan runs over
  the padded sequence: padded positions are real positions of the scan (they get the convolution's
  and the projections' outputs of a zero input) whose outputs are dropped afterwards.
* ``<name>_flip``: the same order read backwards (the whole, padded sequence reversed).

`order(direction, H, W)` gives the table as a gather index into the raster tokens, with the value
H * W for a padded position (gather from the tokens with one zero token appended). `inverse(...)`
gives, for every raster token, its position in the direction's sequence. `ScanPlan` bundles the
tables of one layer's directions for one grid, with the class token (LocalVim's middle class token is
cut out before the reorder and put back at index (tokens - 1) // 2 of every direction's sequence),
and groups the directions whose sequences have the same length so that one scan call can serve them.

The official code's ``v`` reverse transposes the sequence as if it were H x W; that is the inverse of
the ``v`` order only when H == W (on non-square grids it scrambles the outputs). ``v_reverse=
"official"`` reproduces it; the default ``"exact"`` uses the true inverse. The two agree on the square
grids the released checkpoints were trained on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .tables import table_cache

__all__ = ["DIRECTIONS", "parse_direction", "order", "inverse", "ScanPlan", "scan_plan", "device_plan",
           "V_REVERSE"]

#: the eight directions of LocalMamba's search space
DIRECTIONS = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")
#: "exact": the inverse of every order; "official": the reference code's v / v_flip reverse (a transpose of
#: the sequence read as H x W), which equals the inverse only on square grids
V_REVERSE = ("exact", "official")

_NAME = re.compile(r"^(h|v|w([1-9][0-9]*))(_flip)?$")


def parse_direction(direction: str) -> Tuple[str, int, bool]:
    """(kind "h" / "v" / "w", window K (1 for h / v), flipped) of a direction name such as "w7_flip"."""
    match = _NAME.match(direction) if isinstance(direction, str) else None
    if match is None:
        raise ValueError(
            f"unknown scan direction {direction!r}: expected h, v or wK (K a positive int), optionally with "
            f"'_flip', e.g. one of {DIRECTIONS}"
        )
    kind = match.group(1)[0]
    return kind, int(match.group(2) or 1), match.group(3) is not None


def _check_grid(H: int, W: int) -> None:
    if int(H) < 1 or int(W) < 1:
        raise ValueError(f"the token grid must be at least 1 x 1, got {H} x {W}")


@table_cache(maxsize=512)
def _order(direction: str, H: int, W: int) -> torch.Tensor:
    kind, K, flip = parse_direction(direction)
    _check_grid(H, W)
    grid = torch.arange(H * W).view(H, W)
    if kind == "h":
        seq = grid.reshape(-1)
    elif kind == "v":
        seq = grid.t().reshape(-1)
    else:
        Hg, Wg = math.ceil(H / K), math.ceil(W / K)
        padded = torch.full((Hg * K, Wg * K), H * W, dtype=torch.long)
        padded[:H, :W] = grid
        seq = padded.view(Hg, K, Wg, K).permute(0, 2, 1, 3).reshape(-1)
    return seq.flip(0) if flip else seq


def order(direction: str, H: int, W: int) -> torch.Tensor:
    """Gather index (L',) into the H * W raster tokens in `direction`'s scan order (CPU, int64).

    L' = H * W for h / v, the padded grid's size for wK; padded positions hold H * W.
    """
    return _order(direction, int(H), int(W)).clone()


@table_cache(maxsize=512)
def _inverse(direction: str, H: int, W: int, v_reverse: str) -> torch.Tensor:
    if v_reverse not in V_REVERSE:
        raise ValueError(f"v_reverse must be one of {V_REVERSE}, got {v_reverse!r}")
    kind, _, flip = parse_direction(direction)
    seq = _order(direction, H, W)
    if kind == "v" and v_reverse == "official":
        # the reference reverse: (flip back, then) view the sequence as (H, W) and transpose it, i.e.
        # raster token o = w' * H + h' receives sequence position h' * W + w'
        inv = torch.arange(H * W).view(H, W).t().reshape(-1)
        return (H * W - 1 - inv) if flip else inv
    real = seq < H * W
    inv = torch.empty(H * W, dtype=torch.long)
    inv[seq[real]] = torch.arange(seq.numel())[real]
    return inv


def inverse(direction: str, H: int, W: int, v_reverse: str = "exact") -> torch.Tensor:
    """For every raster token (H * W,), its position in `direction`'s sequence (CPU, int64): the gather
    index that puts a direction's outputs back in image order (padded positions are dropped)."""
    return _inverse(direction, int(H), int(W), v_reverse).clone()


@dataclass(frozen=True)
class ScanGroup:
    """Directions of one layer whose sequences have the same length, scanned in one call.

    indices: positions of these directions in the layer's direction list.
    gather: (k, L') index into the layer's tokens with one zero token appended (index = tokens).
    scatter: (k, tokens) index into each direction's sequence, giving the tokens back in input order.
    """

    indices: Tuple[int, ...]
    gather: torch.Tensor
    scatter: torch.Tensor

    @property
    def seqlen(self) -> int:
        return self.gather.shape[1]

    def to(self, device) -> "ScanGroup":
        return ScanGroup(self.indices, self.gather.to(device), self.scatter.to(device))


@dataclass(frozen=True)
class ScanPlan:
    """The index tables of one layer's directions for one grid (see `scan_plan`)."""

    directions: Tuple[str, ...]
    grid: Tuple[int, int]
    class_token: bool
    groups: Tuple[ScanGroup, ...]
    #: whether some direction reads padded positions (the zero token at index `num_tokens`)
    padded: bool = False

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + int(self.class_token)


    def seqlens(self) -> List[int]:
        """Length of every direction's sequence, in the layer's direction order."""
        out = [0] * len(self.directions)
        for group in self.groups:
            for i in group.indices:
                out[i] = group.seqlen
        return out

    def to(self, device) -> "ScanPlan":
        return ScanPlan(self.directions, self.grid, self.class_token, tuple(g.to(device) for g in self.groups),
                        self.padded)


def _tables(direction: str, H: int, W: int, class_token: bool, v_reverse: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gather (L',), scatter (tokens,)) of one direction, with the middle class token handled."""
    seq, inv = _order(direction, H, W), _inverse(direction, H, W, v_reverse)
    num_patches = H * W
    if not class_token:
        return seq, inv
    # tokens: patches with the class token at c = num_patches // 2; the zero token is at num_patches + 1
    c = num_patches // 2
    as_token = torch.where(seq >= c, seq + 1, seq)  # patch index -> token index; the pad H*W -> H*W + 1
    gather = torch.cat([as_token[:c], torch.tensor([c]), as_token[c:]])
    pos = torch.where(inv >= c, inv + 1, inv)  # position in the sequence once the class token is inserted
    scatter = torch.cat([pos[:c], torch.tensor([c]), pos[c:]])
    return gather, scatter


@table_cache(maxsize=256)
def scan_plan(directions: Tuple[str, ...], H: int, W: int, class_token: bool = False,
              v_reverse: str = "exact") -> ScanPlan:
    """The tables of `directions` on an H x W token grid (CPU tensors, cached; move with `.to(device)`).

    With `class_token`, the layer's tokens are the H * W patches with a class token inserted at index
    (H * W) // 2 (LocalVim's middle class token). Following the official mixer, the token is taken out,
    the patches are put in the direction's order (padded for wK), and the token is inserted at that same
    index of the direction's sequence; on the way back it is taken out of the sequence at that index
    and put back at its place among the tokens.
    """
    directions = tuple(directions)
    for d in directions:
        parse_direction(d)
    H, W = int(H), int(W)
    _check_grid(H, W)
    tables = [_tables(d, H, W, bool(class_token), v_reverse) for d in directions]
    by_length: Dict[int, List[int]] = {}
    for i, (gather, _) in enumerate(tables):
        by_length.setdefault(gather.numel(), []).append(i)
    groups = tuple(
        ScanGroup(tuple(idx), torch.stack([tables[i][0] for i in idx]), torch.stack([tables[i][1] for i in idx]))
        for idx in by_length.values()
    )
    padded = any(bool((g.gather == H * W + int(bool(class_token))).any()) for g in groups)
    return ScanPlan(directions, (H, W), bool(class_token), groups, padded)


@table_cache(maxsize=256)
def device_plan(directions: Tuple[str, ...], H: int, W: int, class_token: bool, v_reverse: str,
                device: torch.device) -> ScanPlan:
    """scan_plan(...) on `device` (cached per device: every forward asks for its input's)."""
    plan = scan_plan(directions, H, W, class_token, v_reverse)
    return plan if device.type == "cpu" else plan.to(device)


def as_direction_lists(directions: Sequence[Sequence[str]]) -> Tuple[Tuple[str, ...], ...]:
    """Validate per-layer direction lists and return them as tuples."""
    out = []
    for layer in directions:
        if isinstance(layer, str):
            raise ValueError(f"each layer's directions must be a list of names, got the string {layer!r}")
        names = tuple(layer)
        if not names:
            raise ValueError("a layer needs at least one scan direction")
        for d in names:
            parse_direction(d)
        out.append(names)
    return tuple(out)
