"""The "triton" backend: the LB selective scan as fused Triton kernels, forward and backward.

It implements the fused-backend interface documented in `_fused.py` and runs on CUDA GPUs, or on
the CPU through Triton's interpreter when TRITON_INTERPRET=1 is set before this module is imported.

Design (one program per (block of BLOCK_D channels, batch element); grid (dim / BLOCK_D, batch)):

* The sequence is cut into chunks of `chunk_len` positions, held as (T, BLOCK_N, BLOCK_D) register
  tiles (T = CHUNK_LEN, or half of it at d_state outside 9..16: `tile_len`; BLOCK_N = N padded to a
  power of two, masked). u, delta, z
  and B, C are loaded once per chunk as (T, BLOCK_D) / (T, BLOCK_N) tiles, contiguous along the
  sequence (the forward loads chunk k + 1 while it computes chunk k), and every per-position step
  is fused in registers; no (batch, dim, L, N) tensor exists.
* The threads of a program cover its (state, channel) pairs and each holds the whole chunk of its
  pairs, so the recurrences are unrolled sequential loops in registers: h^L (carried from chunk to
  chunk) and the window-local h^R, a reverse recurrence with decay a' = a except 0 at the last
  position of each window, which is exactly its restart. window = 1 skips h^R (h = h^L).
* chunk_len is a multiple of the window whenever window <= T, so windows never straddle
  chunks and h^R needs nothing from the next chunk. Longer windows straddle chunks; they stay exact
  through an extra pass that computes the h^R entering each chunk from the right (forward) and the
  dh^R entering each chunk from the left (backward).
* The forward saves h^L at the start of every CHECKPOINT_EVERY-th chunk (the checkpoints,
  (batch, dim, num_checkpoints, N)). The backward walks the chunks right to left, one run of
  CHECKPOINT_EVERY chunks at a time: it recomputes the run's chunk-start states from its
  checkpoint, then per chunk a, x, h^L, h^R, and runs the adjoint recurrences: dh^L right to left,
  carried across chunks, and dh^R left to right, restarted at each window start.
* Gradients of the per-channel parameters (A, D, delta_bias, constant B/C) are summed over the
  chunks in registers and written per batch element, then summed over the batch with torch
  (deterministic). Gradients of grouped B/C are summed over the program's channels in registers and
  added with `tl.atomic_add` into an fp32 (batch, G, N, L) buffer.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ._checks import as_grouped

#: Positions per register tile (a power of two). Windows up to this size never straddle chunks, and
#: the checkpoints cost N / CHUNK_LEN floats per (batch, channel, position). Tests lower it so that
#: short sequences cross chunks.
CHUNK_LEN = 16
#: Chunks per checkpoint (a power of two): the forward saves h^L at the start of every K-th chunk,
#: N / (K * CHUNK_LEN) floats per (batch, channel, position), and the backward recomputes the
#: chunk-start states of each run of K chunks before walking it (an extra forward pass over
#: (K - 1) / K of the chunks, about 15% of the backward's instructions at K = 8). K = 1 saves a
#: state per chunk and recomputes nothing.
CHECKPOINT_EVERY = 8
#: Warps per program, and (channel, state) pairs per thread of a full block in the forward and the
#: backward kernels: BLOCK_D * BLOCK_N = 32 * NUM_WARPS * pairs, so that the (state, channel) axes fill
#: the threads and every thread holds the whole sequence axis of its pairs. The backward keeps more
#: tiles alive, so it gets fewer pairs per thread (more would spill registers). `_Launch` adjusts both
#: per BLOCK_N, where ptxas measured spills (benchmarks/triton_static.py; the reasons are there).
NUM_WARPS = 4
FWD_PAIRS_PER_THREAD = 2
BWD_PAIRS_PER_THREAD = 1
#: The register limit given to ptxas for one-warp programs (`_Launch.blocks`), the most a thread can have.
MAX_REGISTERS = 255
#: The largest d_state the launch rule covers: a program holds all of a channel's states, and at BLOCK_N
#: 512 even one channel per program needs two (state, channel) pairs per thread in the backward, which
#: spills. The dispatcher sends larger d_state to the `torch` backend.
MAX_DSTATE = 256
#: When True, outputs are allocated filled with NaN instead of uninitialised, so a check can prove
#: that the kernels write every element they return (benchmarks/gpu_check.py sets it).
POISON_OUTPUTS = False

# Kernels are decorated at import, and triton.jit picks the interpreter from the environment then.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(v) = exp2(v * log2(e))


# ----------------------------------------------------------------------------------------------
# Kernel helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _recurrence(decay, inp, carry, idx, T: tl.constexpr, REVERSE: tl.constexpr, DECAY_AFTER: tl.constexpr):
    """Runs s = decay_i * s + inp_i over the rows (positions) of (T, BLOCK_N, BLOCK_D) tiles,
    top-down (or bottom-up with REVERSE), starting from `carry`; returns every s_i and the final s.

    With DECAY_AFTER a row's decay is applied after its value is taken (s_i = inp_i + s, then
    s = decay_i * s_i): the adjoint recurrences, whose decay is the neighbouring position's.
    The loop is unrolled, and each thread holds the whole sequence axis of its (channel, state)
    pairs, so the row selections below compile to register picks: no shuffles, no shifted loads.
    (Row picks are written inline: nested jit calls are costly under the interpreter. They pad with
    -0.0, the exact identity of addition, so that the compiler folds the sum to the picked value;
    it is built from its bits because a -0.0 literal loses its sign on the way to the compiler.)
    """
    neg_zero = tl.full([1], -2147483648, tl.int32).to(tl.float32, bitcast=True)[:, None, None]
    out = tl.zeros_like(inp)
    for step in tl.static_range(T):
        i = T - 1 - step if REVERSE else step
        row = (idx == i)[:, None, None]
        inp_i = tl.sum(tl.where(row, inp, neg_zero), axis=0)
        decay_i = tl.sum(tl.where(row, decay, neg_zero), axis=0)
        if DECAY_AFTER:
            s_i = inp_i + carry
            carry = decay_i * s_i
        else:
            s_i = decay_i * carry + inp_i
            carry = s_i
        out = tl.where(row, s_i[None, :, :], out)
    return out, carry


@triton.jit
def _sigmoid(v):
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _program(dim, L, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Indices of this program's channels d (BLOCK_D) and states n (BLOCK_N), and its offsets."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit offsets: batch * dim * L may exceed 2**31
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < dim
    nd_mask = (n < N)[:, None] & dmask[None, :]
    nd_offs = d[None, :] * N + n[:, None]  # into (dim, N) parameters; (BLOCK_N, BLOCK_D)
    row = (b * dim + d) * L  # each channel's sequence in u, delta, z, out
    return pid_d, b, d, n, dmask, nd_mask, nd_offs, row


@triton.jit
def _state_offs(b, dim, d, n, N, count):
    """Offsets of entry 0 of this program's states in a (batch, dim, count, N) array (entry i: + i * N)."""
    return (b * dim + d[None, :]) * count * N + n[:, None]


