"""The "cpu" backend: fused numba kernels for the LB scan, forward and backward written by hand.

Why numba: it ships as a wheel on every platform PyTorch's CPU build runs on, needs no compiler at
install time, compiles to vectorised machine code for the host CPU (AVX2 / AVX-512 where present),
releases the GIL inside kernels (so a few Python threads run tasks in parallel), and caches compiled
kernels on disk.

The elementwise parts that need transcendental functions per position (softplus of delta, the silu
gate, the D skip) run in PyTorch's vectorised kernels around the numba kernels, which do the
(L x N)-sized work: a_t = exp(Δ_t A) with a vectorised exponential, the two scans and every sum over
states.

Layout of the numba work: each task is one batch element and one block of `width` channels (a block
never straddles a group of B or C). Per chunk of positions, the task copies its (positions x
channels) tiles into contiguous thread-local buffers, channels last, so that the innermost loops run
over channels: LLVM turns them into SIMD code with no sums across SIMD lanes and no short loops over
the N states. Tensors stay in the caller's (batch, dim, L) layout.
- forward: chunks of `chunk_length(W)` positions (whole windows) are processed in order. A pass
  right to left inside each window forms x_t = Δ_t B_t u_t and q_t = a_t h^R_{t+1} (what the local
  backward state adds: h_t = h^L_t + q_t); a pass left to right runs h^L and accumulates
  y_t = C_t·(h^L_t + q_t). Window 1 skips the first pass. h^L is saved at the start of every
  chunk: these checkpoints are all the backward needs.
- backward: chunks are visited last to first; each is recomputed from its checkpoint into
  thread-local buffers (chunk x N x lanes), then dh^R runs left to right (reset at each window
  start) and dh^L right to left (carried across chunks), and every gradient is accumulated in the
  same sweep.
Nothing of size (batch, dim, L, N) is ever allocated. Reductions over batch (A, constant B / C) or
over the channels of a group (variable B / C) go to small per-task partial buffers summed
afterwards, so the parallel loops never race.

Arithmetic is float32 for float32 / float16 / bfloat16 inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, types
from numba.extending import overload

# Reassociation lets LLVM vectorise the sums across lanes; no 'nnan'/'ninf', which would break the
# handling of overflow in the exponential below.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
# error_model="numpy": x / 0 gives inf as in NumPy, instead of a Python-style check per division,
# which would stop LLVM from vectorising the loops that divide.
_JIT = dict(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
# The exponential's range reduction must not be reassociated (k ln2_hi + k ln2_lo would fold).
_JIT_EXACT = dict(fastmath={"contract", "nsz"}, cache=True, nogil=True, error_model="numpy")

_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
_LOG2E = 1.4426950408889634


def is_available():
    return None


def supports(device, dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


#: Most channels per task: the length of the innermost (SIMD) loops, long enough to amortise each
#: loop's set-up; narrower blocks only when there would be too few tasks for the threads.
MAX_WIDTH = 128


def block_width(batch: int, dim: int, threads: int) -> int:
    width = MAX_WIDTH
    while width > 16 and batch * -(-dim // width) < 2 * threads:
        width //= 2
    return width


def chunk_length(window: int) -> int:
    """Positions per chunk: whole windows, about 32 positions (buffers stay in L2), at least one window."""
    return window * max(1, 32 // window)


@njit(cache=True)
def tile_length(window):
    """Positions the forward sweeps per state at a time: whole windows, at least 8 positions."""
    return window * max(1, 8 // window)


def num_checkpoints(seqlen: int, window: int) -> int:
    return -(-seqlen // chunk_length(window))


def checkpoint_shape(batch: int, dim: int, seqlen: int, dstate: int, window: int) -> tuple:
    """h^L at the start of every chunk, channels last as the kernels use them."""
    return (batch, num_checkpoints(seqlen, window), dstate, dim)


# ----------------------------------------------------------------------------------------------
# Vectorised exponentials: a = exp(Δ A), softplus, the silu gate.
# ----------------------------------------------------------------------------------------------

# numba's np.exp is a scalar libm call that LLVM cannot vectorise. `_exp_parts` is written so that a
# loop over lanes calling it runs 8 or 16 lanes at a time: e^x = p * 2^k by Cody-Waite reduction
# x = k ln2 + r, |r| <= ln2 / 2, and a degree-6 Taylor polynomial for e^r (as accurate as libm's expf
# on these arguments). 2^k comes back as the bits of a float32, which the caller stores through an
# int32 view of a float32 buffer and reads back as a float (LLVM turns that into a register move).
# Valid for |x| <= 87.3 (2^k stays a normal number); the caller must not be compiled with 'reassoc',
# which would fold k ln2_hi + k ln2_lo.


@njit(inline="always")
def _exp_parts(x):
    k = np.floor(x * np.float32(_LOG2E) + np.float32(0.5))
    r = x - k * np.float32(_LN2_HI) - k * np.float32(_LN2_LO)
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p, (np.int32(k) + np.int32(127)) << np.int32(23)


@njit(**_JIT)
def fast_exp_ok(dt, rows, lanes, A) -> bool:
    """Whether the vectorised exponential is exact for exp(dt[i, c] * A[n, c]) on these rows.

    |Δ A| <= 87.3 keeps 2^k a normal number; NaN / inf fail the test and go to libm.
    """
    dt_max = np.float32(0)
    dt_sum = np.float32(0)
    for i in range(rows):
        for c in range(lanes):
            dt_max = max(dt_max, abs(dt[i, c]))
            dt_sum += dt[i, c]
    a_max = np.float32(0)
    a_sum = np.float32(0)
    for n in range(A.shape[0]):
        for c in range(lanes):
            a_max = max(a_max, abs(A[n, c]))
            a_sum += A[n, c]
    return dt_max * a_max <= 87.3 and np.isfinite(dt_sum) and np.isfinite(a_sum)


def decay_rows(dt, row0, A, n0, n1, rows, lanes, out, scratch, fast):
    """out[i, n - n0, c] = exp(dt[row0 + i, c] * A[n, c]) for i < rows, n0 <= n < n1, c < lanes.

    `scratch` is shaped like out; `fast` (from `fast_exp_ok`) allows the vectorised exponential.
    """


def decay_rows_inline(dt, row0, A, n0, n1, rows, lanes, out, scratch, fast):
    """`decay_rows`, inlined into the caller, which must not be compiled with 'reassoc'."""


@overload(decay_rows, jit_options=_JIT_EXACT)
@overload(decay_rows_inline, inline='always')
def _decay_rows_impl(dt, row0, A, n0, n1, rows, lanes, out, scratch, fast):
    if out.dtype == types.float32:
        def impl(dt, row0, A, n0, n1, rows, lanes, out, scratch, fast):
            if not fast:
                for i in range(rows):
                    for n in range(n0, n1):
                        for c in range(lanes):
                            out[i, n - n0, c] = np.exp(dt[row0 + i, c] * A[n, c])
                return None
            bits = scratch.view(np.int32)
            for i in range(rows):
                for n in range(n0, n1):
                    for c in range(lanes):
                        p, e = _exp_parts(dt[row0 + i, c] * A[n, c])
                        bits[i, n - n0, c] = e
                        out[i, n - n0, c] = p * scratch[i, n - n0, c]
            return None

        return impl

    def impl(dt, row0, A, n0, n1, rows, lanes, out, scratch, fast):
        for i in range(rows):
            for n in range(n0, n1):
                for c in range(lanes):
                    out[i, n - n0, c] = np.exp(dt[row0 + i, c] * A[n, c])
        return None

    return impl


def step_rows(delta, b, d0, lanes, start, rows, bias, softplus, out, scratch):
    """out[i, c] = Δ of channel d0 + c at position start + i: delta + bias, through softplus if asked.

    softplus(x) = x above torch's threshold of 20, else max(x, 0) + log1p(exp(-|x|)), with
    log1p(e) = 2 atanh(e / (2 + e)) as a series in s = e / (2 + e) <= 1/3 (error below 2e-8).
    `scratch` is a float buffer at least as large as out.
    """


@overload(step_rows, jit_options=_JIT_EXACT)
def _step_rows_impl(delta, b, d0, lanes, start, rows, bias, softplus, out, scratch):
    vectorised = out.dtype == types.float32

    def impl(delta, b, d0, lanes, start, rows, bias, softplus, out, scratch):
        for i in range(rows):
            for c in range(lanes):
                out[i, c] = delta[b, d0 + c, start + i] + bias[d0 + c]
        if not softplus:
            return None
        if not vectorised:
            for i in range(rows):
                for c in range(lanes):
                    x = out[i, c]
                    out[i, c] = x if x > 20 else np.log1p(np.exp(x))
            return None
        bits = scratch.view(np.int32)
        for i in range(rows):
            for c in range(lanes):
                x = out[i, c]
                ax = abs(x)
                p, e = _exp_parts(-(ax if ax < np.float32(87) else np.float32(87)))  # NaN: any finite value
                bits[i, c] = e
                t = p * scratch[i, c]
                s = t / (np.float32(2) + t)
                s2 = s * s
                q = np.float32(1 / 13)
                q = q * s2 + np.float32(1 / 11)
                q = q * s2 + np.float32(1 / 9)
                q = q * s2 + np.float32(1 / 7)
                q = q * s2 + np.float32(1 / 5)
                q = q * s2 + np.float32(1 / 3)
                q = q * s2 + np.float32(1)
                v = (x if x > np.float32(0) else np.float32(0)) + np.float32(2) * s * q
                out[i, c] = x if (x > np.float32(20) or x != x) else v
        return None

    return impl


def output_rows(yl, ul, Dv, z, has_z, b, d0, lanes, start, rows, out, zl, scratch):
    """out[b, d0 + c, start + i] = (yl[i, c] + D[d0 + c] ul[i, c]) * silu(z[b, d0 + c, start + i]).

    silu(z) = z / (1 + exp(-z)); without z, no gate. `zl` and `scratch` are float buffers like yl.
    """


@overload(output_rows, jit_options=_JIT_EXACT)
def _output_rows_impl(yl, ul, Dv, z, has_z, b, d0, lanes, start, rows, out, zl, scratch):
    vectorised = yl.dtype == types.float32

    def impl(yl, ul, Dv, z, has_z, b, d0, lanes, start, rows, out, zl, scratch):
        for i in range(rows):
            for c in range(lanes):
                yl[i, c] += Dv[d0 + c] * ul[i, c]
        if has_z:
            for i in range(rows):
                for c in range(lanes):
                    zl[i, c] = z[b, d0 + c, start + i]
            if vectorised:
                bits = scratch.view(np.int32)
                for i in range(rows):
                    for c in range(lanes):
                        zv = zl[i, c]
                        m = -zv
                        m = m if m < np.float32(87) else np.float32(87)  # NaN: any finite value
                        m = m if m > np.float32(-87) else np.float32(-87)
                        p, e = _exp_parts(m)
                        bits[i, c] = e
                        yl[i, c] *= zv / (np.float32(1) + p * scratch[i, c])
            else:
                for i in range(rows):
                    for c in range(lanes):
                        zv = zl[i, c]
                        yl[i, c] *= zv / (1 + np.exp(-zv))
        for i in range(rows):
            for c in range(lanes):
                out[b, d0 + c, start + i] = yl[i, c]
        return None

    return impl


@njit(**_JIT)
def _inputs_and_local_backward(dtu, a, Bl, Bg, b_const, bb, bg, start, rows, window, lanes, x, q, r):
    """x_t = Δ_t u_t B_t, and, right to left inside each window, q_t = a_t h^R_{t+1} (0 at the end).

    With window 1, q = 0. B is the block's constant B (Bl[n, lane]) or its group's (Bg[bb, bg, t, n]).
    """
    n_state = a.shape[1]
    for ws in range(0, rows, window):
        r[:, :lanes] = 0
        for i in range(min(ws + window, rows) - 1, ws - 1, -1):
            for n in range(n_state):
                bs = Bl[0, 0] if b_const else Bg[bb, bg, start + i, n]
                for c in range(lanes):
                    xv = dtu[i, c] * (Bl[n, c] if b_const else bs)
                    qv = a[i, n, c] * r[n, c]
                    x[i, n, c] = xv
                    q[i, n, c] = qv
                    r[n, c] = qv + xv


def _blocks(dim: int, width: int, *group_counts: int) -> np.ndarray:
    """(start, length) of channel blocks of at most `width` channels that never straddle a group."""
    edges = {0, dim}
    for groups in group_counts:
        edges.update(range(0, dim, dim // groups))
    edges = sorted(edges)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        out.extend((s, min(width, hi - s)) for s in range(lo, hi, width))
    return np.asarray(out, dtype=np.int64)


@njit(**_JIT)
def _task_layout(task, blocks, Bg, Cg, dim):
    """Task -> batch b, channel block (index, first channel, width) and the B / C (batch, group) used."""
    n_blocks = blocks.shape[0]
    b = task // n_blocks
    blk = task % n_blocks
    d0 = blocks[blk, 0]
    bb = b if Bg.shape[0] > 1 else 0
    cb = b if Cg.shape[0] > 1 else 0
    return b, blk, d0, blocks[blk, 1], bb, d0 // (dim // Bg.shape[1]), cb, d0 // (dim // Cg.shape[1])


# ----------------------------------------------------------------------------------------------
# Forward: y_t = C_t . h_t (before the D skip and the gate), in the (batch, L, dim) layout.
# ----------------------------------------------------------------------------------------------


@njit(**_JIT_EXACT)  # no sums across lanes to vectorise; the inlined exponential needs exact flags
def _forward_kernel(
    task_lo, task_hi, width, u, delta, bias, softplus, At, Bc, Bg, b_const, Cc, Cg, c_const, Dv, z, has_z, window, chunk, blocks,
    zero, out, last, ckpt,
):
    batch, dim, seqlen = u.shape
    n_state = At.shape[0]
    rows_max = min(chunk, seqlen)
    tile = tile_length(window)
    tile_max = min(tile, rows_max)
    for task in range(task_lo, task_hi):
        b, blk, d0, lanes, bb, bg, cb, cg = _task_layout(task, blocks, Bg, Cg, dim)
        d1 = d0 + lanes
        # The hot loops touch only these contiguous thread-local blocks (indices LLVM can vectorise);
        # the per-state tiles (a, x, q of one state over a tile of positions) stay in L1. Lanes past
        # the block's own stay 0, so the hot loops may run over the whole width.
        a = np.empty((tile_max, 1, width), u.dtype)
        a_scratch = np.empty((tile_max, 1, width), u.dtype)
        x = np.empty((tile_max, width), u.dtype)
        q = np.empty((tile_max, width), u.dtype)
        scratch = np.empty((rows_max, width), u.dtype)
        dtl = np.zeros((rows_max, width), u.dtype)
        ul = np.zeros((rows_max, width), u.dtype)
        dtu = np.zeros((rows_max, width), u.dtype)
        yl = np.empty((rows_max, width), u.dtype)
        zl = np.empty((rows_max, width), u.dtype)
        Al = np.zeros((n_state, width), u.dtype)
        Bl = np.zeros((n_state, width), u.dtype)
        Cl = np.zeros((n_state, width), u.dtype)
        h = np.zeros((n_state, width), u.dtype)
        r = np.empty(width, u.dtype)
        Al[:, :lanes] = At[:, d0:d1]
        if b_const:
            Bl[:, :lanes] = Bc[:, d0:d1]
        if c_const:
            Cl[:, :lanes] = Cc[:, d0:d1]
        for start in range(0, seqlen, chunk):
            rows = min(chunk, seqlen - start)
            ckpt[b, start // chunk, :, d0:d1] = h[:, :lanes]
            step_rows(delta, b, d0, lanes, start, rows, bias, softplus, dtl, scratch)
            for i in range(rows):
                for c in range(lanes):
                    ul[i, c] = u[b, d0 + c, start + i]
            for i in range(rows):
                for c in range(lanes):
                    dtu[i, c] = dtl[i, c] * ul[i, c]
            fast = fast_exp_ok(dtl, rows, lanes, Al)
            yl[:rows] = zero
            for ts in range(0, rows, tile):
                tr = min(tile, rows - ts)
                for n in range(n_state):
                    decay_rows_inline(dtl, ts, Al, n, n + 1, tr, width, a, a_scratch, fast)
                    if window > 1:
                        # right to left inside each window: x_t = Δ_t u_t B_t and q_t = a_t h^R_{t+1}
                        for ws in range(0, tr, window):
                            r[:] = zero
                            for j in range(min(ws + window, tr) - 1, ws - 1, -1):
                                bs = zero if b_const else Bg[bb, bg, start + ts + j, n]
                                for c in range(width):
                                    xv = dtu[ts + j, c] * (Bl[n, c] if b_const else bs)
                                    qv = a[j, 0, c] * r[c]
                                    x[j, c] = xv
                                    q[j, c] = qv
                                    r[c] = qv + xv
                        # left to right: h^L, and y_t += C_t (h^L_t + q_t)
                        for j in range(tr):
                            cs = zero if c_const else Cg[cb, cg, start + ts + j, n]
                            for c in range(width):
                                hv = a[j, 0, c] * h[n, c] + x[j, c]
                                h[n, c] = hv
                                yl[ts + j, c] += (Cl[n, c] if c_const else cs) * (hv + q[j, c])
                    else:  # vanilla scan: x formed on the fly, no local backward state
                        for j in range(tr):
                            t = start + ts + j
                            bs = zero if b_const else Bg[bb, bg, t, n]
                            cs = zero if c_const else Cg[cb, cg, t, n]
                            for c in range(width):
                                hv = a[j, 0, c] * h[n, c] + dtu[ts + j, c] * (Bl[n, c] if b_const else bs)
                                h[n, c] = hv
                                yl[ts + j, c] += (Cl[n, c] if c_const else cs) * hv
            output_rows(yl, ul, Dv, z, has_z, b, d0, lanes, start, rows, out, zl, scratch)
        last[b, d0:d1, :] = h[:, :lanes].T


# ----------------------------------------------------------------------------------------------
# Backward: from dy = dL/dy_t to du (through x only), dΔ, dA, dB, dC; also y itself when asked.
# ----------------------------------------------------------------------------------------------


@njit(**_JIT)
def _backward_kernel(
    task_lo, task_hi, width, dy, dlast, has_dlast, u, dt, At, Bc, Bg, b_const, Cc, Cg, c_const, window, chunk, ckpt, blocks, zero, want_y,
    y, du, ddt, dA_part, dB_part, dC_part,
):
    batch, dim, seqlen = u.shape
    n_state = At.shape[0]
    n_chunks = ckpt.shape[1]
    rows_max = min(chunk, seqlen)
    for task in range(task_lo, task_hi):
        b, blk, d0, lanes, bb, bg, cb, cg = _task_layout(task, blocks, Bg, Cg, dim)
        d1 = d0 + lanes
        a = np.empty((rows_max, n_state, width), u.dtype)
        x = np.empty((rows_max, n_state, width), u.dtype)
        q = np.zeros((rows_max, n_state, width), u.dtype)
        hl = np.empty((rows_max + 1, n_state, width), u.dtype)  # row i holds h^L_{i-1}
        gr = np.empty((rows_max, n_state, width), u.dtype)
        scratch = np.empty((rows_max, n_state, width), u.dtype)
        dtl = np.empty((rows_max, width), u.dtype)
        ul = np.empty((rows_max, width), u.dtype)
        dtu = np.empty((rows_max, width), u.dtype)
        dyl = np.empty((rows_max, width), u.dtype)
        dul = np.empty((rows_max, width), u.dtype)  # dx·B summed over states, then times Δ
        ddtl = np.empty((rows_max, width), u.dtype)
        yl = np.empty((rows_max, width), u.dtype)
        r = np.empty((n_state, width), u.dtype)
        Al = np.empty((n_state, width), u.dtype)
        bv = np.zeros((n_state, width), u.dtype)  # B and C of the current position, per lane
        cv = np.zeros((n_state, width), u.dtype)
        carry = np.zeros((n_state, width), u.dtype)  # a_{t+1} dh^L_{t+1}: what reaches h^L_t from the right
        dA_acc = np.zeros((n_state, width), u.dtype)
        dB_acc = np.zeros((n_state, width), u.dtype)
        dC_acc = np.zeros((n_state, width), u.dtype)
        Al[:, :lanes] = At[:, d0:d1]
        if has_dlast:
            carry[:, :lanes] = dlast[b, d0:d1, :].T
        if b_const:
            bv[:, :lanes] = Bc[:, d0:d1]
        if c_const:
            cv[:, :lanes] = Cc[:, d0:d1]
        for ck in range(n_chunks - 1, -1, -1):
            start = ck * chunk
            rows = min(chunk, seqlen - start)
            dtl[:rows, :lanes] = dt[b, d0:d1, start:start + rows].T
            ul[:rows, :lanes] = u[b, d0:d1, start:start + rows].T
            dyl[:rows, :lanes] = dy[b, d0:d1, start:start + rows].T
            for i in range(rows):
                for c in range(lanes):
                    dtu[i, c] = dtl[i, c] * ul[i, c]
            # Recompute the chunk from its checkpoint (windows never straddle chunks).
            decay_rows(dtl, 0, Al, 0, n_state, rows, lanes, a, scratch, fast_exp_ok(dtl, rows, lanes, Al))
            _inputs_and_local_backward(dtu, a, bv, Bg, b_const, bb, bg, start, rows, window, lanes, x, q, r)
            hl[0, :, :lanes] = ckpt[b, ck, :, d0:d1]
            for i in range(rows):
                for n in range(n_state):
                    for c in range(lanes):
                        hl[i + 1, n, c] = a[i, n, c] * hl[i, n, c] + x[i, n, c]
            # dh^R, left to right, reset at each window start: gr_t = dy_t C_t + a_{t-1} gr_{t-1}
            if window > 1:
                for i in range(rows):
                    for n in range(n_state):
                        cs = zero if c_const else Cg[cb, cg, start + i, n]
                        if i % window == 0:
                            for c in range(lanes):
                                gr[i, n, c] = dyl[i, c] * (cv[n, c] if c_const else cs)
                        else:
                            for c in range(lanes):
                                gr[i, n, c] = dyl[i, c] * (cv[n, c] if c_const else cs) + a[i - 1, n, c] * gr[i - 1, n, c]
            # dh^L right to left, and every gradient of position t:
            # dx = dh^L + dh^R - dy C;  a da = a dh^L h^L_{t-1} + dh^R q_t  (window 1: dh^R = dy C, q = 0)
            for i in range(rows - 1, -1, -1):
                t = start + i
                if not b_const:
                    for n in range(n_state):
                        bv[n, :lanes] = Bg[bb, bg, t, n]
                if not c_const:
                    for n in range(n_state):
                        cv[n, :lanes] = Cg[cb, cg, t, n]
                dul[i, :lanes] = zero
                ddtl[i, :lanes] = zero
                yl[i, :lanes] = zero
                for n in range(n_state):
                    dB_sum = zero
                    dC_sum = zero
                    for c in range(lanes):
                        dyc = dyl[i, c]
                        an = a[i, n, c]
                        dh = dyc * cv[n, c]
                        gl = dh + carry[n, c]
                        agl = an * gl
                        carry[n, c] = agl
                        if window > 1:
                            grn = gr[i, n, c]
                            qn = q[i, n, c]
                            dx = gl + grn - dh
                            dan = agl * hl[i, n, c] + grn * qn
                            state = hl[i + 1, n, c] + qn
                        else:
                            dx = gl
                            dan = agl * hl[i, n, c]
                            state = hl[i + 1, n, c]
                        dxbn = dx * bv[n, c]
                        ddtl[i, c] += dxbn * ul[i, c] + dan * Al[n, c]
                        dul[i, c] += dxbn
                        yl[i, c] += cv[n, c] * state
                        dA_acc[n, c] += dan * dtl[i, c]
                        dxdtu = dx * dtu[i, c]
                        dystate = dyc * state
                        dB_acc[n, c] += dxdtu
                        dC_acc[n, c] += dystate
                        dB_sum += dxdtu
                        dC_sum += dystate
                    if not b_const:  # the group's B_t is shared by the block: sum over its lanes
                        dB_part[blk, bb, bg, t, n] += dB_sum
                    if not c_const:
                        dC_part[blk, cb, cg, t, n] += dC_sum
                for c in range(lanes):
                    dul[i, c] *= dtl[i, c]
            du[b, d0:d1, start:start + rows] = dul[:rows, :lanes].T
            ddt[b, d0:d1, start:start + rows] = ddtl[:rows, :lanes].T
            if want_y:
                y[b, d0:d1, start:start + rows] = yl[:rows, :lanes].T
        dA_part[b, :, d0:d1] = dA_acc[:, :lanes]
        if b_const:
            dB_part[0, b, 0, :, d0:d1] = dB_acc[:, :lanes]
        if c_const:
            dC_part[0, b, 0, :, d0:d1] = dC_acc[:, :lanes]


# ----------------------------------------------------------------------------------------------
# Torch-facing wrappers (the fused-backend interface of lbmamba.ops._fused).
# ----------------------------------------------------------------------------------------------


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _zero(dtype: torch.dtype):
    """A typed zero: keeps numba's accumulators in the compute dtype instead of float64."""
    return np.float64(0) if dtype == torch.float64 else np.float32(0)


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return _contiguous(t, dtype).numpy()


