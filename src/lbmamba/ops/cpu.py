"""The "cpu" backend: fused numba kernels for the LB scan, forward and backward written by hand.

Why numba: it ships as a wheel on every platform PyTorch's CPU build runs on, needs no compiler at
install time, compiles to vectorised machine code for the host CPU (AVX2 / AVX-512 where present),
releases the GIL inside the kernels, and caches compiled kernels on disk.

Everything per position is fused into the kernels: Δ = softplus(delta + bias), a_t = exp(Δ_t A)
(a vectorised exponential), both scans, the D skip and the silu gate, and in the backward every
gradient including those of softplus and the gate. The kernels read each (batch, dim, L) input in
whichever of the (batch, L, dim) or (batch, dim, L) memory layouts it comes in, transposing blocks
as they load them into thread-local buffers where each position's channels are contiguous, and
write (batch, dim, L) outputs the same way: no whole-tensor copies.

Layout of the numba work: each task is one batch element and one block of `width` channels (a block
never straddles a group of B or C); the innermost loops run over the block's channels, so LLVM turns
them into SIMD code with no sums across SIMD lanes and no short loops over the N states.
- forward: chunks of `chunk_length(W)` positions (whole windows) in order; h^L is saved at the start
  of every chunk after the first: these checkpoints are all the backward needs. Within a chunk,
  tiles of whole windows, one state n at a time (the tile's buffers stay in L1): a pass right to
  left inside each window computes a_t and the local backward state h^R_t = a_t h^R_{t+1} + x_t,
  then a pass left to right runs h^L and accumulates y_t += C_t (h^L_t + h^R_t - x_t), computed as
  C_t (a_t h^L_{t-1} + h^R_t). Window 1 is a single pass.
- backward: chunks are visited last to first; each is recomputed from its checkpoint into
  thread-local buffers (chunk x N x width), then dh^R runs left to right (reset at each window
  start) and dh^L right to left (carried across chunks), and every gradient is accumulated in the
  same sweep.
Threads: the calling thread runs the tasks, helped by pool threads for calls big enough to gain from
them (see _TaskPool: no fork-join, so a busy core never holds a call up). Per-call set-up is kept
small, so that a call's cost follows batch x dim x L x N down to one position: no whole-tensor copies,
no 2-d slice copies in the kernels, and in the forward a ForwardPlan made once per signature of the
arguments, so that a call passes only the tensors' data addresses (_forward_at).
Nothing of size (batch, dim, L, N) is ever allocated. Reductions over batch (A, D, delta_bias,
constant B / C) or over the channels of a group (variable B / C) go to small per-task partial
buffers summed afterwards, so threads never race.

Arithmetic is float32 for float32 / float16 / bfloat16 inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import sys
import threading

import numba
import numpy as np
import torch
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


def _prefer_512_bit_vectors() -> bool:
    """Let LLVM vectorise at 512 bits on AVX-512 CPUs: the kernels run about 20 % faster.

    LLVM's tuning for these CPUs ("prefer-256-bit") caps loop vectors at 256 bits, and numba has no
    per-function switch, so this sets numba's CPU features for the process (the host's features, minus
    that tuning flag). It only changes how numba code is vectorised, never what it computes, and only
    when numba has not compiled anything yet, NUMBA_CPU_FEATURES is unset and LBMAMBA_NUMBA_512 is
    not "0". Returns whether it applied.
    """
    from numba.core import registry

    if os.environ.get("LBMAMBA_NUMBA_512", "1") == "0" or numba.config.CPU_FEATURES is not None:
        return False
    if "_toplevel_target_context" in vars(registry.cpu_target):  # codegen already created
        return False
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return False
    numba.config.CPU_FEATURES = features + ",-prefer-256-bit"
    return True


WIDE_VECTORS = _prefer_512_bit_vectors()


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


#: the fused-backend interface's d_state limit: none (the per-task buffers grow with it, nothing else)
MAX_DSTATE = None


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
    return -(-seqlen // chunk_length(window)) - 1


def checkpoint_shape(batch: int, dim: int, seqlen: int, dstate: int, window: int) -> tuple:
    """h^L at the start of every chunk but the first (where it is 0), channels last as the kernels use them."""
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


def _decay(x, fast, e_bits, e_float, c):
    """exp(x) at lane c of a vectorised loop: through `_exp_parts` and the lane's scratch (e_bits /
    e_float: int32 and float32 views of one buffer) when `fast` (see fast_exp_ok), else libm."""


@overload(_decay, inline="always")
def _decay_impl(x, fast, e_bits, e_float, c):
    if x == types.float32:
        def impl(x, fast, e_bits, e_float, c):
            if fast:
                p, e = _exp_parts(x)
                e_bits[c] = e
                return p * e_float[c]
            return np.exp(x)

        return impl
    return lambda x, fast, e_bits, e_float, c: np.exp(x)


def _exp_clamped(x, e_bits, e_float, c):
    """exp(x) at lane c of a vectorised loop, for the gate's sigmoid: float32 x is clamped to ±87 (NaN
    to a finite value), where the result under- or overflows float32 anyway; float64 goes to libm."""


@overload(_exp_clamped, inline="always")
def _exp_clamped_impl(x, e_bits, e_float, c):
    if x == types.float32:
        def impl(x, e_bits, e_float, c):
            m = x if x < np.float32(87) else np.float32(87)
            return _decay(m if m > np.float32(-87) else np.float32(-87), True, e_bits, e_float, c)

        return impl
    return lambda x, e_bits, e_float, c: np.exp(x)


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


def abs_max_if_finite(x, rows, lanes, acc):
    """max |x[i, c]| over i < rows, c < lanes, or inf if any is NaN / inf; acc: at least `lanes` floats of
    scratch.

    Computed on the bits: without the sign bit, a float's bits order as its magnitude, and NaN and inf
    are above every finite value, so one integer maximum gives both answers. Integer maxima vectorise;
    float ones do not without 'nnan': the float version was 12 us of the 42 us kernel call at
    (1, 1024, 1, 16).
    """


@overload(abs_max_if_finite, jit_options=_JIT_EXACT)
def _abs_max_if_finite_impl(x, rows, lanes, acc):
    if x.dtype == types.float32:
        bits, magnitude, nonfinite = np.int32, np.int32(0x7FFFFFFF), np.int32(0x7F800000)
    else:
        bits, magnitude, nonfinite = np.int64, np.int64(0x7FFFFFFFFFFFFFFF), np.int64(0x7FF0000000000000)

    def impl(x, rows, lanes, acc):
        x_bits = x.view(bits)
        acc_bits = acc.view(bits)
        for c in range(lanes):
            acc_bits[c] = 0
        for i in range(rows):
            row = x_bits[i]
            for c in range(lanes):
                v = row[c] & magnitude
                m = acc_bits[c]
                acc_bits[c] = v if v > m else m
        top = acc_bits[0]
        for c in range(1, lanes):
            m = acc_bits[c]
            top = m if m > top else top
        if top >= nonfinite:
            return np.inf
        acc_bits[0] = top
        return acc[0]

    return impl


@njit(inline="always")
def copy_rows(dst, dst_col, src, src_col, lanes):
    """dst[i, dst_col + c] = src[i, src_col + c] for every row i of src and c < lanes. Explicit loops over
    row slices: numba runs 2-d slice assignments through a generic element iterator, about 8x slower,
    which at short lengths was most of a task's cost."""
    for i in range(src.shape[0]):
        s = src[i, src_col:src_col + lanes]
        d = dst[i, dst_col:dst_col + lanes]
        for c in range(lanes):
            d[c] = s[c]


