"""SRMamba (MambaMIL): a forward scan plus a second scan over the sequence re-ordered with a stride, so
that positions `rate` apart in a long bag become neighbours; and the re-ordering itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mixer import Mamba

__all__ = ["SRMamba", "sr_reorder", "sr_restore", "sr_permutation"]


def sr_reorder(x: torch.Tensor, rate: int) -> torch.Tensor:
    """Re-order the last axis with stride `rate` (SRMamba): (..., L) -> (..., k * rate), k = ceil(L / rate).

    The sequence is zero-padded at the end to k * rate, viewed as (k, rate), transposed to (rate, k)
    and flattened: the result lists positions 0, rate, 2 rate, ..., then 1, rate + 1, ..., and so on.
    """
    if rate < 1:
        raise ValueError(f"rate must be a positive int, got {rate!r}")
    length = x.shape[-1]
    k = -(-length // rate)
    if k * rate != length:
        x = F.pad(x, (0, k * rate - length))
    return x.unflatten(-1, (k, rate)).transpose(-1, -2).flatten(-2)


def sr_restore(x: torch.Tensor, rate: int, length: int) -> torch.Tensor:
    """Undo `sr_reorder` on the last axis and drop the padding: (..., k * rate) -> (..., length)."""
    k = x.shape[-1] // rate
    if k * rate != x.shape[-1] or length > x.shape[-1]:
        raise ValueError(f"cannot restore a sequence of {x.shape[-1]} positions with rate {rate} to length {length}")
    return x.unflatten(-1, (rate, k)).transpose(-1, -2).flatten(-2)[..., :length]


def sr_permutation(length: int, rate: int) -> torch.Tensor:
    """The positions `sr_reorder` visits, in order, with -1 for the padding (a LongTensor of k * rate)."""
    idx = torch.arange(length, dtype=torch.float64)
    out = sr_reorder(idx + 1, rate) - 1  # padding (0) becomes -1
    return out.long()


class SRMamba(Mamba):
    """SRMamba mixer: a forward scan plus an independent scan over the stride-`rate` re-ordered sequence.

    Shares in_proj / out_proj; the second branch has its own conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b
    (MambaMIL's parameter names). The two branch outputs are summed before out_proj (no division).

    Args:
        d_model, d_state, d_conv, expand and the rest: as `lbmamba.nn.Mamba`.
        rate: the stride of the re-ordering (MambaMIL: 10).
        scan: "forward" (plain scans, SRMamba) or "lb" (LB scans in both branches, LB-SRMamba).
        window: the LB window of both scans (scan="lb").
    """

    def __init__(self, d_model: int, rate: int = 10, scan: str = "forward", window="auto", **kwargs):
        if scan not in ("forward", "lb"):
            raise ValueError(f"SRMamba scan must be 'forward' or 'lb', got {scan!r}")
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
            raise ValueError(f"rate must be a positive int, got {rate!r}")
        super().__init__(d_model, scan=scan, window=window, **kwargs)
        self.rate = rate
        self.add_branch("_b")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model)."""
        xz = self.project_in(hidden_states)
        length = xz.shape[-1]
        y = self.ssm_branch(xz, *self.branch(), self.window)
        y_r = self.ssm_branch(sr_reorder(xz, self.rate), *self.branch("_b"), self.window)
        y = y + sr_restore(y_r, self.rate, length)
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rate={self.rate}"
