"""The "torch" backend: the LB scan in vectorised PyTorch, for any device torch supports.

Both recurrences are evaluated as log-depth parallel prefix scans (Hillis-Steele) over the
associative pair operator (a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2), which is exact and stable
(no division, no exp of cumulative sums). Autograd does the backward. It materialises
(batch, dim, L, N) tensors, so it trades memory for portability; the fused backends do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_scan_args
from .reference import discretize, readout


def linear_scan(a: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Inclusive scan h_t = a_t h_{t-1} + x_t along `axis` (h_{-1} = 0), in log2(length) steps."""
    length = a.shape[axis]
    step = 1
    while step < length:
        a_head, a_tail = a.narrow(axis, 0, step), a.narrow(axis, step, length - step)
        x_head, x_tail = x.narrow(axis, 0, step), x.narrow(axis, step, length - step)
        a_prev, x_prev = a.narrow(axis, 0, length - step), x.narrow(axis, 0, length - step)
        x = torch.cat([x_head, torch.addcmul(x_tail, a_tail, x_prev)], dim=axis)
        a = torch.cat([a_head, a_tail * a_prev], dim=axis)
        step *= 2
    return x


def windowed_reverse_scan(a: torch.Tensor, x: torch.Tensor, window: int) -> torch.Tensor:
    """h^R_t = a_t h^R_{t+1} + x_t inside consecutive windows along dim 2 (batch, dim, L, N)."""
    batch, dim, seqlen, dstate = x.shape
    pad = (-seqlen) % window
    if pad:  # positions past L carry x = 0, so they add nothing to the truncated last window
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad), value=0.0)
    shape = (batch, dim, (seqlen + pad) // window, window, dstate)
    a_w = a.reshape(shape).flip(3)
    x_w = x.reshape(shape).flip(3)
    h = linear_scan(a_w, x_w, axis=3).flip(3).reshape(batch, dim, seqlen + pad, dstate)
    return h[:, :, :seqlen]


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, *, window="auto"
):
    shape = check_scan_args(u, delta, A, B, C, D, z, delta_bias, window)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    a, x = discretize(u, delta, A, B, delta_bias, delta_softplus, shape, dtype)
    h_left = linear_scan(a, x, axis=2)
    if shape.window == 1:
        states = h_left
    else:
        states = h_left + windowed_reverse_scan(a, x, shape.window) - x
    return readout(states, h_left, u, C, D, z, return_last_state, shape, dtype)
