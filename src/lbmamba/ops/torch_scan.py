"""The "torch" backend: the LB scan in plain PyTorch ops, for any device torch supports (MPS, ...).

A `torch.autograd.Function` with a hand-written backward: no autograd graph over the scan's inside.

Forward. The sequence is cut into chunks of T positions, whole windows of W (W clipped to L; see
`chunk_length`), run one after the other. Inside a chunk everything elementwise is one op over the chunk,
in a positions-first layout (T, batch, dim, N) where the slice of one position is contiguous:
Δ = softplus(delta + bias), a = exp(ΔA), x = Δ u B. The recurrences then take one in-place op per step:
h^L_t = a_t h^L_{t-1} + x_t one position at a time (carried from chunk to chunk), and the window-local
h^R_t = a_t h^R_{t+1} + x_t for all the chunk's windows at once (W steps over (T/W, batch, dim, N) views).
The readout uses h_t = h^L_t + a_t h^R_{t+1} (= h^L + h^R - x, without the cancellation), y_t = C_t·h_t as
a batched matmul over N, then the D skip and the silu(z) gate. Kept for the backward: the inputs and h^L
before every chunk, (batch, dim, N) each.

Backward, chunks last to first: recompute a, x, h^L (from the chunk's checkpoint) and h^R; then, with
dh_t = dy_t C_t, the window-local G^R_t = dh_t + a_{t-1} G^R_{t-1} (left to right, restarted at each window
start, all windows at once) and the global G^L_t = dh_t + a_{t+1} G^L_{t+1} (right to left, carried across
chunks, started from the last-state gradient). In the terms of docs/lb-scan.md (dh^L = G^L, dh^R = G^R):
  dx_t = G^L_t + G^R_t - dh_t = G^L_t + a_{t-1} G^R_{t-1}   (no second term at a window start)
  da_t a_t = a_t G^L_t h^L_{t-1} + (a_t G^R_t) h^R_{t+1}      (no second term at a window end)
and from these every input's gradient by the chain rule through exp, Δ u B, softplus, D and silu(z).

Memory: five (T, batch, dim, N) buffers at most (three in the forward), reused by every chunk, and one
(batch, dim, N) state per chunk; never anything of size (batch, dim, L, N). Window 1 is vanilla Mamba and
does no h^R / G^R work at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_scan_args

#: softplus threshold of torch.nn.functional.softplus (identity above it), which the definition follows
_SOFTPLUS_THRESHOLD = 20.0
_LOG2E = 1.4426950408889634


def chunk_length(window: int, seqlen: int) -> int:
    """Positions per chunk: whole windows (of the window clipped to L), at least one, never more than L.

    Memory: five (T, batch, dim, N) buffers in the backward plus one (batch, dim, N) state per chunk kept
    from the forward, about 5 T N / L + N / T times the bytes of u: smallest near T = sqrt(L / 5).
    Time, measured (1 thread, 2-core AMD EPYC VM, variable B/C, D, z, bias, softplus; fwd / fwd+bwd ms):
    (8, 384, 196, 16), W = 8:   T = 8: 25 / 83,  16: 27 / 96,  24: 27 / 103;
    (1, 768, 4096, 16), W = 16: T = 16: 150 / 514,  32: 133 / 482,  64: 142 / 551,  128: 192 / 712.
    Short chunks pay the per-chunk ops (about 60 small ones), long ones spill the buffers out of cache. The
    memory optimum, sqrt(L / 5) in whole windows, is also the fastest at both shapes (8 and 32), and past
    32 positions a chunk only gets slower: so that, capped at 32.
    """
    window = min(window, seqlen)
    target = min(32.0, math.sqrt(seqlen / 5))
    windows = max(1, round(target / window))
    return min(windows * window, max(window, (seqlen // window) * window))


class _BC:
    """B or C in a form the chunk loop uses: constant (dim, N), or per position (L, batch, G, N) contiguous."""

    def __init__(self, t: torch.Tensor, dim: int, ct: torch.dtype):
        self.constant = t.dim() == 2
        if self.constant:
            self.groups = 1
            self.values = t.to(ct)
        else:
            grouped = t.unsqueeze(1) if t.dim() == 3 else t  # (batch, G, N, L)
            self.groups = grouped.shape[1]
            self.values = torch.empty(grouped.permute(3, 0, 1, 2).shape, dtype=ct, device=t.device)
            self.values.copy_(grouped.permute(3, 0, 1, 2))
        self.dim = dim
        self.per_group = dim // self.groups

    def _flat(self, h: torch.Tensor):
        """(T, batch, dim, N) -> (T * batch * G, dim / G, N)."""
        return h.view(-1, self.per_group, h.shape[-1])

    def scale(self, v: torch.Tensor, s: int, out: torch.Tensor) -> None:
        """out (T, batch, dim, N) = v (T, batch, dim)[..., None] * B_t."""
        if self.constant:
            torch.mul(v.unsqueeze(-1), self.values, out=out)
            return
        T, batch = v.shape[:2]
        bt = self.values[s:s + T].unsqueeze(3)  # (T, batch, G, 1, N)
        torch.mul(v.view(T, batch, self.groups, self.per_group, 1), bt,
                  out=out.view(T, batch, self.groups, self.per_group, -1))

    def contract(self, h: torch.Tensor, s: int) -> torch.Tensor:
        """sum_n h (T, batch, dim, N) * B_t -> (T, batch, dim)."""
        T, batch = h.shape[:2]
        if self.constant:
            return (h * self.values).sum(-1)
        # a row times a matrix, (1, N) @ (N, dim / G): on CPU several times faster than (dim / G, N) @ (N, 1)
        bt = self.values[s:s + T].view(-1, 1, h.shape[-1])
        return torch.bmm(bt, self._flat(h).transpose(1, 2)).view(T, batch, self.dim)

    def grad(self, v: torch.Tensor, h: torch.Tensor, acc: torch.Tensor, s: int) -> None:
        """Gradient of B_t for x = v B_t with dL/dx = h: sum of v * h over the channels sharing B_t
        (and over batch and positions when constant), into `acc` ((dim, N) or (L, batch, G, N))."""
        if self.constant:
            acc.add_((h * v.unsqueeze(-1)).sum((0, 1)))
            return
        T = h.shape[0]
        torch.bmm(v.reshape(-1, 1, self.per_group), self._flat(h), out=acc[s:s + T].view(-1, 1, h.shape[-1]))

    def new_grad(self) -> torch.Tensor:
        return torch.zeros_like(self.values)

    def finish_grad(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The accumulated gradient back in the input's shape and dtype."""
        if self.constant:
            return g.to(like.dtype)
        g = g.permute(1, 2, 3, 0)  # (batch, G, N, L)
        if like.dim() == 3:
            g = g.squeeze(1)
        return g.to(like.dtype, memory_format=torch.contiguous_format)