@njit(inline="always")
def copy_transposed(dst, src, d0, lanes):
    """dst[n, c] = src[d0 + c, n]: a (dim, N) parameter into a block's states-first buffer."""
    block = src[d0:d0 + lanes]
    for n in range(dst.shape[0]):
        d = dst[n]
        for c in range(lanes):
            d[c] = block[c, n]


@njit(inline="always")
def fill_rows(dst, rows, lanes, value):
    """dst[i, c] = value for i < rows, c < lanes (see copy_rows for why not a slice assignment)."""
    for i in range(rows):
        d = dst[i]
        for c in range(lanes):
            d[c] = value


@njit(inline="always")
def fast_exp_ok(dt_max, a_max):
    """Whether the vectorised exponential is exact for exp(Δ A): |Δ A| <= 87.3 keeps 2^k normal."""
    return dt_max * a_max <= 87.3


@njit(**_JIT_EXACT)
def decay_block(dt, A, rows, lanes, out, e_float, fast):
    """out[i, n, c] = exp(dt[i, c] * A[n, c]) for i < rows, c < lanes; e_float: `lanes` floats of
    scratch. A function of its own, so that kernels compiled with 'reassoc' do not inline it."""
    e_bits = e_float.view(np.int32)
    for i in range(rows):
        for n in range(A.shape[0]):
            for c in range(lanes):
                out[i, n, c] = _decay(dt[i, c] * A[n, c], fast, e_bits, e_float, c)


@njit(**_JIT_EXACT)
def load_block(src, src_cl, b, d0, lanes, start, rows, dst):
    """dst[i, c] = the value of channel d0 + c at position start + i of batch element b; src is
    (batch, L, dim) when src_cl, else (batch, dim, L) (then the copy is a transpose)."""
    if src_cl:
        for i in range(rows):
            row = src[b, start + i, d0:d0 + lanes]  # 1-d slices: numba's handling of possibly
            for c in range(lanes):                  # negative indices would turn loads into gathers
                dst[i, c] = row[c]
    else:  # a strided gather per row: 1.3x (L = 196) to 9x (L = 1) faster than a slice per channel
        block = src[b, d0:d0 + lanes, start:start + rows]
        for i in range(rows):
            for c in range(lanes):
                dst[i, c] = block[c, i]


@njit(**_JIT_EXACT)
def store_block(dst, b, d0, lanes, start, rows, src):
    """The inverse of load_block into a (batch, dim, L) tensor: dst[b, d0 + c, start + i] = src[i, c]."""
    block = dst[b, d0:d0 + lanes, start:start + rows]
    for i in range(rows):
        for c in range(lanes):
            block[c, i] = src[i, c]


def step_rows(delta, delta_cl, b, d0, lanes, start, rows, bias, softplus, out, slope, want_slope, e_float):
    """out[i, c] = Δ of channel d0 + c at position start + i: delta + bias, through softplus if asked;
    with want_slope, slope[i, c] = dΔ / d(delta) (sigmoid of the argument, 1 above the threshold).

    delta is laid out as for load_block. softplus(x) = x above torch's threshold of 20, else
    max(x, 0) + log1p(t) with t = exp(-|x|), and log1p(t) = 2 atanh(t / (2 + t)) as a series in
    s = t / (2 + t) <= 1/3 (error below 2e-8); sigmoid(x) = (1 or t) / (1 + t).
    """


@overload(step_rows, jit_options=_JIT_EXACT)
def _step_rows_impl(delta, delta_cl, b, d0, lanes, start, rows, bias, softplus, out, slope, want_slope, e_float):
    vectorised = out.dtype == types.float32

    def impl(delta, delta_cl, b, d0, lanes, start, rows, bias, softplus, out, slope, want_slope, e_float):
        load_block(delta, delta_cl, b, d0, lanes, start, rows, out)
        bias_blk = bias[d0:d0 + lanes]
        for i in range(rows):
            for c in range(lanes):
                out[i, c] += bias_blk[c]
        if not softplus:
            if want_slope:
                fill_rows(slope, rows, slope.shape[1], 1)
            return None
        if not vectorised:
            for i in range(rows):
                for c in range(lanes):
                    x = out[i, c]
                    out[i, c] = x if x > 20 else np.log1p(np.exp(x))
                    if want_slope:
                        slope[i, c] = 1 if x > 20 else 1 / (1 + np.exp(-x))
            return None
        e_bits = e_float.view(np.int32)
        if want_slope:
            for i in range(rows):
                for c in range(lanes):
                    x = out[i, c]
                    t = _decay(_softplus_reduced(x), True, e_bits, e_float, c)
                    out[i, c] = _softplus_from(x, t)
                    slope[i, c] = _sigmoid_from(x, t)
        else:  # a separate loop: LLVM does not vectorise the one above with the store made conditional
            for i in range(rows):
                for c in range(lanes):
                    x = out[i, c]
                    out[i, c] = _softplus_from(x, _decay(_softplus_reduced(x), True, e_bits, e_float, c))
        return None

    return impl


@njit(inline="always")
def _softplus_reduced(x):
    """-|x|, the argument of t = exp(-|x|), kept in the vectorised exponential's range (NaN: any finite)."""
    ax = abs(x)
    return -(ax if ax < np.float32(87) else np.float32(87))


@njit(inline="always")
def _softplus_from(x, t):
    """softplus(x) from t = exp(-|x|): x above 20 (and NaN), else max(x, 0) + 2 atanh(t / (2 + t))."""
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
    return x if (x > np.float32(20) or x != x) else v


@njit(inline="always")
def _sigmoid_from(x, t):
    """softplus'(x) = sigmoid(x) from t = exp(-|x|): (1 or t) / (1 + t); 1 above the threshold of 20."""
    one = np.float32(1)
    return one if x > np.float32(20) else (one if x >= np.float32(0) else t) / (one + t)


@njit(**_JIT_EXACT)
def gate_grad_rows(g, g_cl, z, z_cl, has_z, b, d0, lanes, start, rows, dy, gz, e_float):
    """dy[i, c] = g silu(z) (the gradient reaching y) and gz[i, c] = g silu'(z) (dz = gz y) at
    channel d0 + c, position start + i; g and z laid out as for load_block. Without z, dy = g."""
    load_block(g, g_cl, b, d0, lanes, start, rows, dy)
    if not has_z:
        return
    load_block(z, z_cl, b, d0, lanes, start, rows, gz)
    e_bits = e_float.view(np.int32)
    for i in range(rows):
        for c in range(lanes):
            gv = dy[i, c]
            zv = gz[i, c]
            sig = 1 / (1 + _exp_clamped(-zv, e_bits, e_float, c))
            dy[i, c] = gv * zv * sig
            gz[i, c] = gv * sig * (1 + zv * (1 - sig))


