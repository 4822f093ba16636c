"""The cpu backend's forward: a ForwardPlan works a call out once per signature of its arguments, so that a
call then passes the kernel only its tensors' data addresses; `forward` keeps the plans by signature for
calls through the registered op, `forward_plan` makes one for a caller that keeps its own (the direct path
of lbmamba.ops.scan).
"""

from __future__ import annotations

import torch

from .kernels import _blocks, _forward_at, block_width, checkpoint_shape, chunk_length
from .layouts import (
    _as_compute,
    _compute_dtype,
    _grouped_view,
    _needs_compute_copy,
    _placeholder,
    _sequence_layout,
    _shared_zeros,
)
from .threads import _run_tasks, scan_threads


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

    def __call__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, prev_state=None):
        """(out in u's dtype, last state or None, checkpoints or None), as `forward`."""
        if prev_state is not None:  # (batch, dim, N), contiguous in the compute dtype; kept alive by this name
            prev_state = prev_state.detach().to(self.ct).contiguous()
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
            bool(delta_softplus), at if prev_state is None else prev_state.data_ptr(), prev_state is not None,
            *self.fixed_args,
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


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, keep_last_state=True, keep_checkpoints=True,
            prev_state=None):
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    key = (window, keep_last_state, keep_checkpoints) + tuple(
        None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = ForwardPlan(*tensors, window, keep_last_state, keep_checkpoints)
    return plan(*tensors, delta_softplus, prev_state)