@triton.jit
def _chunk(k, j, row, dmask, L, CHUNK: tl.constexpr):
    """Positions t of chunk k (T rows, the first CHUNK of them in the chunk) and their offsets.

    Padding rows (past the chunk or the sequence) load Δ = 0 and u = 0, hence a = 1 and x = 0:
    they pass every recurrence's state through unchanged.
    """
    t = k * CHUNK + j
    valid = (j < CHUNK) & (t < L)
    m2 = valid[:, None] & dmask[None, :]
    offs = t[:, None] + row[None, :]  # (T, BLOCK_D)
    return t, valid, m2, offs


@triton.jit
def _load_chunk(
    u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b_base, c_base, k, j, row, n, dmask, N, L,
    CHUNK: tl.constexpr, LOAD_Z: tl.constexpr, LOAD_B: tl.constexpr, LOAD_C: tl.constexpr,
):
    """The sequence tiles of chunk k in fp32: u, delta, z (T, BLOCK_D) and variable B, C
    (T, BLOCK_N); z, B and C are zeros unless asked for (absent, or constant)."""
    t, valid, m2, offs = _chunk(k, j, row, dmask, L, CHUNK)
    u = tl.load(u_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    z = tl.zeros_like(u)
    if LOAD_Z:
        z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    bc_offs = n[None, :] * L + t[:, None]
    bc_mask = valid[:, None] & (n < N)[None, :]
    Bv = tl.zeros(bc_offs.shape, tl.float32)
    if LOAD_B:
        Bv = tl.load(B_ptr + b_base + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)
    Cv = tl.zeros(bc_offs.shape, tl.float32)
    if LOAD_C:
        Cv = tl.load(C_ptr + c_base + bc_offs, mask=bc_mask, other=0.0).to(tl.float32)
    return u, delta, z, Bv, Cv


@triton.jit
def _delta(delta, bias, mask, SOFTPLUS: tl.constexpr):
    """Δ = [softplus](delta + delta_bias) (0 where masked) and dΔ/d(delta), from a loaded tile."""
    v = delta + bias[None, :]
    if SOFTPLUS:
        e = tl.exp(-tl.abs(v))
        # log1p(e) to full precision without a log1p primitive (log(1 + e) loses the low bits of e):
        # log(w) * e / (w - 1) with w = 1 + e, where w - 1 is exact (Goldberg, 1991).
        w = 1.0 + e
        log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
        # torch.nn.functional.softplus: identity above the threshold 20.
        dt = tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p_e)
        ddt = tl.where(v > 20.0, 1.0, tl.where(v >= 0, 1.0 / w, e / w))
    else:
        dt = v
        ddt = tl.full(v.shape, 1.0, tl.float32)
    return tl.where(mask, dt, 0.0), ddt


@triton.jit
def _bc_tile(loaded, const_tile, CONST: tl.constexpr):
    """B or C as (T, BLOCK_N, BLOCK_D): the constant (BLOCK_N, BLOCK_D) tile, or the loaded (T, BLOCK_N)
    one. Both branches have one shape, as the compiler requires."""
    shape: tl.constexpr = (loaded.shape[0], const_tile.shape[0], const_tile.shape[1])
    if CONST:
        return tl.broadcast_to(const_tile[None, :, :], shape)
    return tl.broadcast_to(loaded[:, :, None], shape)


@triton.jit
def _load_const(ptr, nd_offs, nd_mask, CONST: tl.constexpr):
    """The program's (BLOCK_N, BLOCK_D) tile of a constant (dim, N) B or C (zeros when not constant)."""
    tile = tl.zeros(nd_offs.shape, tl.float32)
    if CONST:
        tile = tl.load(ptr + nd_offs, mask=nd_mask, other=0.0)
    return tile