@njit(**_JIT_EXACT)
def output_rows(yl, ul, zl, Dv, z, z_cl, has_z, b, d0, lanes, start, rows, out, e_float):
    """out[b, d0 + c, start + i] = (yl[i, c] + D[d0 + c] ul[i, c]) * silu(z at the same place).

    out is (batch, dim, L); z is laid out as for load_block (zl: a buffer for it); silu(z) =
    z / (1 + exp(-z)); without z, no gate.
    """
    D_blk = Dv[d0:d0 + lanes]
    for i in range(rows):
        for c in range(lanes):
            yl[i, c] += D_blk[c] * ul[i, c]
    if has_z:
        load_block(z, z_cl, b, d0, lanes, start, rows, zl)
        e_bits = e_float.view(np.int32)
        for i in range(rows):
            for c in range(lanes):
                zv = zl[i, c]
                yl[i, c] *= zv / (1 + _exp_clamped(-zv, e_bits, e_float, c))
    store_block(out, b, d0, lanes, start, rows, yl)


@njit(**_JIT)
def _inputs_and_local_backward(dtu, a, Bl, Bg, b_const, bb, bg, start, rows, window, lanes, x, q, r):
    """x_t = Δ_t u_t B_t, and, right to left inside each window, q_t = a_t h^R_{t+1} (0 at the end).

    With window 1, q = 0. B is the block's constant B (Bl[n, lane]) or its group's (Bg[bb, bg, t, n]).
    """
    n_state = a.shape[1]
    for ws in range(0, rows, window):
        fill_rows(r, r.shape[0], lanes, 0)
        for i in range(min(ws + window, rows) - 1, ws - 1, -1):
            for n in range(n_state):
                bs = Bl[0, 0] if b_const else Bg[bb, bg, start + i, n]
                for c in range(lanes):
                    xv = dtu[i, c] * (Bl[n, c] if b_const else bs)
                    qv = a[i, n, c] * r[n, c]
                    x[i, n, c] = xv
                    q[i, n, c] = qv
                    r[n, c] = qv + xv


@functools.lru_cache(maxsize=256)
def _blocks(dim: int, width: int, *group_counts: int) -> np.ndarray:
    """(start, length) of channel blocks of at most `width` channels that never straddle a group."""
    edges = {0, dim}
    for groups in group_counts:
        edges.update(range(0, dim, dim // groups))
    edges = sorted(edges)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        out.extend((s, min(width, hi - s)) for s in range(lo, hi, width))
    return np.asarray(out, dtype=np.int64)  # cached and shared between calls: never written


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


@njit(inline="always")
def _aligned_flat(like, shape):
    # numba aligns arrays to 32 bytes, so half of all 512-bit loads and stores would straddle two
    # cache lines (measured: forward 5-10 %, backward 20 % slower)
    size = 1
    for n in shape:
        size *= n
    raw = np.empty(size + 64 // like.itemsize, like.dtype)
    skip = ((64 - (raw.ctypes.data & 63)) & 63) // like.itemsize
    return raw[skip:skip + size]


@njit(inline="always")
def aligned_empty(like, shape):
    """An uninitialised C-contiguous array of `like`'s dtype starting on a 64-byte boundary (so are
    its rows when the last axis is a multiple of 16 floats, as the channel blocks are)."""
    return _aligned_flat(like, shape).reshape(shape)


@njit(inline="always")
def aligned_zeros(like, shape):
    """aligned_empty, filled with zeros."""
    flat = _aligned_flat(like, shape)
    for i in range(flat.size):
        flat[i] = 0
    return flat.reshape(shape)


#: floats left between the blocks of a kernel's scratch. Back to back, blocks whose sizes are multiples of
#: 4 KiB put the same element of each at the same address bits below 4 KiB, and loads then wait on
#: unrelated stores (4K aliasing): in one interleaved run that made the LBVim-T layer 19 % slower. With
#: the gap, three interleaved runs measured it and the long shape within 1 % of separate allocations.
SCRATCH_GAP = 48


@njit(inline="always")
def _rows_of(scratch, at, rows, width):
    """(rows x width block of the flat `scratch` from offset `at`, the offset of the next block)."""
    return scratch[at:at + rows * width].reshape((rows, width)), at + rows * width + SCRATCH_GAP


@njit(**_JIT_EXACT)
def block_params(A, Bc, Cc, d0, lanes, Al, Bl, Cl, acc, with_a):
    """Copy the block's A (and B / C when they are constant (dim, N), else None) into Al / Bl / Cl, states
    first; returns max |A| over the block, inf if any is not finite (for fast_exp_ok). Without `with_a`
    (a single position: no decay to compute) A is neither copied nor read, and 0 is returned."""
    if Bc is not None:
        copy_transposed(Bl, Bc, d0, lanes)
    if Cc is not None:
        copy_transposed(Cl, Cc, d0, lanes)
    if not with_a:
        return acc.dtype.type(0)
    copy_transposed(Al, A, d0, lanes)
    return abs_max_if_finite(Al, Al.shape[0], lanes, acc)


@njit(**_JIT_EXACT)
def chunk_inputs(
    u, u_cl, delta, delta_cl, b, d0, lanes, start, rows, bias, softplus, a_max, dtl, slope, want_slope, ul, dtu,
    e_float, acc,
):
    """Δ (dtl; its slope too with want_slope, see step_rows), u (ul) and Δ u (dtu) at the chunk's rows;
    returns whether the vectorised exponential is exact for exp(Δ A) there (see fast_exp_ok)."""
    step_rows(delta, delta_cl, b, d0, lanes, start, rows, bias, softplus, dtl, slope, want_slope, e_float)
    load_block(u, u_cl, b, d0, lanes, start, rows, ul)
    for i in range(rows):
        for c in range(lanes):
            dtu[i, c] = dtl[i, c] * ul[i, c]
    return fast_exp_ok(abs_max_if_finite(dtl, rows, lanes, acc), a_max)


@intrinsic
def _fetch_add(typingctx, counters, index, value):
    """counters[index] += value, atomically; returns the value before (counters: a 1-d int64 array)."""
    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        slot = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1]])
        return builder.atomic_rmw("add", slot, args[2], "seq_cst")

    return types.int64(counters, types.intp, types.int64), codegen


