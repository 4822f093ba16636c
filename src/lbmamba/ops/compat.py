"""mamba_ssm's other scan entry points, on the LB scan: `selective_state_update` (one token on a carried
state, for recurrent inference), `selective_window_update` (the LB scan's streaming unit: a window of
tokens on a carried state) and `mamba_inner_fn` (the Mamba mixer's fused path).

Same signatures and results as mamba_ssm's (`mamba_ssm.ops.triton.selective_state_update` and
`mamba_ssm.ops.selective_scan_interface.mamba_inner_fn`), so that code written for mamba_ssm (its `Mamba`
module's fast path and its `step`) runs here by changing imports. They are compositions of plain PyTorch
ops and `selective_scan_fn`: autograd differentiates them, on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scan import selective_scan_fn


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One position of the vanilla (window 1) selective scan on a carried state, as mamba_ssm's.

    Args:
        state: (batch, dim, N) or (batch, nheads, dim, N): h before this position; updated in place to
            h = exp(Δ A) h + Δ B x.
        x, dt: (batch, dim) or (batch, nheads, dim).   A: (dim, N) or (nheads, dim, N).
        B, C: (batch, N) or (batch, ngroups, N), nheads % ngroups == 0.
        D, dt_bias: (dim,) or (nheads, dim), or None.   z: like x, or None (output gate silu(z)).
        dt_softplus: Δ = softplus(dt + dt_bias), else dt + dt_bias.

    Returns:
        y (like x, in x's dtype) = C·h + D x, times silu(z) when z is given.

    The arithmetic is float32 (float64 for float64 inputs), as the scan's. It is exactly one step of
    `selective_scan_fn(..., window=1)`; for window W > 1 stream whole windows with `selective_window_update`.
    """
    has_heads = state.dim() == 4
    if state.dim() not in (3, 4):
        raise ValueError(f"state must have shape (batch, dim, N) or (batch, nheads, dim, N), got {tuple(state.shape)}")
    ct = _compute_dtype(x)

    h = state if has_heads else state.unsqueeze(1)
    x4, dt4, z4 = (None if t is None else (t if has_heads else t.unsqueeze(1)) for t in (x, dt, z))
    A3 = A if has_heads else A.unsqueeze(0)
    B3 = B if B.dim() == 3 else B.unsqueeze(1)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    D2 = None if D is None else (D if D.dim() == 2 else D.unsqueeze(0))
    bias2 = None if dt_bias is None else (dt_bias if dt_bias.dim() == 2 else dt_bias.unsqueeze(0))
    batch, nheads, dim, dstate = h.shape
    expected = {"x": (x4, (batch, nheads, dim)), "dt": (dt4, (batch, nheads, dim)), "z": (z4, (batch, nheads, dim)),
                "A": (A3, (nheads, dim, dstate)), "D": (D2, (nheads, dim)), "dt_bias": (bias2, (nheads, dim))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            given = {"x": x, "dt": dt, "z": z, "A": A, "D": D, "dt_bias": dt_bias}[name]
            shape = shape if has_heads else shape[:1] + shape[2:] if name in ("x", "dt", "z") else shape[1:]
            raise ValueError(f"{name} must have shape {shape} for a state of shape {tuple(state.shape)}, "
                             f"got {tuple(given.shape)}")
    for name, t in (("B", B3), ("C", C3)):
        if t.shape[0] != batch or t.shape[2] != dstate or nheads % t.shape[1] != 0:
            raise ValueError(f"{name} must have shape (batch, N) = ({batch}, {dstate}) or (batch, ngroups, N) with "
                             f"nheads ({nheads}) divisible by ngroups, got {tuple(t.shape)}")
    delta = dt4.to(ct)
    if bias2 is not None:
        delta = delta + bias2.to(ct)
    if dt_softplus:
        delta = F.softplus(delta)
    per_group = nheads // B3.shape[1]
    Bh = B3.to(ct).repeat_interleave(per_group, dim=1)[:, :, None, :]  # (batch, nheads, 1, N)
    Ch = C3.to(ct).repeat_interleave(nheads // C3.shape[1], dim=1)[:, :, None, :]
    decay = torch.exp(delta[..., None] * A3.to(ct))
    new = decay * h.to(ct) + (delta * x4.to(ct))[..., None] * Bh
    h.copy_(new)
    y = (new * Ch).sum(-1)
    if D2 is not None:
        y = y + D2.to(ct) * x4.to(ct)
    if z4 is not None:
        y = y * F.silu(z4.to(ct))
    y = y.to(x.dtype)
    return y if has_heads else y.squeeze(1)


def selective_window_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                            window=None, position_offset=0, backend="auto"):
    """The LB scan's streaming step: the next T positions of a sequence on its carried forward state.

    The LB scan's output at a position depends on the later positions of its window, so a stream of the
    LB scan advances a whole window at a time: with T = W (the window) from the sequence's start (or
    positions cut at multiples of W), the outputs of successive calls are exactly those of one
    `selective_scan_fn(..., window=W)` over the whole sequence. A last, shorter call (the sequence's end)
    is the truncated last window, as in the one call.

    Args:
        state: (batch, dim, N), the forward state h^L before these positions (zeros at the start); updated in
            place to the state after them.
        u, delta, z, B, C, D, delta_bias, delta_softplus: as `selective_scan_fn`, over T positions.
        window: W; None: T (these positions are one window).
        position_offset, backend: as `selective_scan_fn`.

    Returns:
        out (batch, dim, T), in u's dtype.
    """
    window = u.shape[-1] if window is None else window
    # with autograd on, the scan may keep prev_state for its backward: give it a copy, as `state` changes below
    prev = state.clone() if torch.is_grad_enabled() else state
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, prev, window=window,
                                  position_offset=position_offset, backend=backend)
    with torch.no_grad():
        state.copy_(last)
    return out


