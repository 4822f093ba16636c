"""`table_cache`: the one cache for the index tables of the 2-D scan orders (cross-scan, zigzag, local windows)."""

from __future__ import annotations

import functools

import torch


def table_cache(maxsize: int):
    """functools.lru_cache for a function that builds index tensors, which it builds outside inference mode.

    A table first built under torch.inference_mode() (an evaluation, a benchmark's inference pass) would
    otherwise be an inference tensor, and every later training step that indexes with it would fail
    ("Inference tensors cannot be saved for backward").
    """

    def wrap(build):
        return functools.lru_cache(maxsize=maxsize)(torch.inference_mode(False)(build))

    return wrap
