"""The LB selective scan as a short graph of standard ONNX ops, for a fixed sequence length.

`selective_scan_fn`'s backends loop over positions (or call kernels) that an ONNX graph cannot hold: traced, the
`torch` backend's per-position loop unrolls into tens of thousands of nodes, and a custom op needs a custom
onnxruntime build. Here the two recurrences of the LB scan (docs/lb-scan.md) are written as *parallel prefix
scans* (Hillis-Steele) of the affine maps h -> a_t h + x_t: after round k every position holds the composition of
the 2^k maps ending at it, so

    for d = 1, 2, 4, ...:   x_t += a_t x_{t-d};   a_t *= a_{t-d}      (positions before 0: x = 0, a = 1)

leaves h_t in x and the cumulative decay prod_{s<=t} a_s in a, after ceil(log2 L) rounds of about 8 nodes each
(Slice, Pad, Mul, Add). The global forward state h^L runs over the whole sequence; the window-local backward
state h^R runs over a (windows, W) view of the reversed-in-window problem, so each window restarts by itself
(the Pad of the shift fills the zero state at every window end). Everything is elementwise on (batch, dim, N, L)
tensors: no Loop, no Scan, no exp of a cumulative sum that could overflow (products of decays in (0, 1] only
underflow to 0, which is their value). It is exact up to float rounding: the sums are reassociated, not
approximated. The file size does not change (no weights in the scan); the node count per scan call is about
8 (ceil(log2 L) + ceil(log2 W)) + 20.

`onnx_scan()` switches every lbmamba layer to this form inside a `with` block (through
`lbmamba.ops.scan.scan_stand_in`: `selective_scan_fn` itself calls this form while the block runs), which is how
`lbmamba.export.export_onnx` traces a model. The form is also correct in eager PyTorch (tests compare it
with the reference), only slower than the real backends.
"""

from __future__ import annotations

import contextlib
import math
import sys

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


def _bc_positions_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as a tensor that broadcasts against (L, batch, dim, N): (dim, N), (L, batch, 1, N) or
    (L, batch, dim, N) for grouped ones."""
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return t.permute(2, 0, 1).unsqueeze(2)
    groups = t.shape[1]
    t = t.permute(3, 0, 1, 2)  # (L, batch, G, N)
    if groups == 1:
        return t
    return t.repeat_interleave(dim // groups, dim=2)


def _pad_first(t: torch.Tensor, pad: int, value: float) -> torch.Tensor:
    """`pad` (<= len(t)) positions of `value` after the end of axis 0."""
    fill = torch.zeros_like(t[:pad]) if value == 0 else torch.full_like(t[:pad], value)
    return torch.cat([t, fill])  # (F.pad of axis 0 comes out of the TorchScript exporter with its axes mixed up)


def _blocks(t: torch.Tensor, size: int, value: float) -> torch.Tensor:
    """Axis 0 of `t` cut into blocks of `size` positions, (n_blocks, size, ...), the last one padded with `value`."""
    n = -(-t.shape[0] // size)
    pad = n * size - t.shape[0]
    if pad:
        t = _pad_first(t, pad, value)
    return t.reshape((n, size) + t.shape[1:])


def blocked_scan(a: torch.Tensor, x: torch.Tensor, block: int):
    """h_t = a_t h_{t-1} + x_t along axis 0 (h_{-1} = 0) of (L, ...) tensors, in blocks of `block` positions:
    one step per position of a block (all blocks at once), then one step per block for the states carried
    between blocks, then one fix-up. Returns (h, P) with P_t = prod_{s<=t} a_s."""
    L = x.shape[0]
    xb, ab = _blocks(x, block, 0.0), _blocks(a, block, 1.0)
    nb = xb.shape[0]
    h, p = xb[:, 0], ab[:, 0]
    hs, ps = [h], [p]
    for j in range(1, block):  # inside every block at once
        aj = ab[:, j]
        h = aj * h + xb[:, j]
        p = aj * p
        hs.append(h)
        ps.append(p)
    h_in = torch.stack(hs, 1)  # (nb, block, ...)
    p_in = torch.stack(ps, 1)
    carry = [h_in[0, -1]]  # the state at the end of each block
    for c in range(1, nb):
        carry.append(p_in[c, -1] * carry[-1] + h_in[c, -1])
    if nb > 1:
        before = torch.stack([torch.zeros_like(carry[0])] + carry[:-1]).unsqueeze(1)  # (nb, 1, ...)
        h_in = h_in + p_in * before
        # the cumulative decay from position 0: the blocks' own times every block before
        total = [p_in[0, -1]]
        for c in range(1, nb):
            total.append(total[-1] * p_in[c, -1])
        p_in = p_in * torch.stack([torch.ones_like(total[0])] + total[:-1]).unsqueeze(1)
    h_out = h_in.reshape((nb * block,) + x.shape[1:])
    p_out = p_in.reshape((nb * block,) + x.shape[1:])
    if nb * block != L:
        h_out, p_out = h_out[:L], p_out[:L]
    return h_out, p_out


def window_backward(a: torch.Tensor, x: torch.Tensor, W: int) -> torch.Tensor:
    """a_t h^R_{t+1} along axis 0 of (L, ...) tensors: h^R_t = a_t h^R_{t+1} + x_t inside windows of W
    positions (zero past each window's end), one step per position of a window, all windows at once."""
    L = x.shape[0]
    xw, aw = _blocks(x, W, 0.0), _blocks(a, W, 0.0)
    nw = xw.shape[0]
    r = xw[:, W - 1]
    outs = [torch.zeros_like(r)]  # a h^R past the window end
    for j in range(W - 2, -1, -1):
        g = aw[:, j] * r  # a_j h^R_{j+1}
        outs.append(g)
        r = g + xw[:, j]
    out = torch.stack(outs[::-1], 1).reshape((nw * W,) + x.shape[1:])
    return out[:L] if nw * W != L else out


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
    dt = delta.to(ct).permute(2, 0, 1)  # positions first: (L, batch, dim)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)
    if delta_softplus:
        dt = F.softplus(dt)
    u_ = u.to(ct).permute(2, 0, 1)
    a = torch.exp(dt.unsqueeze(-1) * A.to(ct))  # (L, batch, dim, N)
    x = (dt * u_).unsqueeze(-1) * _bc_positions_first(B.to(ct), dim)
    if FORM["form"] == "doubling":
        h, decay = prefix_scan(a.permute(1, 2, 3, 0), x.permute(1, 2, 3, 0))
        h, decay = h.permute(3, 0, 1, 2), decay.permute(3, 0, 1, 2)
    else:
        h, decay = blocked_scan(a, x, block_length(L))
    if prev_state is not None:
        h = h + decay * prev_state.to(ct)
    last = h[-1]
    if W > 1:
        h = h + window_backward(a, x, W)
    y = (h * _bc_positions_first(C.to(ct), dim)).sum(-1)  # (L, batch, dim)
    if D is not None:
        y = y + D.to(ct) * u_
    if z is not None:
        y = y * F.silu(z.to(ct).permute(2, 0, 1))
    out = y.permute(1, 2, 0).to(u.dtype)
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