def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal convolution over the sequence: x (batch, dim, L), weight (dim, 1, K) or (dim, K);
    position t sees positions t-K+1..t (zeros before 0). activation: None or "silu" (as causal_conv1d_fn)."""
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    width = weight.shape[-1]
    out = F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    if activation in ("silu", "swish"):
        return F.silu(out)
    if activation is not None:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return out


_INNER_SCANS = ("forward", "lb")


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
                   A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True,
                   checkpoint_lvl=1, *, scan="forward", window=None, backend="auto"):
    """The Mamba-1 mixer after its input projection, as mamba_ssm's `mamba_inner_fn`:
    causal conv1d + silu, x_proj, dt_proj, the selective scan gated by silu(z), out_proj.

    Args (mamba_ssm's):
        xz: (batch, 2 * d_inner, L), x and z stacked on the channel axis (in_proj's output, transposed).
        conv1d_weight: (d_inner, 1, K); conv1d_bias: (d_inner,) or None.
        x_proj_weight: (dt_rank + 2 N, d_inner); delta_proj_weight: (d_inner, dt_rank).
        out_proj_weight: (d_model, d_inner); out_proj_bias: (d_model,) or None.
        A: (d_inner, N).  B, C: None (taken from x_proj's output, per position) or given as the scan takes them.
        D, delta_bias: (d_inner,) or None.  B_proj_bias, C_proj_bias: (N,) or None, added to the projected B / C.
        delta_softplus: softplus on delta + delta_bias.
        checkpoint_lvl: accepted for compatibility; autograd keeps what the ops need.
    Keyword-only (lbmamba's):
        scan: "forward" (window 1: mamba_ssm's result) or "lb" (the LB scan with `window`, default "auto").
        window: the LB window (scan="lb"); backend: as `selective_scan_fn`.

    Returns:
        (batch, L, d_model).
    """
    if scan not in _INNER_SCANS:
        raise ValueError(f"scan must be one of {_INNER_SCANS}, got {scan!r}")
    if scan == "forward":
        if window not in (None, 1):
            raise ValueError(f"window must be 1 or None with scan='forward' (the vanilla scan), got {window!r}; "
                             "use scan='lb' for windows > 1")
        window = 1
    elif window is None:
        window = "auto"
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    dt_rank = delta_proj_weight.shape[1]
    dstate = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d(x, conv1d_weight, conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (batch, L, dt_rank + 2N)
    delta = F.linear(x_dbl[..., :dt_rank], delta_proj_weight).transpose(1, 2)  # (batch, d_inner, L)
    if B is None:
        B = x_dbl[..., dt_rank:dt_rank + dstate]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        B = B.transpose(1, 2)  # (batch, N, L)
    if C is None:
        C = x_dbl[..., -dstate:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        C = C.transpose(1, 2)
    y = selective_scan_fn(x, delta, A, B, C, D, z, delta_bias, delta_softplus, window=window, backend=backend)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