# ----------------------------------------------------------------------------------------------
# Forward: out_t = (C_t . h_t + D u_t) silu(z_t).
# ----------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT_EXACT)  # one body, in _forward_at (see there); exact flags for the inlined exponential
def _forward_kernel(
    counters, n_tasks, width, u, delta, bias, softplus, A, Bc, Bg, Cc, Cg, Dv, z, has_z, u_cl, delta_cl, z_cl, window,
    chunk, blocks, keep_last, keep_ckpt, out, last, ckpt,
):
    # *_cl: that tensor is given as (batch, L, dim), else as (batch, dim, L)
    # keep_last / keep_ckpt: write the last state / the checkpoints (else last / ckpt are placeholders)
    batch, dim, seqlen = out.shape
    zero = out.dtype.type(0)  # typed: keeps the accumulators in the compute dtype instead of float64
    # None for B / C given per position: numba compiles a kernel per case, with no branch on it
    b_const = Bc is not None
    c_const = Cc is not None
    n_state = A.shape[1]
    rows_max = min(chunk, seqlen)
    tile = tile_length(window)
    tile_max = min(tile, rows_max)
    # The hot loops touch only these contiguous thread-local blocks (indices LLVM can vectorise);
    # the per-state tiles (a and h^R of one state over a tile of positions) stay in L1. Lanes
    # past a block's own hold zeros, so the hot loops may run over the whole width.
    # One allocation, cut into blocks of whole rows (each on a 64-byte boundary; see SCRATCH_GAP): thirteen
    # cost about 1 us of a 26 us (1, 1024, 1, 16) call. Not zeroed: a full block writes every lane before
    # reading it, and a narrower one zeroes its lanes past its own first.
    scratch = aligned_empty(u, ((2 * tile_max + 5 * rows_max + 4 * n_state + 2) * width + 11 * SCRATCH_GAP,))
    a, at = _rows_of(scratch, 0, tile_max, width)
    hr, at = _rows_of(scratch, at, tile_max, width)  # h^R over the tile
    dtl, at = _rows_of(scratch, at, rows_max, width)
    ul, at = _rows_of(scratch, at, rows_max, width)
    dtu, at = _rows_of(scratch, at, rows_max, width)
    yl, at = _rows_of(scratch, at, rows_max, width)
    zl, at = _rows_of(scratch, at, rows_max, width)
    Al, at = _rows_of(scratch, at, n_state, width)
    Bl, at = _rows_of(scratch, at, n_state, width)
    Cl, at = _rows_of(scratch, at, n_state, width)
    h, at = _rows_of(scratch, at, n_state, width)
    e_float = scratch[at:at + width]  # the exponential's scratch
    e_bits = e_float.view(np.int32)
    acc = scratch[at + width:at + 2 * width]
    finished_last = False
    task = _fetch_add(counters, 0, 1)
    while task < n_tasks:  # take tasks until none is left (see _TaskPool)
        b, blk, d0, lanes, bb, bg, cb, cg = _task_layout(task, blocks, Bg, Cg, dim)
        if lanes < width:  # lanes past this block's own go back to 0 (a wider block may have left values)
            for buffer in (dtl, ul, dtu, Al, Bl, Cl):
                fill_rows(buffer, buffer.shape[0], width, zero)
        a_max = block_params(A, Bc, Cc, d0, lanes, Al, Bl, Cl, acc, seqlen > 1)
        for start in range(0, seqlen, chunk):
            rows = min(chunk, seqlen - start)
            if start > 0 and keep_ckpt:  # h^L is 0 at the first chunk's start: no checkpoint for it
                copy_rows(ckpt[b, start // chunk - 1], d0, h, 0, lanes)
            fast = chunk_inputs(
                u, u_cl, delta, delta_cl, b, d0, lanes, start, rows, bias, softplus, a_max, dtl, dtl, False, ul, dtu,
                e_float, acc,
            )
            fill_rows(yl, rows, width, zero)
            for ts in range(0, rows, tile):
                tr = min(tile, rows - ts)
                # this tile's rows of B and C: indexed by range() variables, which numba knows are not
                # negative, so no negative-index fix-up per load (B / C constant: unused placeholders)
                Bt = Bg[bb, bg, start + ts:start + ts + tr] if not b_const else Bg[0, 0]
                Ct = Cg[cb, cg, start + ts:start + ts + tr] if not c_const else Cg[0, 0]
                for n in range(n_state):
                    if window > 1:
                        # right to left inside each window: a_t = exp(Δ_t A), x_t = Δ_t u_t B_t and
                        # h^R_t = a_t h^R_{t+1} + x_t, with h^R = 0 one past the window's end
                        for j in range(tr - 1, -1, -1):
                            bs = zero if b_const else Bt[j, n]
                            if (j + 1) % window == 0 or j == tr - 1:  # a window's last position
                                for c in range(width):
                                    a[j, c] = _decay(dtl[ts + j, c] * Al[n, c], fast, e_bits, e_float, c)
                                    hr[j, c] = dtu[ts + j, c] * (Bl[n, c] if b_const else bs)
                            else:
                                for c in range(width):
                                    av = _decay(dtl[ts + j, c] * Al[n, c], fast, e_bits, e_float, c)
                                    a[j, c] = av
                                    hr[j, c] = av * hr[j + 1, c] + dtu[ts + j, c] * (Bl[n, c] if b_const else bs)
                        # left to right: h^L_t = a_t h^L_{t-1} + x_t (x recomputed: cheaper than storing it)
                        # and y_t += C_t (h^L_t + h^R_t - x_t) = C_t (a_t h^L_{t-1} + h^R_t)
                        first = 0
                        if start + ts == 0:  # h^L is 0 before the first position: h^L_0 = x_0, y_0 = C_0 h^R_0
                            bs = zero if b_const else Bt[0, n]
                            cs = zero if c_const else Ct[0, n]
                            for c in range(width):
                                h[n, c] = dtu[0, c] * (Bl[n, c] if b_const else bs)
                                yl[0, c] += (Cl[n, c] if c_const else cs) * hr[0, c]
                            first = 1
                        for j in range(first, tr):
                            bs = zero if b_const else Bt[j, n]
                            cs = zero if c_const else Ct[j, n]
                            for c in range(width):
                                carried = a[j, c] * h[n, c]
                                h[n, c] = carried + dtu[ts + j, c] * (Bl[n, c] if b_const else bs)
                                yl[ts + j, c] += (Cl[n, c] if c_const else cs) * (carried + hr[j, c])
                    else:  # vanilla scan: a and x formed on the fly, no local backward state
                        first = 0
                        if start + ts == 0:  # h is 0 before the first position: no decay to compute
                            bs = zero if b_const else Bt[0, n]
                            cs = zero if c_const else Ct[0, n]
                            for c in range(width):
                                hv = dtu[0, c] * (Bl[n, c] if b_const else bs)
                                h[n, c] = hv
                                yl[0, c] += (Cl[n, c] if c_const else cs) * hv
                            first = 1
                        for j in range(first, tr):
                            bs = zero if b_const else Bt[j, n]
                            cs = zero if c_const else Ct[j, n]
                            for c in range(width):
                                av = _decay(dtl[ts + j, c] * Al[n, c], fast, e_bits, e_float, c)
                                hv = av * h[n, c] + dtu[ts + j, c] * (Bl[n, c] if b_const else bs)
                                h[n, c] = hv
                                yl[ts + j, c] += (Cl[n, c] if c_const else cs) * hv
            output_rows(yl, ul, zl, Dv, z, z_cl, has_z, b, d0, lanes, start, rows, out, e_float)
        if keep_last:  # a transposed store: 8 us of a 50 us call at (1, 1024, 1, 16)
            for c in range(lanes):
                row = last[b, d0 + c]
                for n in range(n_state):
                    row[n] = h[n, c]
        finished_last = _fetch_add(counters, 1, 1) == n_tasks - 1
        task = _fetch_add(counters, 0, 1)
    return finished_last


@intrinsic
def _pointer_at(typingctx, address, like):
    """A pointer to like's dtype at the integer `address` (a torch tensor's data_ptr())."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(like.dtype)(address, like), codegen


@njit(inline="always")
def _view(address, shape, like):
    """The C-contiguous array of `shape` (like's dtype) at `address`: memory of a tensor the caller keeps alive."""
    return numba.carray(_pointer_at(address, like), shape)


@njit(inline="always")
def _strided_view(address, shape, strides, like):
    """_view with strides in bytes (any layout), for B and C as the forward kernel reads them."""
    return np.lib.stride_tricks.as_strided(numba.carray(_pointer_at(address, like), (1,)), shape=shape, strides=strides)


@njit(**_JIT_EXACT)
def _forward_at(
    counters, n_tasks, width, blocks, u_at, delta_at, z_at, A_at, D_at, bias_at, Bc_at, Bg_at, Cc_at, Cg_at, out_at,
    last_at, ckpt_at, softplus, batch, dim, seqlen, dstate, Bg_shape, Bg_strides, Cg_shape, Cg_strides, ckpt_count,
    u_cl, delta_cl, z_cl, has_z, window, chunk, keep_last, keep_ckpt, like,
):
    """_forward_kernel on tensors given by their data addresses (torch's data_ptr(), a tenth of the cost of
    a numpy view, which took a third of a short call). u, delta and z are contiguous as (batch, L, dim)
    when *_cl, else as (batch, dim, L); A, D, bias and constant B / C contiguous; grouped B / C
    (batch, G, L, N) with strides. Bc_at / Cc_at None: B / C per position (Bg / Cg); absent z, last
    state or checkpoints: addresses of placeholders, which the kernel does not touch. counters None: a call
    on the calling thread alone (counters made here, a numpy array less to make and pass per call).

    _forward_kernel is inlined here (numba's inline="always"), so that one compiled body is all there is:
    called as a separate function, its rounding differed between the process that compiled it and the
    processes that loaded it from numba's cache (last bits only, most likely other multiply-adds fused), so a run
    resumed in a new process no longer matched one that never stopped (cold cache: CI)."""
    counters = np.zeros(2, dtype=np.int64) if counters is None else counters
    layout = (batch, dim, seqlen)
    cl_layout = (batch, seqlen, dim)
    Bc = None if Bc_at is None else _view(Bc_at, (dim, dstate), like)
    Cc = None if Cc_at is None else _view(Cc_at, (dim, dstate), like)
    return _forward_kernel(
        counters, n_tasks, width, _view(u_at, cl_layout if u_cl else layout, like),
        _view(delta_at, cl_layout if delta_cl else layout, like), _view(bias_at, (dim,), like), softplus,
        _view(A_at, (dim, dstate), like), Bc, _strided_view(Bg_at, Bg_shape, Bg_strides, like), Cc,
        _strided_view(Cg_at, Cg_shape, Cg_strides, like), _view(D_at, (dim,), like),
        _view(z_at, (cl_layout if z_cl else layout) if has_z else (1, 1, 1), like), has_z, u_cl, delta_cl, z_cl,
        window, chunk, blocks, keep_last, keep_ckpt, _view(out_at, layout, like),
        _view(last_at, (batch, dim, dstate) if keep_last else (1, 1, 1), like),
        _view(ckpt_at, (batch, ckpt_count, dstate, dim) if keep_ckpt else (1, 1, 1, 1), like),
    )


# ----------------------------------------------------------------------------------------------
# Backward: from dy = dL/dy_t to du (through x only), dΔ, dA, dB, dC; also y itself when asked.
# ----------------------------------------------------------------------------------------------


@njit(**_JIT)
def _backward_kernel(
    counters, n_tasks, width, g, dlast, has_dlast, u, delta, bias, softplus, A, Bc, Bg, Cc, Cg, Dv, z, has_z,
    g_cl, u_cl, delta_cl, z_cl, window, chunk, ckpt, blocks, du, ddelta, dz, dA_part, dB_part, dC_part, dD_part,
    dbias_part,
):
    # *_cl: that tensor is given as (batch, L, dim), else as (batch, dim, L)
    batch, dim, seqlen = du.shape
    zero = du.dtype.type(0)  # typed: keeps the accumulators in the compute dtype instead of float64
    # None for B / C given per position: numba compiles a kernel per case, with no branch on it
    b_const = Bc is not None
    c_const = Cc is not None
    n_state = A.shape[1]
    n_chunks = ckpt.shape[1] + 1  # no checkpoint for the first chunk
    rows_max = min(chunk, seqlen)
    a = aligned_empty(u, (rows_max, n_state, width))
    x = aligned_empty(u, (rows_max, n_state, width))
    q = aligned_zeros(u, (rows_max, n_state, width))
    hl = aligned_empty(u, (rows_max + 1, n_state, width))  # row i holds h^L_{i-1}
    gr = aligned_empty(u, (rows_max, n_state, width))
    e_float = aligned_empty(u, (width,))  # the exponential's scratch
    dtl = aligned_empty(u, (rows_max, width))
    slope = aligned_empty(u, (rows_max, width))  # dΔ / d(delta)
    ul = aligned_empty(u, (rows_max, width))
    dtu = aligned_empty(u, (rows_max, width))
    dyl = aligned_empty(u, (rows_max, width))  # the gradient reaching y (before the gate)
    gz = aligned_zeros(u, (rows_max, width))  # dz / y
    dul = aligned_empty(u, (rows_max, width))  # dx·B summed over states, then du
    ddtl = aligned_empty(u, (rows_max, width))
    yl = aligned_empty(u, (rows_max, width))
    r = aligned_empty(u, (n_state, width))
    Al = aligned_empty(u, (n_state, width))
    bv = aligned_zeros(u, (n_state, width))  # B and C of the current position, per lane
    cv = aligned_zeros(u, (n_state, width))
    carry = aligned_zeros(u, (n_state, width))  # a_{t+1} dh^L_{t+1}: what reaches h^L_t from the right
    dA_acc = aligned_zeros(u, (n_state, width))
    dB_acc = aligned_zeros(u, (n_state, width))
    dC_acc = aligned_zeros(u, (n_state, width))
    dD_acc = aligned_zeros(u, (width,))
    dbias_acc = aligned_zeros(u, (width,))
    acc = aligned_empty(u, (width,))
    finished_last = False
    task = _fetch_add(counters, 0, 1)
    while task < n_tasks:  # take tasks until none is left (see _TaskPool)
        b, blk, d0, lanes, bb, bg, cb, cg = _task_layout(task, blocks, Bg, Cg, dim)
        d1 = d0 + lanes
        for buffer in (carry, dA_acc, dB_acc, dC_acc):
            fill_rows(buffer, n_state, width, zero)
        for c in range(width):
            dD_acc[c] = zero
            dbias_acc[c] = zero
        if lanes < width:  # lanes past this block's own go back to 0 (a wider block may have left values)
            for buffer in (gz, bv, cv):
                fill_rows(buffer, buffer.shape[0], width, zero)
            for i in range(rows_max):
                fill_rows(q[i], n_state, width, zero)
        D_blk = Dv[d0:d1]
        a_max = block_params(A, Bc, Cc, d0, lanes, Al, bv, cv, acc, True)
        if has_dlast:
            for c in range(lanes):
                row = dlast[b, d0 + c]
                for n in range(n_state):
                    carry[n, c] = row[n]
        for ck in range(n_chunks - 1, -1, -1):
            start = ck * chunk
            rows = min(chunk, seqlen - start)
            fast = chunk_inputs(
                u, u_cl, delta, delta_cl, b, d0, lanes, start, rows, bias, softplus, a_max, dtl, slope, True, ul, dtu,
                e_float, acc,
            )
            gate_grad_rows(g, g_cl, z, z_cl, has_z, b, d0, lanes, start, rows, dyl, gz, e_float)
            # Recompute the chunk from its checkpoint (windows never straddle chunks).
            decay_block(dtl, Al, rows, lanes, a, e_float, fast)
            _inputs_and_local_backward(dtu, a, bv, Bg, b_const, bb, bg, start, rows, window, lanes, x, q, r)
            if ck > 0:
                copy_rows(hl[0], 0, ckpt[b, ck - 1], d0, lanes)
            else:
                fill_rows(hl[0], n_state, lanes, zero)
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
                                gr[i, n, c] = (dyl[i, c] * (cv[n, c] if c_const else cs)
                                               + a[i - 1, n, c] * gr[i - 1, n, c])
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
            # the chain rule through x = Δ u B, the D skip, softplus and the gate
            for i in range(rows):
                for c in range(lanes):
                    dyc = dyl[i, c]
                    dul[i, c] = dul[i, c] * dtl[i, c] + D_blk[c] * dyc
                    ddtl[i, c] *= slope[i, c]
                    dbias_acc[c] += ddtl[i, c]
                    dD_acc[c] += dyc * ul[i, c]
                    gz[i, c] *= yl[i, c] + D_blk[c] * ul[i, c]
            store_block(du, b, d0, lanes, start, rows, dul)
            store_block(ddelta, b, d0, lanes, start, rows, ddtl)
            if has_z:
                store_block(dz, b, d0, lanes, start, rows, gz)
        dD_part[b, d0:d1] = dD_acc[:lanes]
        dbias_part[b, d0:d1] = dbias_acc[:lanes]
        copy_rows(dA_part[b], d0, dA_acc, 0, lanes)
        if b_const:
            copy_rows(dB_part[0, b, 0], d0, dB_acc, 0, lanes)
        if c_const:
            copy_rows(dC_part[0, b, 0], d0, dC_acc, 0, lanes)
        finished_last = _fetch_add(counters, 1, 1) == n_tasks - 1
        task = _fetch_add(counters, 0, 1)
    return finished_last


class _Call:
    """One scan call's tasks, shared by the calling thread and any helper that turns up in time."""

    def __init__(self, loop, n_tasks: int, args: tuple):
        self.loop, self.n_tasks, self.args = loop, n_tasks, args
        self.counters = np.zeros(2, dtype=np.int64)  # tasks taken, tasks finished
        self.finished = threading.Event()  # set by the thread that finishes the last task
        self.error = None

    def work(self) -> None:
        """Take tasks until none is left (the kernels run without the GIL)."""
        try:
            if self.loop(self.counters, self.n_tasks, *self.args):
                self.finished.set()
        except BaseException as exc:  # never leave the caller waiting for a task that will not finish
            self.error = exc
            self.finished.set()


class _TaskPool:
    """Helper threads for the CPU scan, and why it does not use a parallel loop (OpenMP, numba's prange).

    A parallel loop is fork-join: the calling thread waits at the end until every thread of the team
    has arrived, even one that never got a core. When another process keeps a core busy, a woken
    thread waited about 8 ms for it, whatever the size of the call. Here the calling thread starts on
    the tasks at once and helpers take tasks from the same counter as they come free; the caller waits
    only for tasks a helper has started, never for a helper that has not shown up (it will find no
    task left and go back to sleep). A helper that the OS deschedules holds up at most its one task.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list = []
        self._pid = os.getpid()
        atexit.register(self.close)

    def run(self, loop, n_tasks: int, helpers: int, args: tuple) -> None:
        call = _Call(loop, n_tasks, args)
        self._ensure(helpers)
        for _ in range(helpers):
            self._queue.put(call)
        call.work()
        if call.counters[1] < n_tasks or call.error is not None:  # a helper is still in a task
            call.finished.wait()
        if call.error is not None:
            raise call.error

    def _ensure(self, helpers: int) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child has none of its parent's threads
                self._queue, self._threads, self._pid = queue.SimpleQueue(), [], os.getpid()
            while len(self._threads) < helpers:
                thread = threading.Thread(target=self._serve, args=(self._queue,), name="lbmamba-scan", daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the helpers and wait for them (at exit). A helper that turned up late for a call that had
        already ended still enters the kernel once (it finds no task); doing that while the interpreter
        shuts down aborted the process ("PyThreadState_Get: ... the GIL is released")."""
        with self._lock:
            if self._pid != os.getpid():
                return
            threads, self._threads = self._threads, []
            for _ in threads:
                self._queue.put(None)
        for thread in threads:
            thread.join(timeout)

    @staticmethod
    def _serve(calls: queue.SimpleQueue) -> None:
        while (call := calls.get()) is not None:
            call.work()


_POOL = _TaskPool()


# ----------------------------------------------------------------------------------------------
# Torch-facing wrappers (the fused-backend interface of lbmamba.ops._fused).
# ----------------------------------------------------------------------------------------------


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor, dtype: torch.dtype, axes: tuple | None = None) -> np.ndarray:
    """t detached, in the compute dtype, axes permuted by `axes` (as numpy.transpose), as a C-contiguous
    array: copied only when it is not one already. Each step only when needed, and
    views taken in numpy: each of torch's no-op .to(), .transpose() and .contiguous() costs about a
    microsecond, and a short call makes a dozen of these."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    array = t.numpy()  # a view, strided like t
    if axes is not None:
        array = array.transpose(axes)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _bc_kernel_layout(t: torch.Tensor, dtype: torch.dtype):
    """(constant, grouped): constant (dim, N) as it is and None when B / C is grouped; grouped
    (batch, G, N, L) or variable (batch, N, L) as (batch, G, L, N), a small placeholder with the right
    rank when constant."""
    rank = t.dim()
    if rank == 2:
        return _np(t, dtype), _placeholder(4, dtype)
    if rank == 3:  # one group: the view taken in numpy, a third of the cost of torch's unsqueeze
        return None, _np(t, dtype, (0, 2, 1))[:, None]
    return None, _np(t, dtype, (0, 1, 3, 2))


@functools.lru_cache(maxsize=16)
def _placeholder(rank: int, dtype: torch.dtype) -> np.ndarray:
    """A one-element array of this rank, for an absent input."""
    return _shared_zeros((1,) * rank, dtype)


@functools.lru_cache(maxsize=64)
def _shared_zeros(shape: tuple, dtype: torch.dtype) -> np.ndarray:
    """Zeros standing in for an absent input (shared between calls: never written)."""
    return np.zeros(shape, dtype=_np_dtype(dtype))


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


#: (kernel, compute dtype) pairs that ran in this process; the first call of each may compile
_RAN: set = set()
#: a first call that takes longer than this is compiling: say so (a cached kernel loads in well under it)
COMPILE_NOTE_AFTER_S = 3.0


def _note_compiling() -> None:
    print("lbmamba: compiling the CPU scan kernels, once per machine (about a minute per dtype; numba caches them "
          "on disk)", file=sys.stderr, flush=True)


#: Below this many state updates (batch x dim x L x N, about 1 ns each on one core) a call runs on the
#: calling thread alone: waking a helper would cost more than it saves.
PARALLEL_MIN_WORK = 1 << 18


def scan_threads(batch: int, dim: int, seqlen: int, dstate: int) -> int:
    """Threads for one call: torch's count (what every other op of the model uses), or 1 for small calls."""
    return 1 if batch * dim * seqlen * dstate < PARALLEL_MIN_WORK else max(1, torch.get_num_threads())


def _run_tasks(loop, n_tasks: int, threads: int, *args, lone_counters_made_by_loop: bool = False) -> None:
    """Run tasks 0..n_tasks-1 of `loop` (_forward_at / _backward_kernel, which take tasks from a shared
    counter) on `threads` threads: the calling thread alone when one suffices, else with helpers from the
    pool. lone_counters_made_by_loop: on the calling thread alone, pass None for the counters (the loop
    makes them)."""
    helpers = min(threads, n_tasks) - 1
    key = (loop, args[-1].dtype)  # the last argument is always a compute-dtype array
    timer = None
    if key not in _RAN:  # nothing would tell the user why the first call takes a minute
        timer = threading.Timer(COMPILE_NOTE_AFTER_S, _note_compiling)
        timer.daemon = True
        timer.start()
    try:
        if helpers < 1:
            loop(None if lone_counters_made_by_loop else np.zeros(2, dtype=np.int64), n_tasks, *args)
        else:
            if key not in _RAN:  # compile on this thread first: helpers would each wait for the compiler
                loop(np.full(2, n_tasks, dtype=np.int64), n_tasks, *args)
            _POOL.run(loop, n_tasks, helpers, args)
        _RAN.add(key)
    finally:
        if timer is not None:
            timer.cancel()


def _kernel_layout(t, dtype: torch.dtype):
    """(array, channels_last): a (batch, dim, L) tensor as the kernels read it, in the compute dtype:
    as (batch, L, dim) when channels are its fastest axis (the Mamba mixer's delta and z), else as
    (batch, dim, L); contiguous, copied only if it is not already. The kernels transpose blocks as
    they load them, so either layout is read without a transposed copy of the whole tensor. None (no
    z): a placeholder of the right rank."""
    if t is None:
        return _placeholder(3, dtype), False
    channels_last, convert = _sequence_layout(t, dtype)  # the forward's rule, so both read alike
    if convert:
        t = _as_compute(t, dtype, channels_last)
    elif channels_last:
        t = t.transpose(1, 2)
    return _np(t, dtype), channels_last


def _per_channel(t, dim: int, dtype: torch.dtype) -> np.ndarray:
    """D or delta_bias as a (dim,) array; zeros when absent."""
    return _np(t, dtype) if t is not None else _shared_zeros((dim,), dtype)


def _tasks(batch: int, dim: int, Bg: np.ndarray, Cg: np.ndarray, threads: int):
    width = block_width(batch, dim, threads)
    return width, _blocks(dim, width, Bg.shape[1], Cg.shape[1])


def _as_compute(t: torch.Tensor, ct: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """t in the compute dtype, C-contiguous; a (batch, dim, L) tensor as (batch, L, dim) when channels_last."""
    if channels_last:
        t = t.transpose(1, 2)
    return torch.empty(t.shape, dtype=ct).copy_(t)  # one copy (t.to() would keep t if only its strides differ)


def _sequence_layout(t, ct: torch.dtype) -> tuple:
    """(channels_last, convert) for a (batch, dim, L) input of the kernels: read as (batch, L, dim)
    when channels are its fastest axis (the Mamba mixer's delta and z), else as (batch, dim, L); converted
    (_as_compute) unless it is already contiguous that way in the compute dtype."""
    if t is None:
        return False, False
    channels_last = t.shape[1] > 1 and t.stride(1) == 1
    dense = (t.transpose(1, 2) if channels_last else t).is_contiguous()
    return channels_last, not dense or t.dtype != ct


def _needs_compute_copy(t, ct: torch.dtype) -> bool:
    return t is not None and (t.dtype != ct or not t.is_contiguous())


def _grouped_view(t, ct: torch.dtype, convert: bool) -> tuple:
    """(shape, strides in bytes) of a grouped (batch, G, N, L) or variable (batch, N, L) B / C as the kernel
    reads it: (batch, G, L, N), any strides (a slice of the mixer's projection is read in place)."""
    strides = torch.empty(t.shape, dtype=ct).stride() if convert else t.stride()
    itemsize = torch.finfo(ct).bits // 8
    if t.dim() == 3:
        (batch, dstate, seqlen), (sb, sn, sl) = t.shape, strides
        return (batch, 1, seqlen, dstate), (sb * itemsize, 0, sl * itemsize, sn * itemsize)
    (batch, groups, dstate, seqlen), (sb, sg, sn, sl) = t.shape, strides
    return (batch, groups, seqlen, dstate), (sb * itemsize, sg * itemsize, sl * itemsize, sn * itemsize)


class ForwardPlan:
    """A forward call worked out once for its arguments' signature (shapes, strides, dtypes, which inputs
    are given) and flags: the layouts the kernel reads, the conversions needed, placeholders for absent
    inputs, the task blocks per thread count. Calling it on tensors of that signature reads only their
    data addresses: at short lengths this preparation, done per call, cost more than the kernel."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, window, keep_last_state=True, keep_checkpoints=True):
        self.ct = ct = _compute_dtype(u)
        self.out_dtype = u.dtype
        self.shape = batch, dim, seqlen = tuple(u.shape)
        self.dstate = dstate = A.shape[1]
        (u_cl, convert_u), (delta_cl, convert_delta), (z_cl, convert_z) = (
            _sequence_layout(t, ct) for t in (u, delta, z))
        self.layouts = (u_cl, delta_cl, z_cl, False, False, False, False, False)
        self.converts = (convert_u, convert_delta, convert_z) + tuple(
            _needs_compute_copy(t, ct) for t in (A, B, C, D, delta_bias))
        self.any_convert = any(self.converts)
        self.B_const, self.C_const = B.dim() == 2, C.dim() == 2
        self.placeholder = _placeholder(4, ct)
        self.placeholder_at = self.placeholder.ctypes.data
        self.zeros = _shared_zeros((dim,), ct)  # D / delta_bias when absent
        self.zeros_at = self.zeros.ctypes.data
        constant_view = ((1, 1, 1, 1), (0, 0, 0, 0))
        B_view = constant_view if self.B_const else _grouped_view(B, ct, self.converts[4])
        C_view = constant_view if self.C_const else _grouped_view(C, ct, self.converts[5])
        self.group_counts = (B_view[0][1], C_view[0][1])
        self.keep_last, self.keep_ckpt = bool(keep_last_state), bool(keep_checkpoints)
        self.ckpt_shape = checkpoint_shape(batch, dim, seqlen, dstate, window)
        sweep = int(window) if seqlen > 1 else 1  # one position: h^R = x, so LB is the vanilla scan
        like = _placeholder(1, ct)  # the compute dtype, for the kernel's typing (and _run_tasks' key)
        #: _forward_at's arguments after the per-call ones
        self.fixed_args = (batch, dim, seqlen, dstate, *B_view, *C_view, self.ckpt_shape[1], u_cl, delta_cl, z_cl,
                           z is not None, sweep, chunk_length(sweep), self.keep_last, self.keep_ckpt, like)
        self._tasks: dict = {}
        self.compiled = False  # whether a call of this plan has run (so the kernel is compiled or loaded)

    def tasks(self, threads: int) -> tuple:
        """(number of tasks, block width, blocks) on `threads` threads."""
        answer = self._tasks.get(threads)
        if answer is None:
            batch, dim, _ = self.shape
            width = block_width(batch, dim, threads)
            blocks = _blocks(dim, width, *self.group_counts)
            answer = self._tasks[threads] = batch * len(blocks), width, blocks
        return answer

    def __call__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        """(out in u's dtype, last state or None, checkpoints or None), as `forward`."""
        if self.any_convert:  # the copies stay referenced by these names until the kernel has run
            u, delta, z, A, B, C, D, delta_bias = (
                _as_compute(t, self.ct, cl) if convert else t
                for t, convert, cl in zip((u, delta, z, A, B, C, D, delta_bias), self.converts, self.layouts))
        ct = self.ct
        batch, dim, seqlen = self.shape
        out = torch.empty(batch, dim, seqlen, dtype=ct)  # sizes as arguments: a third faster than a tuple
        last = torch.empty(batch, dim, self.dstate, dtype=ct) if self.keep_last else None
        ckpt = torch.empty(*self.ckpt_shape, dtype=ct) if self.keep_ckpt else None
        threads = scan_threads(batch, dim, seqlen, self.dstate)
        n_tasks, width, blocks = self.tasks(threads)
        at, zeros_at = self.placeholder_at, self.zeros_at  # absent inputs (never read) and outputs (never written)
        B_at, C_at = B.data_ptr(), C.data_ptr()
        args = (
            width, blocks, u.data_ptr(), delta.data_ptr(), at if z is None else z.data_ptr(), A.data_ptr(),
            zeros_at if D is None else D.data_ptr(), zeros_at if delta_bias is None else delta_bias.data_ptr(),
            B_at if self.B_const else None, at if self.B_const else B_at,
            C_at if self.C_const else None, at if self.C_const else C_at,
            out.data_ptr(), at if last is None else last.data_ptr(), at if ckpt is None else ckpt.data_ptr(),
            bool(delta_softplus), *self.fixed_args,
        )
        if threads == 1 and self.compiled:  # the short call: straight into the kernel
            _forward_at(None, n_tasks, *args)
        else:
            _run_tasks(_forward_at, n_tasks, threads, *args, lone_counters_made_by_loop=True)
            self.compiled = True
        return (out if self.out_dtype == ct else out.to(self.out_dtype)), last, ckpt


#: ForwardPlans by signature, for calls through the registered op (the direct path keeps its own)
_PLANS: dict = {}
_PLANS_MAX = 4096


def forward_plan(u, delta, A, B, C, D, z, delta_bias, window, keep_last_state=True, keep_checkpoints=True):
    """A ForwardPlan for arguments like these (see the fused-backend interface in lbmamba.ops._fused)."""
    return ForwardPlan(u, delta, A, B, C, D, z, delta_bias, window, keep_last_state, keep_checkpoints)


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, keep_last_state=True, keep_checkpoints=True):
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    key = (window, keep_last_state, keep_checkpoints) + tuple(
        None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = ForwardPlan(*tensors, window, keep_last_state, keep_checkpoints)
    return plan(*tensors, delta_softplus)


def backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, checkpoints):
    ct = _compute_dtype(u)
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    Bc, Bg = _bc_kernel_layout(B, ct)
    Cc, Cg = _bc_kernel_layout(C, ct)
    threads = scan_threads(batch, dim, seqlen, dstate)
    width, blocks = _tasks(batch, dim, Bg, Cg, threads)

    def partial(is_const, grouped):
        # constant: one slot per batch element (lanes are channels); grouped: one per channel block
        if is_const:
            return torch.empty((1, batch, 1, dstate, dim), dtype=ct)
        return torch.zeros((len(blocks),) + grouped.shape, dtype=ct)

    du = torch.empty((batch, dim, seqlen), dtype=ct)
    ddelta = torch.empty_like(du)
    dz = torch.empty_like(du) if z is not None else torch.empty((1, 1, 1), dtype=ct)
    dA_part = torch.empty((batch, dstate, dim), dtype=ct)
    dB_part, dC_part = partial(Bc is not None, Bg), partial(Cc is not None, Cg)
    dD_part = torch.empty((batch, dim), dtype=ct)
    dbias_part = torch.empty((batch, dim), dtype=ct)
    has_dlast = dlast_state is not None
    dlast = _np(dlast_state, ct) if has_dlast else _placeholder(3, ct)
    (g_k, g_cl), (u_k, u_cl), (delta_k, delta_cl), (z_k, z_cl) = (_kernel_layout(t, ct) for t in (dout, u, delta, z))
    _run_tasks(
        _backward_kernel, batch * len(blocks), threads, width,
        g_k, dlast, has_dlast, u_k, delta_k, _per_channel(delta_bias, dim, ct), bool(delta_softplus), _np(A, ct),
        Bc, Bg, Cc, Cg, _per_channel(D, dim, ct), z_k, z is not None, g_cl, u_cl, delta_cl, z_cl, int(window),
        chunk_length(window), _np(checkpoints, ct), blocks, du.numpy(), ddelta.numpy(), dz.numpy(),
        dA_part.numpy(), dB_part.numpy(), dC_part.numpy(), dD_part.numpy(), dbias_part.numpy(),
    )
    dD, dbias = dD_part.sum(0), dbias_part.sum(0)
    return (
        du.to(u.dtype),
        ddelta.to(delta.dtype),
        dA_part.sum(0).t().to(A.dtype),
        _bc_grad(dB_part, B),
        _bc_grad(dC_part, C),
        dD.to(D.dtype) if D is not None else dD.float(),
        dz.to(z.dtype) if z is not None else u.new_empty((0,)),
        dbias.to(delta_bias.dtype) if delta_bias is not None else dbias.float(),
    )


def _bc_grad(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum the partial buffers of B or C back into the caller's layout and dtype."""
    if like.dim() == 2:  # constant: (1, batch, 1, N, dim) -> (dim, N)
        return part.sum((0, 1))[0].t().to(like.dtype)
    return part.sum(0).transpose(2, 3).to(like.dtype)  # (batch, G, L, N) -> (batch, G, N, L)
