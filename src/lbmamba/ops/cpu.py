"""The "cpu" backend: fused numba kernels for the LB scan, forward and backward written by hand.

Why numba: it ships as a wheel on every platform PyTorch's CPU build runs on, needs no compiler at
install time, compiles to vectorised machine code for the host CPU (AVX2 / AVX-512 where present),
runs `prange` loops on a thread pool, and caches compiled kernels on disk.

The elementwise parts that need transcendental functions per position (softplus of delta, the silu
gate, the D skip) run in PyTorch's vectorised kernels around the numba kernels, which do the
(L x N)-sized work: a_t = exp(Δ_t A) with a vectorised exponential, the two scans and every sum over
states.

Layout of the numba work (per batch b and channel d, all N states at once in small buffers):
- forward: chunks of `chunk_length(W)` positions (whole windows) are processed in order. One pass
  left to right evaluates a_t = exp(Δ_t A), x_t = Δ_t B_t u_t and the global state h^L, accumulating
  C_t·h^L_t; a second, right to left inside each window (still in L1), adds C_t·(h^R_t - x_t). h^L is
  saved at the start of every chunk: these checkpoints are all the backward needs.
- backward: chunks are visited last to first; each is recomputed from its checkpoint into
  thread-local buffers (chunk x N), then dh^R runs left to right (reset at each window start) and dh^L
  right to left (carried across chunks), and every gradient is accumulated in the same sweep.
Nothing of size (batch, dim, L, N) is ever allocated. Reductions over batch (A, constant B / C) or
over the channels of a group (variable B / C) go to small per-task partial buffers summed
afterwards, so the parallel loops never race.

Arithmetic is float32 for float32 / float16 / bfloat16 inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload

# Reassociation lets LLVM vectorise the sums over states; no 'nnan'/'ninf', which would break the
# handling of overflow in the exponential below.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
_JIT = dict(fastmath=_FASTMATH, cache=True, nogil=True)

_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
_LOG2E = 1.4426950408889634


def is_available():
    return None


def supports(device, dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def chunk_length(window: int) -> int:
    """Positions per backward chunk: whole windows, about 128 positions, at least one window."""
    return window * max(1, 128 // window)


def num_checkpoints(seqlen: int, window: int) -> int:
    return -(-seqlen // chunk_length(window))


# ----------------------------------------------------------------------------------------------
# a = exp(Δ A) for a block of positions, vectorised.
# ----------------------------------------------------------------------------------------------


def decay_rows(dt, A_row, rows, out, scratch):
    """out[i, n] = exp(dt[i] * A_row[n]) for i < rows; `scratch` is a float array shaped like out."""


@overload(decay_rows, jit_options=_JIT)
def _decay_rows_impl(dt, A_row, rows, out, scratch):
    if out.dtype == types.float32:
        # Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, degree-6 Taylor for e^r (as accurate
        # as libm's expf on these arguments), 2^k assembled in the exponent bits. numba's np.exp is a
        # scalar libm call that LLVM cannot vectorise; this loop runs 8 lanes at a time.
        def impl(dt, A_row, rows, out, scratch):
            n_state = out.shape[1]
            # |dt A| <= 87.3 keeps 2^k a normal number; NaN / inf fail the test and go to libm
            dt_max = np.float32(0)
            dt_sum = np.float32(0)
            for i in range(rows):
                dt_max = max(dt_max, abs(dt[i]))
                dt_sum += dt[i]
            a_max = np.float32(0)
            a_sum = np.float32(0)
            for n in range(n_state):
                a_max = max(a_max, abs(A_row[n]))
                a_sum += A_row[n]
            if not (dt_max * a_max <= np.float32(87.3) and np.isfinite(dt_sum) and np.isfinite(a_sum)):
                for i in range(rows):
                    for n in range(n_state):
                        out[i, n] = np.exp(dt[i] * A_row[n])
                return None
            bits = scratch.view(np.int32)
            for i in range(rows):
                for n in range(n_state):
                    x = dt[i] * A_row[n]
                    k = np.floor(x * np.float32(_LOG2E) + np.float32(0.5))
                    r = x - k * np.float32(_LN2_HI) - k * np.float32(_LN2_LO)
                    p = np.float32(1.0 / 720.0)
                    p = p * r + np.float32(1.0 / 120.0)
                    p = p * r + np.float32(1.0 / 24.0)
                    p = p * r + np.float32(1.0 / 6.0)
                    p = p * r + np.float32(0.5)
                    p = p * r + np.float32(1.0)
                    p = p * r + np.float32(1.0)
                    bits[i, n] = (np.int32(k) + np.int32(127)) << np.int32(23)
                    out[i, n] = p * scratch[i, n]
            return None

        return impl

    def impl(dt, A_row, rows, out, scratch):
        for i in range(rows):
            for n in range(out.shape[1]):
                out[i, n] = np.exp(dt[i] * A_row[n])
        return None

    return impl


@njit(**_JIT)
def _local_backward(dt, u, Bk, bb, bg, b_var, start, rows, window, a_buf, x_buf, q_buf, r):
    """Inside each window, right to left: x_t = Δ_t u_t B_t and q_t = a_t h^R_{t+1} (0 at the end).

    q is what the local backward state adds to the forward one: h_t = h^L_t + q_t.
    """
    n_state = a_buf.shape[1]
    for ws in range(0, rows, window):
        r[:] = 0
        for i in range(min(ws + window, rows) - 1, ws - 1, -1):
            bt = start + i if b_var else 0
            dtu = dt[i] * u[i]
            for n in range(n_state):
                xn = dtu * Bk[bb, bg, bt, n]
                qn = a_buf[i, n] * r[n]
                x_buf[i, n] = xn
                q_buf[i, n] = qn
                r[n] = qn + xn


# ----------------------------------------------------------------------------------------------
# Forward: y_t = C_t . h_t (before the D skip and the gate).
# ----------------------------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def _forward_kernel(u, dt, A, Bk, Ck, window, chunk, n_blocks, zero, y, last, ckpt):
    batch, dim, seqlen = u.shape
    n_state = A.shape[1]
    rows_max = min(chunk, seqlen)
    block = -(-dim // n_blocks)
    b_var = Bk.shape[2] > 1
    c_var = Ck.shape[2] > 1
    for task in prange(batch * n_blocks):
        b = task // n_blocks
        blk = task % n_blocks
        a_buf = np.empty((rows_max, n_state), u.dtype)
        x_buf = np.empty((rows_max, n_state), u.dtype)
        q_buf = np.empty((rows_max, n_state), u.dtype)
        scratch = np.empty((rows_max, n_state), u.dtype)
        h = np.empty(n_state, u.dtype)
        r = np.empty(n_state, u.dtype)
        bb = b if Bk.shape[0] > 1 else 0
        cb = b if Ck.shape[0] > 1 else 0
        for d in range(blk * block, min(dim, (blk + 1) * block)):
            bg = d // (dim // Bk.shape[1])
            cg = d // (dim // Ck.shape[1])
            h[:] = zero
            for start in range(0, seqlen, chunk):
                ckpt[b, d, start // chunk, :] = h
                rows = min(chunk, seqlen - start)
                dt_rows = dt[b, d, start:start + rows]
                u_rows = u[b, d, start:start + rows]
                y_rows = y[b, d, start:start + rows]
                decay_rows(dt_rows, A[d], rows, a_buf, scratch)
                if window > 1:
                    _local_backward(dt_rows, u_rows, Bk, bb, bg, b_var, start, rows, window, a_buf, x_buf, q_buf, r)
                    for i in range(rows):
                        ct = start + i if c_var else 0
                        acc = zero
                        for n in range(n_state):
                            h[n] = a_buf[i, n] * h[n] + x_buf[i, n]
                            acc += Ck[cb, cg, ct, n] * (h[n] + q_buf[i, n])
                        y_rows[i] = acc
                else:  # vanilla scan: x is formed on the fly
                    for i in range(rows):
                        bt = start + i if b_var else 0
                        ct = start + i if c_var else 0
                        dtu = dt_rows[i] * u_rows[i]
                        acc = zero
                        for n in range(n_state):
                            h[n] = a_buf[i, n] * h[n] + dtu * Bk[bb, bg, bt, n]
                            acc += Ck[cb, cg, ct, n] * h[n]
                        y_rows[i] = acc
            last[b, d, :] = h


# ----------------------------------------------------------------------------------------------
# Backward: from dy = dL/dy_t to du (through x only), dΔ, dA, dB, dC; also y itself when asked.
# ----------------------------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def _backward_kernel(
    dy, dlast, has_dlast, u, dt, A, Bk, Ck, window, chunk, ckpt, n_blocks, zero, want_y,
    y, du, ddt, dA_part, dB_part, dC_part,
):
    batch, dim, seqlen = u.shape
    n_state = A.shape[1]
    rows_max = min(chunk, seqlen)
    n_chunks = ckpt.shape[2]
    block = -(-dim // n_blocks)
    b_var = Bk.shape[2] > 1
    c_var = Ck.shape[2] > 1
    # constant B / C: one partial slot per (batch, channel); grouped: per (channel block, batch, group)
    b_const = Bk.shape[0] == 1 and Bk.shape[2] == 1 and Bk.shape[1] == dim
    c_const = Ck.shape[0] == 1 and Ck.shape[2] == 1 and Ck.shape[1] == dim
    for task in prange(batch * n_blocks):
        b = task // n_blocks
        blk = task % n_blocks
        a_buf = np.empty((rows_max, n_state), u.dtype)
        x_buf = np.empty((rows_max, n_state), u.dtype)
        q_buf = np.empty((rows_max, n_state), u.dtype)
        hl_buf = np.empty((rows_max + 1, n_state), u.dtype)  # row i holds h^L_{i-1}
        gr_buf = np.empty((rows_max, n_state), u.dtype)
        scratch = np.empty((rows_max, n_state), u.dtype)
        r = np.empty(n_state, u.dtype)
        carry = np.empty(n_state, u.dtype)  # a_{t+1} dh^L_{t+1}: what reaches h^L_t from the right
        dA_acc = np.empty(n_state, u.dtype)
        dB_acc = np.empty(n_state, u.dtype)
        dC_acc = np.empty(n_state, u.dtype)
        bb = b if Bk.shape[0] > 1 else 0
        cb = b if Ck.shape[0] > 1 else 0
        bs0, bs1 = (0, b) if b_const else (blk, bb)
        cs0, cs1 = (0, b) if c_const else (blk, cb)
        for d in range(blk * block, min(dim, (blk + 1) * block)):
            bg = d // (dim // Bk.shape[1])
            cg = d // (dim // Ck.shape[1])
            if has_dlast:
                carry[:] = dlast[b, d, :]
            else:
                carry[:] = zero
            dA_acc[:] = zero
            dB_acc[:] = zero
            dC_acc[:] = zero
            for c in range(n_chunks - 1, -1, -1):
                start = c * chunk
                rows = min(chunk, seqlen - start)
                dt_rows = dt[b, d, start:start + rows]
                u_rows = u[b, d, start:start + rows]
                dy_rows = dy[b, d, start:start + rows]
                decay_rows(dt_rows, A[d], rows, a_buf, scratch)
                # Recompute the chunk from its checkpoint (windows never straddle chunks).
                if window > 1:
                    _local_backward(dt_rows, u_rows, Bk, bb, bg, b_var, start, rows, window, a_buf, x_buf, q_buf, r)
                else:
                    for i in range(rows):
                        bt = start + i if b_var else 0
                        dtu = dt_rows[i] * u_rows[i]
                        for n in range(n_state):
                            x_buf[i, n] = dtu * Bk[bb, bg, bt, n]
                            q_buf[i, n] = zero
                hl_buf[0, :] = ckpt[b, d, c, :]
                for i in range(rows):
                    for n in range(n_state):
                        hl_buf[i + 1, n] = a_buf[i, n] * hl_buf[i, n] + x_buf[i, n]
                # dh^R, left to right, reset at each window start: gr_t = dy_t C_t + a_{t-1} gr_{t-1}.
                # (window 1: gr_t = dy_t C_t, which cancels in dx below; q = 0 removes it from da.)
                for i in range(rows):
                    ct = start + i if c_var else 0
                    dyi = dy_rows[i]
                    if i % window == 0:
                        for n in range(n_state):
                            gr_buf[i, n] = dyi * Ck[cb, cg, ct, n]
                    else:
                        for n in range(n_state):
                            gr_buf[i, n] = dyi * Ck[cb, cg, ct, n] + a_buf[i - 1, n] * gr_buf[i - 1, n]
                # dh^L right to left, and every gradient of position t:
                # dx = dh^L + dh^R - dy C;  a da = a dh^L h^L_{t-1} + dh^R q_t.
                for i in range(rows - 1, -1, -1):
                    t = start + i
                    ct = t if c_var else 0
                    bt = t if b_var else 0
                    dyi = dy_rows[i]
                    dti = dt_rows[i]
                    ut = u_rows[i]
                    dtu = dti * ut
                    ddt_t = zero
                    dx_b = zero
                    y_t = zero
                    for n in range(n_state):
                        cn = Ck[cb, cg, ct, n]
                        bn = Bk[bb, bg, bt, n]
                        an = a_buf[i, n]
                        dh = dyi * cn
                        gl = dh + carry[n]
                        agl = an * gl
                        carry[n] = agl
                        gr = gr_buf[i, n]
                        qn = q_buf[i, n]
                        dx = gl + gr - dh
                        dan = agl * hl_buf[i, n] + gr * qn
                        state = hl_buf[i + 1, n] + qn
                        ddt_t += dx * bn * ut + dan * A[d, n]
                        dx_b += dx * bn
                        y_t += cn * state
                        dA_acc[n] += dan * dti
                        if b_var:
                            dB_part[bs0, bs1, bg, bt, n] += dx * dtu
                        else:
                            dB_acc[n] += dx * dtu
                        if c_var:
                            dC_part[cs0, cs1, cg, ct, n] += dyi * state
                        else:
                            dC_acc[n] += dyi * state
                    du[b, d, t] = dx_b * dti
                    ddt[b, d, t] = ddt_t
                    if want_y:
                        y[b, d, t] = y_t
            dA_part[b, d, :] = dA_acc
            if not b_var:
                for n in range(n_state):
                    dB_part[bs0, bs1, bg, 0, n] += dB_acc[n]
            if not c_var:
                for n in range(n_state):
                    dC_part[cs0, cs1, cg, 0, n] += dC_acc[n]


# ----------------------------------------------------------------------------------------------
# Torch-facing wrappers (the fused-backend interface of lbmamba.ops._fused).
# ----------------------------------------------------------------------------------------------


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _zero(dtype: torch.dtype):
    """A typed zero: keeps numba's accumulators in the compute dtype instead of float64."""
    return np.float64(0) if dtype == torch.float64 else np.float32(0)


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _bc_kernel_layout(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Constant (dim, N) -> (1, dim, 1, N); grouped (batch, G, N, L) -> (batch, G, L, N), contiguous."""
    if t.dim() == 2:
        return _np(t[None, :, None, :], dtype)
    return _np(t.transpose(2, 3), dtype)


def _set_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _pre_softplus(delta, delta_bias, dtype):
    pre = delta.detach().to(dtype)
    return pre + delta_bias.detach().to(dtype)[:, None] if delta_bias is not None else pre


def _step(delta, delta_bias, delta_softplus, dtype):
    """Δ = softplus(delta + delta_bias) (or without softplus), contiguous in the compute dtype."""
    pre = _pre_softplus(delta, delta_bias, dtype)
    return (F.softplus(pre) if delta_softplus else pre).contiguous()


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window):
    ct = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    chunk = chunk_length(window)
    y = torch.empty((batch, dim, seqlen), dtype=ct)
    last = torch.empty((batch, dim, dstate), dtype=ct)
    ckpt = torch.empty((batch, dim, num_checkpoints(seqlen, window), dstate), dtype=ct)
    u_c = u.detach().to(ct).contiguous()
    _set_threads()
    _forward_kernel(
        u_c.numpy(), _step(delta, delta_bias, delta_softplus, ct).numpy(), _np(A, ct),
        _bc_kernel_layout(B, ct), _bc_kernel_layout(C, ct), int(window), chunk, _num_blocks(batch, dim), _zero(ct),
        y.numpy(), last.numpy(), ckpt.numpy(),
    )
    if D is not None:
        y.addcmul_(D.detach().to(ct)[:, None], u_c)
    if z is not None:
        y.mul_(F.silu(z.detach().to(ct)))
    return y.to(u.dtype), last, ckpt


def _num_blocks(batch: int, dim: int) -> int:
    """Channel blocks per batch element: enough tasks to keep every thread busy."""
    target = 4 * numba.get_num_threads()
    return max(1, min(dim, -(-target // batch)))


def backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, checkpoints):
    ct = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    _set_threads()
    n_blocks = _num_blocks(batch, dim)
    u_c = u.detach().to(ct).contiguous()
    g = dout.detach().to(ct)
    dy = g * F.silu(z.detach().to(ct)) if z is not None else g
    Bk, Ck = _bc_kernel_layout(B, ct), _bc_kernel_layout(C, ct)

    def partial(kernel_bc):
        if kernel_bc.shape[0] == 1 and kernel_bc.shape[1] == dim and kernel_bc.shape[2] == 1:
            return torch.zeros((1, batch, dim, 1, dstate), dtype=ct)
        return torch.zeros((n_blocks,) + kernel_bc.shape, dtype=ct)

    y = torch.empty((batch, dim, seqlen), dtype=ct) if z is not None else torch.empty((1, 1, 1), dtype=ct)
    du = torch.empty((batch, dim, seqlen), dtype=ct)
    ddt = torch.empty_like(du)
    dA_part = torch.empty((batch, dim, dstate), dtype=ct)
    dB_part, dC_part = partial(Bk), partial(Ck)
    has_dlast = dlast_state is not None
    dlast = _np(dlast_state, ct) if has_dlast else np.zeros((1, 1, 1), dtype=Bk.dtype)
    _backward_kernel(
        dy.contiguous().numpy(), dlast, has_dlast, u_c.numpy(), _step(delta, delta_bias, delta_softplus, ct).numpy(),
        _np(A, ct), Bk, Ck, int(window), chunk_length(window), _np(checkpoints, ct), n_blocks, _zero(ct),
        z is not None, y.numpy(), du.numpy(), ddt.numpy(), dA_part.numpy(), dB_part.numpy(), dC_part.numpy(),
    )
    dz = u.new_empty((0,))
    dD = (dy * u_c).sum((0, 2))
    if D is not None:
        D_c = D.detach().to(ct)[:, None]
        du.addcmul_(dy, D_c)
        if z is not None:
            y.addcmul_(D_c, u_c)
    if z is not None:
        zc = z.detach().to(ct)
        sz = torch.sigmoid(zc)
        dz = (g * y * sz * (1 + zc * (1 - sz))).to(z.dtype)
    if delta_softplus:  # softplus' = sigmoid, and the identity above torch's threshold of 20
        pre = _pre_softplus(delta, delta_bias, ct)
        ddt = ddt * torch.where(pre <= 20.0, torch.sigmoid(pre), torch.ones_like(pre))
    dbias = ddt.sum((0, 2))
    return (
        du.to(u.dtype),
        ddt.to(delta.dtype),
        dA_part.sum(0).to(A.dtype),
        _bc_grad(dB_part, B),
        _bc_grad(dC_part, C),
        dD.to(D.dtype) if D is not None else dD.float(),
        dz,
        dbias.to(delta_bias.dtype) if delta_bias is not None else dbias.float(),
    )


def _bc_grad(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum the partial buffers of B or C back into the caller's layout and dtype."""
    if like.dim() == 2:  # constant: (1, batch, dim, 1, N)
        return part.sum((0, 1))[:, 0].to(like.dtype)
    return part.sum(0).transpose(2, 3).to(like.dtype)  # (batch, G, L, N) -> (batch, G, N, L)
