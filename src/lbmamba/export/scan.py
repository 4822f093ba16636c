"""The LB selective scan as a short graph of standard ONNX ops, for a fixed sequence length.

`selective_scan_fn`'s backends loop over positions (or call kernels) that an ONNX graph cannot hold: traced, the
`torch` backend's per-position loop unrolls into tens of thousands of nodes, and a custom op needs a custom
onnxruntime build. Here the two recurrences of the LB scan (docs/lb-scan.md), h_t = a_t h_{t-1} + x_t over the
whole sequence (h^L) and inside each window backwards (h^R), are written for a fixed length L as a short graph of
elementwise ops on (batch, L, dim, N) tensors: no Loop, no Scan.

The default, `blocked_scan`: the positions are cut into blocks of about sqrt(L); one step per position of a block
runs all blocks at once (a Split takes the positions, then a Mul and an Add per step, a Concat puts them back),
one step per block carries the state from block to block, and one fix-up adds the carried state times the decay
inside the block, exp(CumSum(delta A)) (log-decays <= 0 summed over one block: it can underflow to 0, never
overflow). `window_backward` is the same loop over the W positions of a window, all windows at once. About
2 (sqrt(L) + W) nodes per scan call; O(L) work. It is exact up to float rounding: the sums are reassociated, not
approximated. The file size does not change (no weights in the scan).

The other form, kept for the measurements (FORM["form"] = "doubling"), is a Hillis-Steele prefix scan over the
whole sequence: ceil(log2 L) rounds of `x_t += a_t x_{t-d}; a_t *= a_{t-d}`; fewer nodes, but L log L work and
shifted copies that made it 3x slower in onnxruntime (docs/deploy.md).

`onnx_scan()` switches every lbmamba layer to this form inside a `with` block (through
`lbmamba.ops.scan.scan_stand_in`: `selective_scan_fn` itself calls this form while the block runs), which is how
`lbmamba.export.export_onnx` traces a model. The form is also correct in eager PyTorch (tests compare it
with the reference), only slower than the real backends.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import resolve_window
from ..ops.scan import scan_stand_in

__all__ = ["selective_scan_onnx", "onnx_scan", "prefix_scan"]


def prefix_scan(a: torch.Tensor, x: torch.Tensor):
    """Inclusive scan of h_t = a_t h_{t-1} + x_t along the last axis (h_{-1} = 0), in log2(length) rounds.

    Returns (h, P) with P_t = prod_{s<=t} a_s (the decay from before position 0 to t)."""
    length = x.shape[-1]
    d = 1
    while d < length:
        x = x + a * F.pad(x[..., :length - d], (d, 0))
        a = a * F.pad(a[..., :length - d], (d, 0), value=1.0)
        d *= 2
    return x, a


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` only where the dtype changes (a no-op cast still costs a node in the trace)."""
    return t if t.dtype == dtype else t.to(dtype)