def _positions_first(t: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """(batch, dim, L) -> the view (e - s, batch, dim) of positions s..e-1."""
    return t[:, :, s:e].permute(2, 0, 1)


def _load(t: torch.Tensor, s: int, e: int, ct: torch.dtype) -> torch.Tensor:
    """Positions s..e-1 of a (batch, dim, L) tensor as a new contiguous (e - s, batch, dim) tensor in ct
    (elementwise ops would otherwise give their results the strides of the permuted view)."""
    out = torch.empty((e - s,) + tuple(t.shape[:2]), dtype=ct, device=t.device)
    block = t[:, :, s:e]
    if t.stride(2) == 1 and t.shape[2] > 256:  # rows far apart: gather them first, then transpose (2-4x faster)
        block = block.contiguous()
    return out.copy_(block.permute(2, 0, 1))


def _sum_last(t: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """t (..., N) summed over N, as a matrix-vector product (twice as fast as .sum(-1) on CPU for N = 16)."""
    return torch.mm(t.reshape(-1, t.shape[-1]), ones).view(t.shape[:-1])


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """F.softplus(x) (identity above 20) as max(x, 0) + log1p(exp(-|x|)), from ops that are fast everywhere:
    torch's softplus and log1p take about 10 ns a value on CPU, this about a third of that. log1p(y) is
    log(u) - ((u - 1) - y) / u with u = 1 + y rounded (exact to rounding, also where u rounds to 1)."""
    y = torch.exp2(x.abs().mul_(-_LOG2E))
    y.masked_fill_(x > _SOFTPLUS_THRESHOLD, 0.0)
    u = y + 1
    correction = (u - 1).sub_(y).div_(u)
    return torch.log(u).sub_(correction).add_(x.clamp_min(0))


def _steps(delta, u, bias, softplus, s, e, ct):
    """Δ (before and after softplus), Δ u and u of positions s..e-1, (T, batch, dim) in ct."""
    raw = _load(delta, s, e, ct)
    if bias is not None:
        raw.add_(bias)
    dt = _softplus(raw) if softplus else raw
    u_c = _load(u, s, e, ct)
    return raw, dt, dt * u_c, u_c


class _Chunk:
    """The (T, batch, dim, N) chunk buffers, positions first, and their per-position / per-window views,
    made once and reused by every chunk."""

    def __init__(self, names, T, W, batch, dim, N, ct, device):
        self.T, self.W = T, W
        self._windows = {}
        for name in names:
            rows = T + 1 if name == "hl" else T  # h^L keeps the state before the chunk in slot 0
            buf = torch.empty((rows, batch, dim, N), dtype=ct, device=device)
            setattr(self, name, buf)
            setattr(self, name + "_at", buf.unbind(0))

    def windows(self, name: str, Tw: int, offset: int = 0):
        """Slots offset..offset+Tw-1 of buffer `name` as (Tw / W, W, batch, dim, N), and the W views [:, j],
        the j-th position of every window at once (made once, cached). h^L of the chunk is "hl" at offset 1."""
        key = (name, Tw, offset)
        if key not in self._windows:
            buf = getattr(self, name)
            view = buf[offset:offset + Tw].view(Tw // self.W, self.W, *buf.shape[1:])
            self._windows[key] = view, view.unbind(1)
        return self._windows[key]


def _recompute(bufs: _Chunk, checkpoint, dt, dtu, A2, b_op, s, Tc):
    """a, x and h^L of one chunk (h^L from the state before it, over x in place); for W > 1 also h^R.
    Returns Tw, the chunk's positions rounded up to whole windows (the padding has a = x = 0)."""
    W = bufs.W
    a = bufs.a[:Tc]
    torch.mul(dt.unsqueeze(-1), A2, out=a)
    a.exp2_()  # exp(Δ A) as 2^(Δ A log2 e): several times faster than exp on CPU
    bufs.hl[0].copy_(checkpoint)
    b_op.scale(dtu, s, bufs.hl[1:Tc + 1])  # x
    Tw = Tc
    if W > 1:
        Tw = -(-Tc // W) * W
        if Tw > Tc:  # the last window runs past L: x = 0 there adds nothing to h^R
            bufs.hl[Tc + 1:Tw + 1].zero_()
            bufs.a[Tc:Tw].zero_()
        xw, aw, hrw = bufs.windows("hl", Tw, 1)[1], bufs.windows("a", Tw)[1], bufs.windows("hr", Tw)[1]
        hrw[W - 1].copy_(xw[W - 1])
        for j in range(W - 2, -1, -1):  # h^R, right to left inside all the chunk's windows at once
            torch.addcmul(xw[j], aw[j], hrw[j + 1], out=hrw[j])
    hl, av = bufs.hl_at, bufs.a_at
    for i in range(Tc):  # h^L, one position at a time, in place over x
        hl[i + 1].addcmul_(av[i], hl[i])
    return Tw


def lb_forward(u, delta, A, B, C, D, z, delta_bias, softplus, window, chunk, prev_state=None, keep=True):
    """The forward without autograd: out, last_state and (keep) h^L before every chunk,
    (n_chunks, batch, dim, N), which `lb_backward` takes (without keep: one state, for no backward)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    dev = u.device
    W, T = window, chunk
    A_ = A.to(ct)
    A2 = A_ * _LOG2E
    bias = delta_bias.to(ct) if delta_bias is not None else None
    D_ = D.to(ct) if D is not None else None
    b_op, c_op = _BC(B, dim, ct), _BC(C, dim, ct)
    n_chunks = -(-L // T)

    # h^L before each chunk, for the backward; without one, only the state carried to the next chunk
    checkpoints = torch.empty((n_chunks if keep else 1, batch, dim, N), dtype=ct, device=dev)
    if prev_state is None:
        checkpoints[0].zero_()
    else:  # h^L before the first position
        checkpoints[0].copy_(prev_state)
    bufs = _Chunk(("a", "hl", "hr") if W > 1 else ("a", "hl"), T, W, batch, dim, N, ct, dev)
    out = torch.empty((batch, dim, L), dtype=u.dtype, device=dev)
    last_state = torch.empty((batch, dim, N), dtype=ct, device=dev)

    for c in range(n_chunks):
        s = c * T
        e = min(s + T, L)
        Tc = e - s
        _, dt, dtu, u_c = _steps(delta, u, bias, softplus, s, e, ct)
        Tw = _recompute(bufs, checkpoints[c if keep else 0], dt, dtu, A2, b_op, s, Tc)
        if c + 1 < n_chunks:
            checkpoints[c + 1 if keep else 0].copy_(bufs.hl[Tc])
        else:
            last_state.copy_(bufs.hl[Tc])
        if W > 1:  # h = h^L + h^R - x = h^L + a h^R_{t+1}, in place over h^L
            hw, aw, hrw = bufs.windows("hl", Tw, 1)[0], bufs.windows("a", Tw)[0], bufs.windows("hr", Tw)[0]
            hw[:, :W - 1].addcmul_(aw[:, :W - 1], hrw[:, 1:])
        y = c_op.contract(bufs.hl[1:Tc + 1], s)
        if D_ is not None:
            y.addcmul_(u_c, D_)
        if z is not None:
            y.mul_(F.silu(_load(z, s, e, ct)))
        _positions_first(out, s, e).copy_(y)
    return out, last_state, checkpoints


def lb_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, window, chunk, checkpoints,
                prev_state=None, need=(True,) * 12):
    """The gradients of `lb_forward`'s inputs (in its argument order, None where not needed or not given)
    from those of out (`dout`) and last_state (`dlast`), either None for zeros. `need`: needs_input_grad."""
    W, T = window, chunk
    batch, dim, L = u.shape
    N = A.shape[1]
    ct = torch.float64 if u.dtype == torch.float64 else torch.float32
    dev = u.device
    A_ = A.to(ct)
    A2 = A_ * _LOG2E
    bias = delta_bias.to(ct) if delta_bias is not None else None
    D_ = D.to(ct) if D is not None else None
    b_op, c_op = _BC(B, dim, ct), _BC(C, dim, ct)
    n_chunks = checkpoints.shape[0]
    if dout is None:  # only the last state is used
        dout = torch.zeros((), dtype=u.dtype, device=dev).expand(batch, dim, L)

    du = torch.empty((batch, dim, L), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, L), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, L), dtype=z.dtype, device=dev) if z is not None and need[6] else None
    dA = torch.zeros((dim, N), dtype=ct, device=dev)
    dB, dC = b_op.new_grad(), c_op.new_grad()
    dD = torch.zeros(dim, dtype=ct, device=dev) if D is not None else None
    dbias = torch.zeros(dim, dtype=ct, device=dev) if delta_bias is not None else None

    # a: a, then scratch; hl: h^L (slot 0: before the chunk), then da a; dh: dy C, then G^L, then dx;
    # hr: h^R; gr: h, then G^R, then a G^R
    bufs = _Chunk(("a", "hl", "dh", "hr", "gr") if W > 1 else ("a", "hl", "dh"), T, W, batch, dim, N, ct, dev)
    ones = torch.ones((N, 1), dtype=ct, device=dev)
    carry = torch.zeros((batch, dim, N), dtype=ct, device=dev)  # a_{t+1} G^L_{t+1} at the chunk's end
    if dlast is not None:
        carry.copy_(dlast)

    for c in range(n_chunks - 1, -1, -1):
        s = c * T
        e = min(s + T, L)
        Tc = e - s
        raw, dt, dtu, u_c = _steps(delta, u, bias, softplus, s, e, ct)
        Tw = _recompute(bufs, checkpoints[c], dt, dtu, A2, b_op, s, Tc)
        av = bufs.a_at
        h = bufs.hl[1:Tc + 1]
        if W > 1:
            (aw, aj), hrw = bufs.windows("a", Tw), bufs.windows("hr", Tw)[0]
            (dhw, dhj), (grw, grj) = bufs.windows("dh", Tw), bufs.windows("gr", Tw)

        # the readout: dy, dz, dD, dC
        g = _load(dout, s, e, ct)
        if z is not None:
            z_c = _load(z, s, e, ct)
            dy = g * F.silu(z_c)
        else:
            dy = g
        if W > 1 and (dz is not None or need[4]):  # h = h^L + a h^R_{t+1}, in the G^R buffer (free till G^R)
            hlw = bufs.windows("hl", Tw, 1)[0]
            torch.addcmul(hlw[:, :W - 1], aw[:, :W - 1], hrw[:, 1:], out=grw[:, :W - 1])
            grw[:, W - 1].copy_(hlw[:, W - 1])
            h = bufs.gr[:Tc]
        if dz is not None:
            y = c_op.contract(h, s)
            if D_ is not None:
                y.addcmul_(u_c, D_)
            _positions_first(dz, s, e).copy_(torch.ops.aten.silu_backward(g.mul_(y), z_c))
        if dD is not None and need[5]:
            dD.add_((dy * u_c).sum((0, 1)))
        if need[4]:
            c_op.grad(dy, h, dC, s)

        # the reverse recurrences: G^R (inside each window, left to right) and G^L (right to left)
        dh = bufs.dh[:Tc]
        c_op.scale(dy, s, dh)
        if W > 1:
            grj[0].copy_(dhj[0])
            for j in range(1, W):
                torch.addcmul(dhj[j], aj[j - 1], grj[j - 1], out=grj[j])
        gl = bufs.dh_at
        gl[Tc - 1].add_(carry)
        for i in range(Tc - 2, -1, -1):
            gl[i].addcmul_(av[i + 1], gl[i + 1])
        torch.mul(av[0], gl[0], out=carry)

        # da a = a_t (G^L_t h^L_{t-1} + G^R_t h^R_{t+1}), over h^L_{t-1}; dx = G^L_t + a_{t-1} G^R_{t-1}
        ea = bufs.hl[:Tc]
        ea.mul_(bufs.a[:Tc]).mul_(dh)
        if W > 1:
            grw.mul_(aw)  # a G^R
            bufs.windows("hl", Tw)[0][:, :W - 1].addcmul_(grw[:, :W - 1], hrw[:, 1:])
            dhw[:, 1:].add_(grw[:, :W - 1])
        dx = dh

        # through a = exp(ΔA), x = Δ u B and the softplus
        tmp = bufs.a[:Tc]
        ddt = _sum_last(torch.mul(ea, A_, out=tmp), ones)
        if need[2]:
            dA.add_(torch.mul(ea, dt.unsqueeze(-1), out=tmp).sum((0, 1)))
        dxb = b_op.contract(dx, s)
        if need[3]:
            b_op.grad(dtu, dx, dB, s)
        ddt.addcmul_(dxb, u_c)
        du_c = dxb.mul_(dt)
        if D_ is not None:
            du_c.addcmul_(dy, D_)
        _positions_first(du, s, e).copy_(du_c)
        if softplus:
            ddt = torch.ops.aten.softplus_backward(ddt, raw, 1.0, _SOFTPLUS_THRESHOLD)
        if dbias is not None:
            dbias.add_(ddt.sum((0, 1)))
        _positions_first(ddelta, s, e).copy_(ddt)

    return (
        du,
        ddelta,
        dA.to(A.dtype) if need[2] else None,
        b_op.finish_grad(dB, B) if need[3] else None,
        c_op.finish_grad(dC, C) if need[4] else None,
        dD.to(D.dtype) if dD is not None and need[5] else None,
        dz,
        dbias.to(delta_bias.dtype) if dbias is not None and need[7] else None,
        None,
        None,
        None,
        carry.to(prev_state.dtype) if prev_state is not None and need[11] else None,  # a_0 G^L_0
    )


class _LBScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, window, chunk, prev_state=None):
        out, last_state, checkpoints = lb_forward(u, delta, A, B, C, D, z, delta_bias, softplus, window, chunk,
                                                  prev_state, keep=any(ctx.needs_input_grad))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state)
        ctx.softplus, ctx.window, ctx.chunk = softplus, window, chunk
        ctx.set_materialize_grads(False)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state = ctx.saved_tensors
        return lb_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ctx.window, ctx.chunk,
                           checkpoints, prev_state, ctx.needs_input_grad)


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    prev_state=None, *, window="auto"
):
    """The LB scan in plain PyTorch ops (any device), same arguments and results as `selective_scan_fn`
    (windows aligned at this call's position 0: `selective_scan_fn` handles position_offset)."""
    shape = check_scan_args(u, delta, A, B, C, D, z, delta_bias, window, prev_state)
    window = min(shape.window, shape.seqlen)  # a window past L is one window [0, L)
    chunk = chunk_length(window, shape.seqlen)
    out, last_state = _LBScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), window, chunk,
                                    prev_state)
    return (out, last_state) if return_last_state else out
