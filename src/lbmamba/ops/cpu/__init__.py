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

The modules: kernels.py (every numba kernel, forward and backward), threads.py (threads per call and the
helper pool), layouts.py (tensors as the kernels read them), plans.py (the forward's plans, by signature:
`forward` and `forward_plan`); here, the rest of the fused-backend interface of lbmamba.ops._fused and the
backward's wrapper.
"""

from __future__ import annotations

import torch

from .kernels import WIDE_VECTORS, _backward_kernel, checkpoint_shape, chunk_length
from .layouts import _bc_kernel_layout, _compute_dtype, _kernel_layout, _np, _per_channel, _placeholder, _tasks
from .plans import ForwardPlan, forward, forward_plan
from .threads import _run_tasks, scan_threads

__all__ = ["MAX_DSTATE", "is_available", "supports", "checkpoint_shape", "forward", "forward_plan", "backward",
           "ForwardPlan", "WIDE_VECTORS"]


#: the fused-backend interface's d_state limit: none (the per-task buffers grow with it, nothing else)
MAX_DSTATE = None


def is_available():
    return None


def supports(device, dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, checkpoints,
             prev_state=None):
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
    has_prev = prev_state is not None
    prev = _np(prev_state, ct) if has_prev else _placeholder(3, ct)
    dprev = torch.empty((batch, dim, dstate), dtype=ct) if has_prev else None
    (g_k, g_cl), (u_k, u_cl), (delta_k, delta_cl), (z_k, z_cl) = (_kernel_layout(t, ct) for t in (dout, u, delta, z))
    _run_tasks(
        _backward_kernel, batch * len(blocks), threads, width,
        g_k, dlast, has_dlast, u_k, delta_k, _per_channel(delta_bias, dim, ct), bool(delta_softplus), _np(A, ct),
        Bc, Bg, Cc, Cg, _per_channel(D, dim, ct), z_k, z is not None, g_cl, u_cl, delta_cl, z_cl, int(window),
        chunk_length(window), _np(checkpoints, ct), blocks, du.numpy(), ddelta.numpy(), dz.numpy(),
        dA_part.numpy(), dB_part.numpy(), dC_part.numpy(), dD_part.numpy(), dbias_part.numpy(), prev, has_prev,
        dprev.numpy() if has_prev else _placeholder(3, ct),
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
        dprev.to(prev_state.dtype) if has_prev else u.new_empty((0,)),
    )


def _bc_grad(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum the partial buffers of B or C back into the caller's layout and dtype."""
    if like.dim() == 2:  # constant: (1, batch, 1, N, dim) -> (dim, N)
        return part.sum((0, 1))[0].t().to(like.dtype)
    return part.sum(0).transpose(2, 3).to(like.dtype)  # (batch, G, L, N) -> (batch, G, N, L)