def _bc_positions_second(t: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as a tensor that broadcasts against (batch, L, dim, N): (dim, N), (batch, L, 1, N) or
    (batch, L, dim, N) for grouped ones."""
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return t.transpose(1, 2).unsqueeze(2)
    groups = t.shape[1]
    t = t.permute(0, 3, 1, 2)  # (batch, L, G, N)
    if groups == 1:
        return t
    return t.repeat_interleave(dim // groups, dim=2)


def _blocks(t: torch.Tensor, size: int, value: float) -> torch.Tensor:
    """Axis 1 (the positions) of `t` cut into blocks of `size` positions, (batch, n_blocks, size, ...), the last
    one padded with `value`."""
    n = -(-t.shape[1] // size)
    pad = n * size - t.shape[1]
    if pad:
        fill = t[:, :pad]
        fill = torch.zeros_like(fill) if value == 0 else torch.full_like(fill, value)
        t = torch.cat([t, fill], 1)
    return t.reshape(t.shape[:1] + (n, size) + t.shape[2:])


def _positions(t: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, n, size, ...) blocks back to (batch, length, ...) positions (the padding dropped)."""
    t = t.reshape(t.shape[:1] + (t.shape[1] * t.shape[2],) + t.shape[3:])
    return t[:, :length] if t.shape[1] != length else t


def blocked_scan(a: torch.Tensor, x: torch.Tensor, block: int, log_a: Optional[torch.Tensor] = None,
                 decay: bool = True):
    """h_t = a_t h_{t-1} + x_t along axis 1 (h_{-1} = 0) of (batch, L, ...) tensors, in blocks of `block`
    positions: one step per position of a block (all blocks at once), then one step per block for the states
    carried between blocks, then one fix-up. Returns (h, P) with P_t = prod_{s<=t} a_s (None unless `decay`).

    The graph is kept short, since every scan of a model emits it again: the positions of a block are taken with
    one Split (not a Gather per position) and put back with one Concat, so a step is one Mul and one Add; with
    `log_a` (log a, which the caller has: a = exp(delta A)) the decay inside a block is exp(CumSum(log a)), two
    nodes, where a product per position would add a Mul per step (the sums stay within a block and are <= 0:
    the exp cannot overflow)."""
    L = x.shape[1]
    xb, ab = _blocks(x, block, 0.0), _blocks(a, block, 1.0)  # (batch, nb, block, ...)
    nb = xb.shape[1]
    xs, as_ = xb.split(1, 2), ab.split(1, 2)  # (batch, nb, 1, ...) each
    h = xs[0]
    hs = [h]
    for j in range(1, block):  # inside every block at once
        h = as_[j] * h + xs[j]
        hs.append(h)
    h_in = torch.cat(hs, 2)  # (batch, nb, block, ...)
    p_in = None
    if nb > 1 or decay:  # the decay from each block's start to each of its positions
        if log_a is not None:
            p_in = torch.exp(torch.cumsum(_blocks(log_a, block, 0.0), 2))
        else:
            p = as_[0]
            ps = [p]
            for j in range(1, block):
                p = as_[j] * p
                ps.append(p)
            p_in = torch.cat(ps, 2)
    if nb > 1:
        ends_h, ends_p = h_in[:, :, block - 1:].split(1, 1), p_in[:, :, block - 1:].split(1, 1)  # (batch, 1, 1, ...)
        carry = [ends_h[0]]  # the state at the end of each block
        for c in range(1, nb - 1):
            carry.append(ends_p[c] * carry[-1] + ends_h[c])
        before = torch.cat([torch.zeros_like(carry[0])] + carry, 1)  # (batch, nb, 1, ...): the state before each
        h_in = h_in + p_in * before
        if decay:  # the cumulative decay from position 0: the blocks' own times every block before
            total = [ends_p[0]]
            for c in range(1, nb - 1):
                total.append(total[-1] * ends_p[c])
            p_in = p_in * torch.cat([torch.ones_like(total[0])] + total, 1)
    return _positions(h_in, L), (_positions(p_in, L) if decay else None)


def window_backward(a: torch.Tensor, x: torch.Tensor, W: int) -> torch.Tensor:
    """a_t h^R_{t+1} along axis 1 of (batch, L, ...) tensors: h^R_t = a_t h^R_{t+1} + x_t inside windows of W
    positions (zero past each window's end), one step per position of a window, all windows at once (a Split
    in, a Mul and an Add per step, a Concat out)."""
    xw, aw = _blocks(x, W, 0.0), _blocks(a, W, 0.0)
    xs, as_ = xw.split(1, 2), aw.split(1, 2)
    r = xs[W - 1]
    outs = [torch.zeros_like(r)]  # a h^R past the window end
    for j in range(W - 2, -1, -1):
        g = as_[j] * r  # a_j h^R_{j+1}
        outs.append(g)
        r = g + xs[j]
    return _positions(torch.cat(outs[::-1], 2), x.shape[1])


def block_length(seqlen: int) -> int:
    """Positions per block of `blocked_scan`: about sqrt(L), which makes the two loops equally long."""
    return max(1, math.ceil(math.sqrt(seqlen)))


#: which form `selective_scan_onnx` uses: "blocked" (default) or "doubling" (for the measurements)
FORM = {"form": "blocked"}


def selective_scan_onnx(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, prev_state=None, *, window="auto", position_offset=0,
                        backend="auto"):
    """`selective_scan_fn` (same arguments and results, float32) in standard ONNX-exportable ops; `backend` is
    accepted and ignored. `prev_state` (batch, dim, N), when given, is the forward state before position 0.
    A position_offset other than 0 (windows aligned across chunks of one sequence) has no ONNX form here."""
    if position_offset:
        raise ValueError(f"selective_scan_onnx: position_offset must be 0 in an exported graph, got {position_offset}")
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    dim, L = u.shape[1], u.shape[2]
    W = min(resolve_window(window, L), L)
    dt = _as(delta, ct).transpose(1, 2)  # positions second: (batch, L, dim)
    if delta_bias is not None:
        dt = dt + _as(delta_bias, ct)
    if delta_softplus:
        dt = F.softplus(dt)
    u_ = _as(u, ct).transpose(1, 2)
    log_a = dt.unsqueeze(-1) * _as(A, ct)  # (batch, L, dim, N)
    a = torch.exp(log_a)
    x = (dt * u_).unsqueeze(-1) * _bc_positions_second(_as(B, ct), dim)
    if FORM["form"] == "doubling":
        h, decay = prefix_scan(a.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1))
        h, decay = h.permute(0, 3, 1, 2), decay.permute(0, 3, 1, 2)
    else:
        h, decay = blocked_scan(a, x, block_length(L), log_a=log_a, decay=prev_state is not None)
    if prev_state is not None:
        h = h + decay * _as(prev_state, ct).unsqueeze(1)
    last = h[:, -1]
    if W > 1:
        h = h + window_backward(a, x, W)
    y = (h * _bc_positions_second(_as(C, ct), dim)).sum(-1)  # (batch, L, dim)
    if D is not None:
        y = y + _as(D, ct) * u_
    if z is not None:
        y = y * F.silu(_as(z, ct).transpose(1, 2))
    out = _as(y.transpose(1, 2), u.dtype)
    return (out, last) if return_last_state else out


@contextlib.contextmanager
def onnx_scan():
    """Inside the block, every call of `selective_scan_fn` (so every lbmamba layer) runs `selective_scan_onnx`;
    on leaving it, the layers' cached index tables are emptied (see `_clear_table_caches`)."""
    try:
        with scan_stand_in(selective_scan_onnx):
            yield
    finally:
        _clear_table_caches()


def _clear_table_caches() -> None:
    """Empty the layers' cached index tables (functools caches of the scan orders): a trace fills them with the
    tracer's tensors, which eager calls after it must not get."""
    for name, module in list(sys.modules.items()):
        if name.startswith("lbmamba.") and module is not None:
            for value in list(vars(module).values()):
                if callable(value) and hasattr(value, "cache_clear") and getattr(value, "__module__", "") == name:
                    value.cache_clear()
