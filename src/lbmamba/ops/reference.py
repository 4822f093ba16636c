"""The readable, sequential definition of the LB selective scan: the ground truth for every backend.

It follows `docs/lb-scan.md` step by step, with autograd doing the backward. It materialises
(batch, dim, L, N) tensors and loops over positions in Python, so it is for testing and for tiny
problems, not for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import ScanShape, check_scan_args


def expand_bc(t: torch.Tensor, shape: ScanShape, dtype: torch.dtype) -> torch.Tensor:
    """B or C as (batch, dim, L, N) (or (1, dim, 1, N) when constant), in `dtype`."""
    t = t.to(dtype)
    if t.dim() == 2:  # constant (dim, N)
        return t[None, :, None, :]
    if t.dim() == 3:  # variable (batch, N, L)
        t = t.unsqueeze(1)
    groups = t.shape[1]  # grouped (batch, G, N, L): channel d uses group d // (dim // G)
    t = t.repeat_interleave(shape.dim // groups, dim=1)
    return t.transpose(2, 3)


def discretize(u, delta, A, B, delta_bias, delta_softplus, shape: ScanShape, dtype):
    """Steps 1-2 of the definition: per-position decay a_t and input x_t, both (batch, dim, L, N)."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    a = torch.exp(dt[..., None] * A.to(dtype)[:, None, :])
    x = (dt * u.to(dtype))[..., None] * expand_bc(B, shape, dtype)
    return a, x


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    prev_state=None,
    *,
    window="auto",
    position_offset=0,
):
    """The LB selective scan, computed sequentially (float64 inputs stay float64, others run in fp32).

    Same arguments and results as :func:`lbmamba.ops.selective_scan_fn`.
    """
    shape = check_scan_args(u, delta, A, B, C, D, z, delta_bias, window, prev_state, position_offset)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    a, x = discretize(u, delta, A, B, delta_bias, delta_softplus, shape, dtype)
    L, W = shape.seqlen, shape.window

    # Global forward state h^L, crossing every window boundary (and entering from prev_state).
    h = torch.zeros_like(x[:, :, 0]) if prev_state is None else prev_state.to(dtype)
    forward_states = []
    for t in range(L):
        h = a[:, :, t] * h + x[:, :, t]
        forward_states.append(h)
    h_left = torch.stack(forward_states, dim=2)

    # Local backward state h^R, restarted at zero past the end of every window of W positions; the windows
    # are aligned at global position 0, position t of this call being position_offset + t.
    backward_states = [None] * L
    head = (-position_offset) % W  # positions before the first aligned window start: a window's tail
    starts = ([0] if head else []) + list(range(head, L, W))
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else L
        r = torch.zeros_like(x[:, :, 0])
        for t in reversed(range(start, min(end, L))):
            r = a[:, :, t] * r + x[:, :, t]
            backward_states[t] = r
    h_right = torch.stack(backward_states, dim=2)

    states = h_left + h_right - x  # x_t is counted once
    return readout(states, h_left, u, C, D, z, return_last_state, shape, dtype)


def readout(states, h_left, u, C, D, z, return_last_state, shape: ScanShape, dtype):
    """Step 7 of the definition: y = C·h + D u, gated by silu(z); plus the last forward state."""
    y = (states * expand_bc(C, shape, dtype)).sum(-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(u.dtype)
    return (out, h_left[:, :, -1]) if return_last_state else out