def _bc_kernel_layout(t: torch.Tensor, dtype: torch.dtype):
    """(constant, grouped, is_constant): constant (dim, N) as (N, dim); grouped (batch, G, N, L) as
    (batch, G, L, N). The unused one is a small placeholder with the right rank."""
    if t.dim() == 2:
        return _np(t.t(), dtype), np.zeros((1, 1, 1, 1), dtype=_np_dtype(dtype)), True
    return np.zeros((1, 1), dtype=_np_dtype(dtype)), _np(t.transpose(2, 3), dtype), False


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Detached, contiguous, in the compute dtype (no copy when it already is)."""
    return t.detach().to(dtype).contiguous()


_POOL = None
_POOL_LOCK = threading.Lock()


def _run_tasks(kernel, n_tasks: int, *args) -> None:
    """Run kernel(lo, hi, *args) over task ranges on up to torch.get_num_threads() threads.

    The kernels release the GIL (nogil), so plain Python threads run them in parallel. Unlike numba's
    OpenMP pool, idle threads here sleep instead of spinning, so they never fight PyTorch's own
    OpenMP threads for the cores between the scan and the elementwise torch ops around it.
    """
    global _POOL
    threads = max(1, min(torch.get_num_threads(), n_tasks))
    if threads == 1:
        kernel(0, n_tasks, *args)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lbmamba-scan")
        pool = _POOL
    # a few ranges per thread, handed out dynamically, so a slow thread does not hold up the rest
    n_ranges = min(n_tasks, 4 * threads)
    edges = [n_tasks * k // n_ranges for k in range(n_ranges + 1)]
    futures = [pool.submit(kernel, lo, hi, *args) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    for future in futures:
        future.result()


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
    out = torch.empty((batch, dim, seqlen), dtype=ct)
    last = torch.empty((batch, dim, dstate), dtype=ct)
    ckpt = torch.empty(checkpoint_shape(batch, dim, seqlen, dstate, window), dtype=ct)
    Bc, Bg, b_const = _bc_kernel_layout(B, ct)
    Cc, Cg, c_const = _bc_kernel_layout(C, ct)
    width = block_width(batch, dim, torch.get_num_threads())
    blocks = _blocks(dim, width, Bg.shape[1], Cg.shape[1])
    _run_tasks(
        _forward_kernel, batch * len(blocks), width,
        _np(u, ct), _np(delta, ct), _per_channel(delta_bias, dim, ct), bool(delta_softplus), _np(A.t(), ct),
        Bc, Bg, b_const, Cc, Cg, c_const, _per_channel(D, dim, ct),
        _np(z, ct) if z is not None else np.zeros((1, 1, 1), dtype=_np_dtype(ct)), z is not None,
        int(window), chunk_length(window), blocks, _zero(ct), out.numpy(), last.numpy(), ckpt.numpy(),
    )
    return out.to(u.dtype), last, ckpt


def _per_channel(t, dim: int, dtype: torch.dtype) -> np.ndarray:
    """D or delta_bias as a (dim,) array; zeros when absent."""
    return _np(t, dtype) if t is not None else np.zeros(dim, dtype=_np_dtype(dtype))


def backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, checkpoints):
    ct = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u_c = _contiguous(u, ct)
    g = _contiguous(dout, ct)
    dy = F.silu(_contiguous(z, ct)).mul_(g) if z is not None else g
    Bc, Bg, b_const = _bc_kernel_layout(B, ct)
    Cc, Cg, c_const = _bc_kernel_layout(C, ct)
    width = block_width(batch, dim, torch.get_num_threads())
    blocks = _blocks(dim, width, Bg.shape[1], Cg.shape[1])

    def partial(is_const, grouped):
        # constant: one slot per batch element (lanes are channels); grouped: one per channel block
        if is_const:
            return torch.empty((1, batch, 1, dstate, dim), dtype=ct)
        return torch.zeros((len(blocks),) + grouped.shape, dtype=ct)

    y = torch.empty((batch, dim, seqlen), dtype=ct) if z is not None else torch.empty((1, 1, 1), dtype=ct)
    du = torch.empty((batch, dim, seqlen), dtype=ct)
    ddt = torch.empty_like(du)
    dA_part = torch.empty((batch, dstate, dim), dtype=ct)
    dB_part, dC_part = partial(b_const, Bg), partial(c_const, Cg)
    has_dlast = dlast_state is not None
    dlast = _np(dlast_state, ct) if has_dlast else np.zeros((1, 1, 1), dtype=_np_dtype(ct))
    dt = _step(delta, delta_bias, delta_softplus, ct)
    _run_tasks(
        _backward_kernel, batch * len(blocks), width,
        dy.numpy(), dlast, has_dlast, u_c.numpy(), dt.numpy(), _np(A.t(), ct), Bc, Bg, b_const, Cc, Cg, c_const,
        int(window), chunk_length(window), _np(checkpoints, ct), blocks, _zero(ct), z is not None, y.numpy(),
        du.numpy(), ddt.numpy(), dA_part.numpy(), dB_part.numpy(), dC_part.numpy(),
    )
    del dt
    dz = u.new_empty((0,))
    dD = (dy * u_c).sum((0, 2))
    if D is not None:
        D_c = _contiguous(D, ct)[:, None]
        du.addcmul_(dy, D_c)
        if z is not None:
            y.addcmul_(D_c, u_c)
    if z is not None:  # d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
        zc = _contiguous(z, ct)
        s = torch.sigmoid(zc)
        dz = torch.rsub(s, 1).mul_(zc).add_(1).mul_(s).mul_(y).mul_(g).to(z.dtype)
    del y
    if delta_softplus:  # softplus' = sigmoid, and the identity above torch's threshold of 20
        # delta + bias again rather than kept alive across the kernel: one cheap elementwise op
        # instead of a (batch, dim, L) buffer on the backward's memory peak
        pre = _pre_softplus(delta, delta_bias, ct)
        ddt.mul_(torch.sigmoid(pre).masked_fill_(pre > 20.0, 1.0))
    dbias = ddt.sum((0, 2))
    return (
        du.to(u.dtype),
        ddt.to(delta.dtype),
        dA_part.sum(0).t().to(A.dtype),
        _bc_grad(dB_part, B),
        _bc_grad(dC_part, C),
        dD.to(D.dtype) if D is not None else dD.float(),
        dz,
        dbias.to(delta_bias.dtype) if delta_bias is not None else dbias.float(),
    )


def _bc_grad(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum the partial buffers of B or C back into the caller's layout and dtype."""
    if like.dim() == 2:  # constant: (1, batch, 1, N, dim) -> (dim, N)
        return part.sum((0, 1))[0].t().to(like.dtype)
    return part.sum(0).transpose(2, 3).to(like.dtype)  # (batch, G, L, N) -> (batch, G, N, L)
