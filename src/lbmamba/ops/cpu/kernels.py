"""The cpu backend's numba kernels: the forward (_forward_at, with _forward_kernel inlined into it), the
backward (_backward_kernel) and the pieces they are made of (vectorised exponentials, block loads and
stores, aligned scratch, the atomic task counter), with the sizes that lay out their work (channel blocks,
chunks, tiles, checkpoints). How the work is laid out: see the package's docstring (lbmamba.ops.cpu).

Every cache=True function of the backend is in this one file on purpose: numba's on-disk cache checks only
the source file of the function it compiled (its stamp and hash), not the files of the functions inlined
into it, so a kernel in another file would go on loading a stale copy of a helper edited here.

Importing this module first lets numba vectorise at 512 bits on AVX-512 CPUs (_prefer_512_bit_vectors):
it must run before numba compiles anything.
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
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
    chunk, blocks, keep_last, keep_ckpt, out, last, ckpt, prev, has_prev,
):
    # *_cl: that tensor is given as (batch, L, dim), else as (batch, dim, L)
    # keep_last / keep_ckpt: write the last state / the checkpoints (else last / ckpt are placeholders)
    # has_prev: h^L before position 0 is prev (batch, dim, N), else 0 (prev is a placeholder)
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
        # one position without a carried state needs no decay (A is not even read)
        a_max = block_params(A, Bc, Cc, d0, lanes, Al, Bl, Cl, acc, seqlen > 1 or has_prev)
        if has_prev:  # h^L enters the first position from prev (lanes past the block's own: 0)
            fill_rows(h, n_state, width, zero)
            copy_transposed(h, prev[b], d0, lanes)
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
                        if start + ts == 0 and not has_prev:  # h^L_{-1} = 0: h^L_0 = x_0, y_0 = C_0 h^R_0
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
                        if start + ts == 0 and not has_prev:  # h is 0 before the first position: no decay
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
    last_at, ckpt_at, softplus, prev_at, has_prev, batch, dim, seqlen, dstate, Bg_shape, Bg_strides, Cg_shape,
    Cg_strides, ckpt_count, u_cl, delta_cl, z_cl, has_z, window, chunk, keep_last, keep_ckpt, like,
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
        _view(prev_at, (batch, dim, dstate) if has_prev else (1, 1, 1), like), has_prev,
    )


# ----------------------------------------------------------------------------------------------
# Backward: from dy = dL/dy_t to du (through x only), dΔ, dA, dB, dC; also y itself when asked.
# ----------------------------------------------------------------------------------------------


@njit(**_JIT)
def _backward_kernel(
    counters, n_tasks, width, g, dlast, has_dlast, u, delta, bias, softplus, A, Bc, Bg, Cc, Cg, Dv, z, has_z,
    g_cl, u_cl, delta_cl, z_cl, window, chunk, ckpt, blocks, du, ddelta, dz, dA_part, dB_part, dC_part, dD_part,
    dbias_part, prev, has_prev, dprev,
):
    # has_prev: h^L before position 0 is prev (batch, dim, N) and its gradient goes to dprev (else placeholders)
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
            elif has_prev:
                copy_transposed(hl[0], prev[b], d0, lanes)
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
        if has_prev:  # carry = a_0 dh^L_0: what reaches h^L_{-1}
            for c in range(lanes):
                row = dprev[b, d0 + c]
                for n in range(n_state):
                    row[n] = carry[n, c]
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