@triton.jit
def _group_base(pid_d, b, dim, N, L, groups, BLOCK_D: tl.constexpr):
    """Offset of the (N, L) slab of grouped B/C that the program's channels (one group) use."""
    g = (pid_d * BLOCK_D) // (dim // groups)
    return (b * groups + g) * N * L


@triton.jit
def _right_decay(a, j, t, WINDOW: tl.constexpr, STRADDLE: tl.constexpr):
    """a' = a, but 0 at the last position of every window, where h^R restarts.

    The sequence end needs no test: padding rows after it have x = 0, so h^R enters it as 0. Unless
    windows straddle chunks, chunks start at multiples of WINDOW, so the in-chunk index j (a
    compile-time range) decides and the selection folds away.
    """
    pos = t if STRADDLE else j
    return tl.where(((pos + 1) % WINDOW == 0)[:, None, None], 0.0, a)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, ckpt_ptr, rcarry_ptr, prev_ptr,
    dim, L, N, n_chunks, n_ckpt, b_groups, c_groups,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_CONST: tl.constexpr, C_CONST: tl.constexpr, WINDOW: tl.constexpr, STRADDLE: tl.constexpr,
    CKPT_EVERY: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    pid_d, b, d, n, dmask, nd_mask, nd_offs, row = _program(dim, L, N, BLOCK_D, BLOCK_N)
    ckpt_offs = _state_offs(b, dim, d, n, N, n_ckpt)
    carry_offs = _state_offs(b, dim, d, n, N, n_chunks)
    j = tl.arange(0, T)
    A2 = tl.load(A_ptr + nd_offs, mask=nd_mask, other=0.0) * _LOG2E
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros([BLOCK_D], tl.float32)
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0) if HAS_D else tl.zeros([BLOCK_D], tl.float32)
    Bc = _load_const(B_ptr, nd_offs, nd_mask, B_CONST)
    Cc = _load_const(C_ptr, nd_offs, nd_mask, C_CONST)
    b_base = _group_base(pid_d, b, dim, N, L, b_groups, BLOCK_D)
    c_base = _group_base(pid_d, b, dim, N, L, c_groups, BLOCK_D)

    h = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # h^L before the current chunk
    if HAS_PREV:  # h^L entering the first position (the first checkpoint, so the backward starts from it too)
        h = tl.load(prev_ptr + b * dim * N + nd_offs, mask=nd_mask, other=0.0)
    next_u, next_delta, next_z, next_B, next_C = _load_chunk(
        u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b_base, c_base, 0, j, row, n, dmask, N, L,
        CHUNK, HAS_Z, not B_CONST, not C_CONST,
    )  # fmt: skip
    for k in range(n_chunks):
        u, delta, zv, Bv, Cv = next_u, next_delta, next_z, next_B, next_C
        # Prefetch the next chunk (masked off past the end), so that its loads overlap this chunk's arithmetic.
        next_u, next_delta, next_z, next_B, next_C = _load_chunk(
            u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b_base, c_base, k + 1, j, row, n, dmask, N, L,
            CHUNK, HAS_Z, not B_CONST, not C_CONST,
        )  # fmt: skip
        ckpt_mask = nd_mask & (k % CKPT_EVERY == 0)
        tl.store(ckpt_ptr + ckpt_offs + (k // CKPT_EVERY) * N, h, mask=ckpt_mask)
        t, valid, m2, offs = _chunk(k, j, row, dmask, L, CHUNK)
        dt, _ = _delta(delta, bias, m2, SOFTPLUS)
        a = tl.exp2(dt[:, None, :] * A2[None, :, :])
        x = (dt * u)[:, None, :] * _bc_tile(Bv, Bc, B_CONST)
        hs, h = _recurrence(a, x, h, j, T, False, False)  # h^L, carried across chunks
        if WINDOW > 1:
            hr_in = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            if STRADDLE:  # the part of the window beyond this chunk, from the right-carry pass
                hr_in = tl.load(rcarry_ptr + carry_offs + k * N, mask=nd_mask, other=0.0)
            hr, _ = _recurrence(_right_decay(a, j, t, WINDOW, STRADDLE), x, hr_in, j, T, True, False)
            hs += hr - x  # h = h^L + h^R - x

        y = tl.sum(hs * _bc_tile(Cv, Cc, C_CONST), axis=1) + Dv[None, :] * u
        if HAS_Z:
            y *= zv * _sigmoid(zv)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(last_ptr + b * dim * N + nd_offs, h, mask=nd_mask)


@triton.jit
def _fwd_right_carry_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, rcarry_ptr,
    dim, L, N, n_chunks, b_groups,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, B_CONST: tl.constexpr, WINDOW: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    """Windows longer than a chunk: h^R entering each chunk from the right, a right-to-left pass."""
    pid_d, b, d, n, dmask, nd_mask, nd_offs, row = _program(dim, L, N, BLOCK_D, BLOCK_N)
    j = tl.arange(0, T)
    A2 = tl.load(A_ptr + nd_offs, mask=nd_mask, other=0.0) * _LOG2E
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros([BLOCK_D], tl.float32)
    Bc = _load_const(B_ptr, nd_offs, nd_mask, B_CONST)
    b_base = _group_base(pid_d, b, dim, N, L, b_groups, BLOCK_D)
    carry_offs = _state_offs(b, dim, d, n, N, n_chunks)

    carry = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        tl.store(rcarry_ptr + carry_offs + k * N, carry, mask=nd_mask)
        t, valid, m2, offs = _chunk(k, j, row, dmask, L, CHUNK)
        u, delta, _, Bv, _ = _load_chunk(
            u_ptr, delta_ptr, u_ptr, B_ptr, B_ptr, b_base, b_base, k, j, row, n, dmask, N, L,
            CHUNK, False, not B_CONST, False,
        )  # fmt: skip
        dt, _ = _delta(delta, bias, m2, SOFTPLUS)
        a = tl.exp2(dt[:, None, :] * A2[None, :, :])
        x = (dt * u)[:, None, :] * _bc_tile(Bv, Bc, B_CONST)
        # h^R at the chunk's first position: what enters the previous chunk.
        _, carry = _recurrence(_right_decay(a, j, t, WINDOW, True), x, carry, j, T, True, False)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_kernel(
    dout_ptr, dlast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, lcarry_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dprev_ptr,
    dim, L, N, n_chunks, n_ckpt, b_groups, c_groups,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_CONST: tl.constexpr, C_CONST: tl.constexpr, WINDOW: tl.constexpr, STRADDLE: tl.constexpr,
    CKPT_EVERY: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    """Chunks right to left, in runs of CKPT_EVERY chunks that share a checkpoint. dA, dD,
    ddelta_bias and constant dB/dC are written per batch element ((batch, dim, N) / (batch, dim));
    grouped dB/dC are atomically added to (batch, G, N, L)."""
    pid_d, b, d, n, dmask, nd_mask, nd_offs, row = _program(dim, L, N, BLOCK_D, BLOCK_N)
    ckpt_offs = _state_offs(b, dim, d, n, N, n_ckpt)
    carry_offs = _state_offs(b, dim, d, n, N, n_chunks)
    j = tl.arange(0, T)
    run_idx = tl.arange(0, CKPT_EVERY)
    A = tl.load(A_ptr + nd_offs, mask=nd_mask, other=0.0)
    A2 = A * _LOG2E
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros([BLOCK_D], tl.float32)
    Dv = tl.load(D_ptr + d, mask=dmask, other=0.0) if HAS_D else tl.zeros([BLOCK_D], tl.float32)
    Bc = _load_const(B_ptr, nd_offs, nd_mask, B_CONST)
    Cc = _load_const(C_ptr, nd_offs, nd_mask, C_CONST)
    b_base = _group_base(pid_d, b, dim, N, L, b_groups, BLOCK_D)
    c_base = _group_base(pid_d, b, dim, N, L, c_groups, BLOCK_D)

    dhl = tl.load(dlast_ptr + b * dim * N + nd_offs, mask=nd_mask, other=0.0)  # dh^L entering from the right
    hr_next = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # h^R entering from the right
    dA_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dB_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dC_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dD_acc = tl.zeros([BLOCK_D], tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], tl.float32)
    for rr in range(n_ckpt):
        run = n_ckpt - 1 - rr
        first = run * CKPT_EVERY
        count = tl.minimum(n_chunks - first, CKPT_EVERY)
        # h^L at the start of each chunk of the run: the checkpoint, then a forward over the run.
        h = tl.load(ckpt_ptr + ckpt_offs + run * N, mask=nd_mask, other=0.0)
        starts = tl.broadcast_to(h[None, :, :], (CKPT_EVERY, BLOCK_N, BLOCK_D))
        for c in range(1, count):
            t, valid, m2, offs = _chunk(first + c - 1, j, row, dmask, L, CHUNK)
            u, delta, _, Bv, _ = _load_chunk(
                u_ptr, delta_ptr, u_ptr, B_ptr, B_ptr, b_base, b_base, first + c - 1, j, row, n, dmask, N, L,
                CHUNK, False, not B_CONST, False,
            )  # fmt: skip
            dt, _ = _delta(delta, bias, m2, SOFTPLUS)
            x = (dt * u)[:, None, :] * _bc_tile(Bv, Bc, B_CONST)
            _, h = _recurrence(tl.exp2(dt[:, None, :] * A2[None, :, :]), x, h, j, T, False, False)
            starts = tl.where((run_idx == c)[:, None, None], h[None, :, :], starts)

        for cc in range(count):
            c = count - 1 - cc
            k = first + c
            t, valid, m2, offs = _chunk(k, j, row, dmask, L, CHUNK)
            u, delta, zv, Bv, Cv = _load_chunk(
                u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b_base, c_base, k, j, row, n, dmask, N, L,
                CHUNK, HAS_Z, not B_CONST, not C_CONST,
            )  # fmt: skip
            g = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(tl.float32)

            # Recompute the chunk's forward: a, x, h^L from the chunk's start state, h^R, and y.
            Bt = _bc_tile(Bv, Bc, B_CONST)
            Ct = _bc_tile(Cv, Cc, C_CONST)
            dt, ddt_ddelta = _delta(delta, bias, m2, SOFTPLUS)
            a = tl.exp2(dt[:, None, :] * A2[None, :, :])
            x = (dt * u)[:, None, :] * Bt
            h0 = tl.sum(tl.where((run_idx == c)[:, None, None], starts, 0.0), axis=0)  # h^L before the chunk
            hl, _ = _recurrence(a, x, h0, j, T, False, False)
            if WINDOW > 1:
                a_right = _right_decay(a, j, t, WINDOW, STRADDLE)
                # Without straddling, a' = 0 at the chunk's end stops hr_next from entering.
                hr, hr_next = _recurrence(a_right, x, hr_next, j, T, True, False)
                hs = hl + hr - x
            else:
                hs = hl

            if HAS_Z:
                sz = _sigmoid(zv)
                y = tl.sum(hs * Ct, axis=1) + Dv[None, :] * u
                dz = g * y * sz * (1.0 + zv * (1.0 - sz))  # d silu(z) / dz = s (1 + z (1 - s))
                tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                dy = g * zv * sz
            else:
                dy = g
            dh = dy[:, None, :] * Ct

            # dh^L_t = dh_t + a_{t+1} dh^L_{t+1}, right to left; `dhl` enters already multiplied by the
            # next chunk's first decay (dlast_state enters the last chunk as it is).
            dhl_t, dhl = _recurrence(a, dh, dhl, j, T, True, True)
            # da_t a_t = dh^L_t a_t h^L_{t-1} + dh^R_t a_t h^R_{t+1}, where a h^L_{t-1} = h^L_t - x_t.
            da_a = dhl_t * (hl - x)
            if WINDOW > 1:
                # dh^R_t = dh_t + a'_{t-1} dh^R_{t-1}, left to right; a' = 0 at window ends restarts it.
                dhr_in = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
                if STRADDLE:  # what enters from the previous chunk, from the left-carry pass
                    dhr_in = tl.load(lcarry_ptr + carry_offs + k * N, mask=nd_mask, other=0.0)
                dhr_t, _ = _recurrence(a_right, dh, dhr_in, j, T, False, True)
                dx = dhl_t + dhr_t - dh
                da_a += dhr_t * (hr - x)  # zero at window ends, where h^R = x
            else:
                dx = dhl_t

            # Chain rule through a = exp(ΔA), x = Δ B u, y = C·h + D u, Δ = softplus(delta + bias).
            dx_b = tl.sum(dx * Bt, axis=1)
            ddelta = (tl.sum(da_a * A[None, :, :], axis=1) + dx_b * u) * ddt_ddelta
            ddelta = tl.where(m2, ddelta, 0.0)  # padding rows carry state, not gradient
            du = dx_b * dt + dy * Dv[None, :]
            tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=m2)
            if HAS_D:
                dD_acc += tl.sum(dy * u, axis=0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddelta, axis=0)
            dA_acc += tl.sum(da_a * dt[:, None, :], axis=0)
            dB_t = dx * (dt * u)[:, None, :]
            dC_t = dy[:, None, :] * hs
            bc_offs = n[None, :] * L + t[:, None]
            bc_mask = valid[:, None] & (n < N)[None, :]
            # Grouped dB / dC: only sums, so relaxed atomics (fire-and-forget reductions) suffice.
            if B_CONST:
                dB_acc += tl.sum(dB_t, axis=0)
            else:
                tl.atomic_add(dB_ptr + b_base + bc_offs, tl.sum(dB_t, axis=2), mask=bc_mask, sem="relaxed")
            if C_CONST:
                dC_acc += tl.sum(dC_t, axis=0)
            else:
                tl.atomic_add(dC_ptr + c_base + bc_offs, tl.sum(dC_t, axis=2), mask=bc_mask, sem="relaxed")

    state_offs = b * dim * N + nd_offs
    if HAS_PREV:  # after the first chunk dhl = a_0 dh^L_0: the gradient reaching h^L_{-1}
        tl.store(dprev_ptr + state_offs, dhl, mask=nd_mask)
    tl.store(dA_ptr + state_offs, dA_acc, mask=nd_mask)
    if B_CONST:
        tl.store(dB_ptr + state_offs, dB_acc, mask=nd_mask)
    if C_CONST:
        tl.store(dC_ptr + state_offs, dC_acc, mask=nd_mask)
    if HAS_D:
        tl.store(dD_ptr + b * dim + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * dim + d, dbias_acc, mask=dmask)


@triton.jit
def _bwd_left_carry_kernel(
    dout_ptr, delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, lcarry_ptr,
    dim, L, N, n_chunks, c_groups,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, C_CONST: tl.constexpr,
    WINDOW: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    """Windows longer than a chunk: a' dh^R entering each chunk from the left, a left-to-right pass."""
    pid_d, b, d, n, dmask, nd_mask, nd_offs, row = _program(dim, L, N, BLOCK_D, BLOCK_N)
    j = tl.arange(0, T)
    A2 = tl.load(A_ptr + nd_offs, mask=nd_mask, other=0.0) * _LOG2E
    bias = tl.load(bias_ptr + d, mask=dmask, other=0.0) if HAS_BIAS else tl.zeros([BLOCK_D], tl.float32)
    Cc = _load_const(C_ptr, nd_offs, nd_mask, C_CONST)
    c_base = _group_base(pid_d, b, dim, N, L, c_groups, BLOCK_D)
    carry_offs = _state_offs(b, dim, d, n, N, n_chunks)

    carry = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for k in range(n_chunks):
        tl.store(lcarry_ptr + carry_offs + k * N, carry, mask=nd_mask)
        t, valid, m2, offs = _chunk(k, j, row, dmask, L, CHUNK)
        # dout takes u's place in the loader: only its tile, delta, z and C are needed here.
        g, delta, zv, _, Cv = _load_chunk(
            dout_ptr, delta_ptr, z_ptr, C_ptr, C_ptr, c_base, c_base, k, j, row, n, dmask, N, L,
            CHUNK, HAS_Z, False, not C_CONST,
        )  # fmt: skip
        dy = g * zv * _sigmoid(zv) if HAS_Z else g
        dh = dy[:, None, :] * _bc_tile(Cv, Cc, C_CONST)
        dt, _ = _delta(delta, bias, m2, SOFTPLUS)
        a_right = _right_decay(tl.exp2(dt[:, None, :] * A2[None, :, :]), j, t, WINDOW, True)
        _, carry = _recurrence(a_right, dh, carry, j, T, False, True)  # a' dh^R at the chunk's end


# ----------------------------------------------------------------------------------------------
# The fused-backend interface
# ----------------------------------------------------------------------------------------------


def is_available():
    """None when the kernels can run here (a CUDA device, or TRITON_INTERPRET=1), else why not."""
    if _INTERPRET or torch.cuda.is_available():
        return None
    return "no CUDA device is available (set TRITON_INTERPRET=1 before importing to run the kernels on the CPU)"


def supports(device, dtype) -> bool:
    """fp32 / fp16 / bf16 tensors on CUDA, and on the CPU under the Triton interpreter."""
    device = torch.device(device)
    on_device = device.type == "cuda" or (_INTERPRET and device.type == "cpu")
    return on_device and dtype in _DTYPES


def tile_len(dstate=None) -> int:
    """T, the positions per register tile (and the longest chunk) at this d_state: CHUNK_LEN at
    BLOCK_N 16 (d_state 9..16, the usual Mamba layer; None means that), half of it elsewhere.

    Measured with ptxas (sm_80 / sm_90, benchmarks/triton_static.py): every thread holds T rows of
    each of its (T, BLOCK_N, BLOCK_D) pairs, (T, BLOCK_D) channels and (T, BLOCK_N) states, and at
    T = 16 only BLOCK_N 16 fits them in 255 registers at useful block sizes. With T = 16 the backward
    spills at BLOCK_N 32..256 even at one pair per thread (255 registers, 4-88 B; 1.1 KB at BLOCK_N
    256), and both kernels at BLOCK_N 1..4 (up to 3.4 KB: the (T, BLOCK_D) tiles are not shared over
    states there); T = 8 takes e.g. the backward at BLOCK_N 256 (8 warps) to 232 / 236 registers
    (sm_90 / sm_80), at BLOCK_N 32 to 168 / 204.
    """
    if dstate is None or triton.next_power_of_2(dstate) == 16:
        return CHUNK_LEN
    return max(1, CHUNK_LEN // 2)


def _chunking(seqlen: int, window: int, tile: int | None = None):
    """(chunk_len, straddle): chunks hold whole windows when a window fits in a tile (`tile` positions,
    CHUNK_LEN by default).

    window = 1 (no local backward state) never straddles.
    """
    tile = CHUNK_LEN if tile is None else tile
    window = min(window, seqlen)  # a window past the end is the same as one ending at the end
    if window <= tile:
        return window * (tile // window), False
    return tile, True


def num_checkpoints(seqlen: int, window: int, dstate: int | None = None) -> int:
    """One checkpoint (h^L at a chunk's start) per CHECKPOINT_EVERY chunks (chunks of `tile_len(dstate)`)."""
    chunk_len, _ = _chunking(seqlen, window, tile_len(dstate))
    return triton.cdiv(triton.cdiv(seqlen, chunk_len), CHECKPOINT_EVERY)


def checkpoint_shape(batch: int, dim: int, seqlen: int, dstate: int, window: int) -> tuple:
    return (batch, dim, num_checkpoints(seqlen, window, dstate), dstate)


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _device_guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _block_rule(block_n: int, backward: bool):
    """(largest BLOCK_D, pairs per thread, most warps) of the forward (with its right-carry kernel) or the
    backward (with its left-carry kernel) at this BLOCK_N, T = tile_len. Register counts below are
    ptxas's, sm_90 / sm_80, Mamba-layer flags in fp32 (benchmarks/triton_static.py has every flag set)."""
    if not backward:
        if block_n <= 4:
            # (T, BLOCK_D) tiles are as many per thread as pairs at BLOCK_N 1: one pair per thread (at two,
            # BLOCK_N 1 BLOCK_D 256 spills 56 / 116 B even at T = 8; at one it takes 208 / 220 registers)
            return 32 * NUM_WARPS // block_n, 1, NUM_WARPS
        # two pairs per thread (BLOCK_N 16: the LBVim layer's 168 / 167; BLOCK_N 256 at T = 8: 194 / 203)
        return max(1, 32 * NUM_WARPS * FWD_PAIRS_PER_THREAD // block_n), FWD_PAIRS_PER_THREAD, NUM_WARPS
    if block_n <= 2:
        # 16 pairs in one warp, the sequence axis over two lanes: at one pair per thread BLOCK_N 1
        # spills (BLOCK_D 128, 4 warps: 24 B on sm_80 at T = 8); BLOCK_D 16 takes 206 / 168 registers
        return 16 // block_n, 0.5, 1
    # one pair per thread; BLOCK_N 256 (BLOCK_D 1) needs 8 warps for that: 232 / 236 registers at T = 8
    # (4 warps, two pairs per thread: 1.1 KB of spills at T = 16)
    return max(1, 32 * NUM_WARPS * BWD_PAIRS_PER_THREAD // block_n), BWD_PAIRS_PER_THREAD, 2 * NUM_WARPS


class _Launch:
    """Shapes, block sizes and flags shared by the kernels of one call (the forward's or the backward's)."""

    def __init__(self, u, A, B, C, window, backward=False):
        self.batch, self.dim, self.seqlen = u.shape
        self.dstate = A.shape[1]
        self.window = min(window, self.seqlen)
        self.backward = backward
        self.tile = tile_len(self.dstate)
        self.chunk_len, self.straddle = _chunking(self.seqlen, window, self.tile)
        self.n_chunks = triton.cdiv(self.seqlen, self.chunk_len)
        self.n_ckpt = num_checkpoints(self.seqlen, window, self.dstate)
        self.b_const, self.c_const = B.dim() == 2, C.dim() == 2
        self.b_groups = 1 if self.b_const else B.shape[1]
        self.c_groups = 1 if self.c_const else C.shape[1]
        self.block_n = triton.next_power_of_2(self.dstate)
        full_d, pairs_per_thread, max_warps = _block_rule(self.block_n, backward)
        block_d = min(full_d, triton.next_power_of_2(self.dim))
        for groups in (self.b_groups, self.c_groups):  # a program's channels share one B/C group
            per_group = self.dim // groups
            if groups > 1:
                block_d = min(block_d, per_group & -per_group)  # largest power of two dividing it
        self.block_d = block_d
        # Blocks smaller than the full one (small dim, grouped B/C) get one pair per thread (the forward's
        # BLOCK_N 16 BLOCK_D 4 spilled 8 B in bf16 at two), and in the backward at T = 16 (BLOCK_N 16) half
        # a pair: one pair per thread spilled 4-12 B at BLOCK_D 2 on sm_80. Fewer warps than that would
        # spread threads over the sequence axis, more would replicate.
        if block_d < full_d:
            pairs_per_thread = 0.5 if backward and self.tile == CHUNK_LEN else min(pairs_per_thread, 1)
        threads = int(block_d * self.block_n / pairs_per_thread)
        self.num_warps = max(1, min(max_warps, threads // 32))
        self.grid = (triton.cdiv(self.dim, block_d), self.batch)

    def sizes(self):
        return (self.dim, self.seqlen, self.dstate, self.n_chunks)

    def blocks(self):
        # An explicit register limit for one-warp programs and for the backward at T = CHUNK_LEN / 2: without
        # it ptxas aims at fewer registers (96 / 128 for one warp, 128 for two, 168 for four) and spills
        # 4-20 B there (e.g. the backward at BLOCK_N 1 BLOCK_D 8, one warp: 128 registers, 8 B, with the
        # limit 161; BLOCK_N 64 BLOCK_D 1, two warps, window 1: 168 and 20 B on sm_90, with it 212). Not at
        # BLOCK_N 16's T = CHUNK_LEN with more warps, where no spill was measured without it and the limit
        # changes the code (the LBVim forward would go from 167 to 219 registers on sm_80).
        limit = self.num_warps == 1 or (self.backward and self.tile < CHUNK_LEN)
        options = dict(num_warps=self.num_warps, **({"maxnreg": MAX_REGISTERS} if limit else {}))
        return dict(
            WINDOW=self.window, CHUNK=self.chunk_len, BLOCK_D=self.block_d, BLOCK_N=self.block_n, T=self.tile,
            **options,
        )


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    """Contiguous inputs, with the parameters (and constant B/C) in fp32."""
    u, delta = u.contiguous(), delta.contiguous()
    A = A.float().contiguous()
    B = B.float().contiguous() if B.dim() == 2 else B.contiguous()
    C = C.float().contiguous() if C.dim() == 2 else C.contiguous()
    z = z.contiguous() if z is not None else None
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    return u, delta, A, B, C, D, z, delta_bias


def _check_inputs(u, A):
    if not supports(u.device, u.dtype):
        raise ValueError(
            f"u: the triton backend runs float32 / float16 / bfloat16 tensors on CUDA "
            f"(or on the CPU with TRITON_INTERPRET=1), got {u.dtype} on {u.device.type}"
        )
    if A.shape[1] > MAX_DSTATE:
        raise ValueError(f"A: the triton backend runs d_state up to {MAX_DSTATE}, got {A.shape[1]} "
                         f"(backend='torch' runs any)")


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, keep_last_state=True, keep_checkpoints=True,
            prev_state=None):
    # the kernel writes the last state and the checkpoints whether kept or not: at GPU sizes they are a
    # small part of its traffic, and a Python call's overhead is not this backend's bottleneck
    _check_inputs(u, A)
    B, C = as_grouped(B), as_grouped(C)
    u, delta, A, B, C, D, z, delta_bias = _prepare(u, delta, A, B, C, D, z, delta_bias)
    cfg = _Launch(u, A, B, C, window)
    dev = u.device
    out = _new(u.shape, u.dtype, dev)
    last_state = _new((cfg.batch, cfg.dim, cfg.dstate), torch.float32, dev)
    checkpoints = _new((cfg.batch, cfg.dim, cfg.n_ckpt, cfg.dstate), torch.float32, dev)
    if prev_state is not None:
        prev_state = prev_state.detach().float().contiguous()
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), B_CONST=cfg.b_const)
    with _device_guard(dev):
        rcarry = None
        if cfg.straddle:
            rcarry = _new((cfg.batch, cfg.dim, cfg.n_chunks, cfg.dstate), torch.float32, dev)
            _fwd_right_carry_kernel[cfg.grid](
                u, delta, A, B, _or(delta_bias, A), rcarry, *cfg.sizes(), cfg.b_groups, **flags, **cfg.blocks()
            )
        _fwd_kernel[cfg.grid](
            u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A),
            out, last_state, checkpoints, _or(rcarry, checkpoints), _or(prev_state, last_state),
            *cfg.sizes(), cfg.n_ckpt, cfg.b_groups, cfg.c_groups,
            HAS_D=D is not None, HAS_Z=z is not None, C_CONST=cfg.c_const,
            STRADDLE=cfg.straddle, CKPT_EVERY=CHECKPOINT_EVERY, HAS_PREV=prev_state is not None, **flags,
            **cfg.blocks(),
        )  # fmt: skip
    return out, last_state, checkpoints


def forward_plan(u, delta, A, B, C, D, z, delta_bias, window, keep_last_state=True, keep_checkpoints=True):
    """`forward` bound to the window and flags (its set-up is small beside a GPU launch: nothing to keep)."""

    def run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, prev_state=None):
        return forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, keep_last_state, keep_checkpoints,
                       prev_state)

    return run


def backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, checkpoints,
             prev_state=None):
    _check_inputs(u, A)
    param_dtypes = [t.dtype if t is not None else torch.float32 for t in (A, B, C, D, delta_bias)]
    u, delta, A, B, C, D, z, delta_bias = _prepare(u, delta, A, B, C, D, z, delta_bias)
    cfg = _Launch(u, A, B, C, window, backward=True)
    if tuple(checkpoints.shape) != (cfg.batch, cfg.dim, cfg.n_ckpt, cfg.dstate):
        raise ValueError(
            f"checkpoints must have shape {(cfg.batch, cfg.dim, cfg.n_ckpt, cfg.dstate)} "
            f"(from this backend's forward with the same window), got {tuple(checkpoints.shape)}"
        )
    dev = u.device
    dout = dout.contiguous()
    if dlast_state is None:
        dlast_state = torch.zeros((cfg.batch, cfg.dim, cfg.dstate), dtype=torch.float32, device=dev)
    dlast_state = dlast_state.float().contiguous()
    checkpoints = checkpoints.float().contiguous()

    du = _new(u.shape, u.dtype, dev)
    ddelta = _new(delta.shape, delta.dtype, dev)
    dz = _new(z.shape, z.dtype, dev) if z is not None else u.new_empty((0,))  # never written then
    per_batch = (cfg.batch, cfg.dim, cfg.dstate)
    dA = _new(per_batch, torch.float32, dev)
    # Constant B/C: per-batch partial sums; grouped: an fp32 buffer the programs add into.
    dB = _new(per_batch, torch.float32, dev) if cfg.b_const else torch.zeros(B.shape, dtype=torch.float32, device=dev)
    dC = _new(per_batch, torch.float32, dev) if cfg.c_const else torch.zeros(C.shape, dtype=torch.float32, device=dev)
    dD = _new((cfg.batch, cfg.dim), torch.float32, dev) if D is not None else None
    dbias = _new((cfg.batch, cfg.dim), torch.float32, dev) if delta_bias is not None else None
    dprev = _new(per_batch, torch.float32, dev) if prev_state is not None else None
    flags = dict(
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), C_CONST=cfg.c_const
    )
    with _device_guard(dev):
        lcarry = None
        if cfg.straddle:
            lcarry = _new((cfg.batch, cfg.dim, cfg.n_chunks, cfg.dstate), torch.float32, dev)
            _bwd_left_carry_kernel[cfg.grid](
                dout, delta, A, C, _or(z, u), _or(delta_bias, A), lcarry, *cfg.sizes(), cfg.c_groups,
                **flags, **cfg.blocks(),
            )  # fmt: skip
        _bwd_kernel[cfg.grid](
            dout, dlast_state, u, delta, A, B, C, _or(D, A), _or(z, u), _or(delta_bias, A),
            checkpoints, _or(lcarry, checkpoints),
            du, ddelta, dz, dB, dC, dA, _or(dD, dA), _or(dbias, dA), _or(dprev, dA),
            *cfg.sizes(), cfg.n_ckpt, cfg.b_groups, cfg.c_groups,
            HAS_D=D is not None, B_CONST=cfg.b_const, STRADDLE=cfg.straddle, CKPT_EVERY=CHECKPOINT_EVERY,
            HAS_PREV=prev_state is not None, **flags, **cfg.blocks(),
        )  # fmt: skip

    A_dtype, B_dtype, C_dtype, D_dtype, bias_dtype = param_dtypes

    def absent():  # the gradient slot of a missing D / delta_bias (outputs must not alias each other)
        return torch.zeros(cfg.dim, dtype=torch.float32, device=dev)

    return (
        du,
        ddelta,
        dA.sum(0).to(A_dtype),  # per-batch partial sums -> the parameter's gradient
        dB.sum(0).to(B_dtype) if cfg.b_const else dB.to(B_dtype),
        dC.sum(0).to(C_dtype) if cfg.c_const else dC.to(C_dtype),
        dD.sum(0).to(D_dtype) if D is not None else absent(),
        dz,
        dbias.sum(0).to(bias_dtype) if delta_bias is not None else absent(),
        dprev.to(prev_state.dtype) if prev_state is not None else u.new_empty((0,)),
    )


def _or(t, placeholder):
    """A tensor argument, or a placeholder pointer for an absent one that the kernel never reads."""
    return placeholder if t is None else t
