"""Generated tasks whose labels need local context from both sides along the token sequence.

A canvas is a grid of cells of CELL x CELL pixels (one channel, values in [-1, 1]); with patch CELL each
cell is one token, and tokens are flattened row by row, so "both sides" means the cells to the left and to
the right in the same row, which are the neighbours before and after a token in the sequence.

A *capped bar* is a run of 3 to 5 cells of one row: a cap cell at each end and 1 to 3 bar cells between
them. A cap is of kind A (a filled square) or kind B (a hollow square); the pair (left cap, right cap)
gives the bar one of four kinds: AA, AB, BA, BB. Nothing else tells the kinds apart: the bar cells look
alike whatever the caps, and each cap shape is symmetric left to right, so a cap does not show whether it is
a bar's left or right end. Background cells carry faint noise; every
cell carries a random brightness jitter.

* ``capped_bars`` (segmentation): 8 x 8 cells (32 x 32 px), one to two bars in each of four random rows.
  Mask: 0 background, 1 + kind (1 AA, 2 AB, 3 BA, 4 BB) on every pixel of a bar, caps included. A
  pixel's class is fixed by two cells, one on each side of it, at most four cells away: a token that
  sees one side only can narrow the four kinds to two.
* ``marked_bar`` (classification): 8 x 8 cells, four bars in distinct rows, one of each kind, one of them *marked*
  (its bar cells carry a checker pattern instead of stripes). Label: the marked bar's kind (4 classes).
  The marked cells say which bar counts and its caps say its kind, so the answer needs the caps on both
  sides of the marked cells, then a global read-out that finds the one marked bar among the others.

Why a one-way scan with flips does worse here than an LB scan, at the same depth: in each layer a
one-way scan gives each token the context on one side only. A token learns the other side in the next
layer, after the flip, and only through the state the first layer left in the tokens ahead of it, whose
recurrence has meanwhile mixed in everything else along the row and the rows before it. An LB scan gives
every token both sides within its window in every layer, so the pair (left cap, right cap) is available
after one layer instead of two, and the later layers are free for the rest (finding the marked bar).
Vim's two scans per layer give both sides too, at twice the scan cost.

No-context levels (what a model whose tokens never exchange information can do; tests train one):
``capped_bars`` background pixels are easy, bar pixels are right one time in four (caps: one in two);
``marked_bar``: every image holds one bar of each kind, so its cells, counted, say nothing about the
marked one: a model blind to which cells are neighbours is right one time in four.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

#: cells are CELL x CELL pixels: patch CELL gives one token per cell
CELL = 4
#: the canvas in cells (rows, columns)
GRID = (8, 8)
#: bar lengths in cells, caps included
BAR_LENGTHS = (3, 5)
#: the four bar kinds in label order: (left cap, right cap), 0 = A (filled), 1 = B (hollow)
KINDS = ((0, 0), (0, 1), (1, 0), (1, 1))
SEG_CLASSES = ("background", "AA", "AB", "BA", "BB")
CLS_CLASSES = ("AA", "AB", "BA", "BB")


def _pattern(rows):
    return np.array([[float(c) for c in r] for r in rows], np.float32)


#: cell patterns, CELL x CELL, 1 = ink
CAPS = (_pattern(["0000", "0110", "0110", "0000"]),  # A: a filled 2 x 2 square
        _pattern(["1111", "1001", "1001", "1111"]))  # B: a hollow 4 x 4 square
BAR = _pattern(["0000", "1111", "1111", "0000"])      # bar cells: a horizontal band
MARKED = _pattern(["1010", "0101", "1010", "0101"])   # the marked bar's cells: a checker


def _draw_bar(canvas, mask, row: int, start: int, length: int, kind: int, body: np.ndarray, rng) -> None:
    left, right = KINDS[kind]
    cells = [CAPS[left], *([body] * (length - 2)), CAPS[right]]
    y = row * CELL
    for k, pattern in enumerate(cells):
        x = (start + k) * CELL
        canvas[y:y + CELL, x:x + CELL] = pattern * rng.uniform(0.7, 1.0)
        if mask is not None:
            mask[y:y + CELL, x:x + CELL] = 1 + kind


def _places(rng, count: int) -> list:
    """`count` non-overlapping (start, length) runs in one row, with at least one empty cell between them."""
    cols = GRID[1]
    for _ in range(100):
        runs = []
        for _ in range(count):
            length = int(rng.integers(BAR_LENGTHS[0], BAR_LENGTHS[1] + 1))
            start = int(rng.integers(0, cols - length + 1))
            if all(start + length < s or s + n < start for s, n in runs):
                runs.append((start, length))
        if len(runs) == count:
            return runs
    return runs


def _canvas(rng) -> np.ndarray:
    return rng.uniform(0.0, 0.15, size=(GRID[0] * CELL, GRID[1] * CELL)).astype(np.float32)


def make_capped_bars(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(images (n, 1, 32, 32) float32 in [0, 1], masks (n, 32, 32) int64 in 0..4): see the module's docstring."""
    rng = np.random.default_rng([seed, 11])
    h, w = GRID[0] * CELL, GRID[1] * CELL
    images = np.zeros((n, 1, h, w), np.float32)
    masks = np.zeros((n, h, w), np.int64)
    for i in range(n):
        canvas = _canvas(rng)
        for row in rng.choice(GRID[0], size=4, replace=False):
            for start, length in _places(rng, int(rng.integers(1, 3))):
                _draw_bar(canvas, masks[i], int(row), start, length, int(rng.integers(len(KINDS))), BAR, rng)
        images[i, 0] = canvas
    return images, masks


def make_marked_bar(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(images (n, 1, 32, 32) float32 in [0, 1], labels (n,) int64 in 0..3): see the module's docstring."""
    rng = np.random.default_rng([seed, 13])
    h, w = GRID[0] * CELL, GRID[1] * CELL
    images = np.zeros((n, 1, h, w), np.float32)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        canvas = _canvas(rng)
        rows = rng.choice(GRID[0], size=len(KINDS), replace=False)
        kinds = rng.permutation(len(KINDS))  # one bar of each kind: the image's cells, counted, say nothing
        for k, (row, kind) in enumerate(zip(rows, kinds)):
            (start, length), = _places(rng, 1)
            _draw_bar(canvas, None, int(row), start, length, int(kind), MARKED if k == 0 else BAR, rng)
        labels[i] = kinds[0]
        images[i, 0] = canvas
    return images, labels


def as_tensors(images: np.ndarray, targets: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images scaled to [-1, 1] and targets, as tensors."""
    return torch.from_numpy((images - 0.5) / 0.5), torch.from_numpy(targets)
