"""The scan under `torch.func` transforms (grad, vjp, jacrev, vmap, and nestings of them).

`selective_scan_fn` routes the "torch", "cpu" and "triton" backends here while a transform runs (the
"reference" backend is plain autograd-visible PyTorch and needs nothing). Two autograd.Functions in the
style functorch requires (forward without ctx, `setup_context`, a `vmap` rule):

- `FuncScan`: the forward (out, last_state, and the checkpoints the backward recomputes from);
- `ScanBackward`: its backward, itself a Function, so that the backward also runs under vmap (per-sample
  gradients, vmap(grad(...)), and jacrev, which vmaps the backward over the cotangents).

Their vmap rules fold the vmapped dimension V into one of the scan's own dimensions and call the scan once:
into batch when A, D, delta_bias and a constant B / C are shared by all V samples (the usual case: a view,
no copy), else into channels (dim), which gives each sample its own A, D, delta_bias and B / C (grouped
B / C become V times as many groups). The backward folds into channels always: the gradients of A, D,
delta_bias and constant B / C are sums over batch, and each sample needs its own.
"""

from __future__ import annotations

import torch

from . import _fused
from .torch_scan import chunk_length, lb_backward, lb_forward

#: the kinds of argument the folds handle: "seq" (batch, dim, X), "chan" (dim, ...), "bc" (B / C: constant
#: (dim, N), a "chan", or grouped (batch, G, N, L)), "ckpt" (a backend's checkpoints), None (not folded)
_FORWARD_KINDS = ("seq", "seq", "chan", "bc", "bc", "chan", "seq", "chan", "seq", None, None, None)


def checkpoint_axes(backend: str) -> tuple[int, int]:
    """(batch axis, channel axis) of `backend`'s checkpoints, found from its checkpoint_shape (the axis that
    grows with batch / with dim), so that a backend may change its layout."""
    if backend == "torch":
        return 1, 2  # (n_chunks, batch, dim, N), lb_forward's
    shape = _fused.backend_module(backend).checkpoint_shape
    base = shape(2, 3, 16, 5, 4)
    more_batch, more_dim = shape(7, 3, 16, 5, 4), shape(2, 11, 16, 5, 4)
    batch_axis = next(i for i, (a, b) in enumerate(zip(base, more_batch)) if a != b)
    dim_axis = next(i for i, (a, b) in enumerate(zip(base, more_dim)) if a != b)
    return batch_axis, dim_axis


def _position(kind: str, t: torch.Tensor, mode: str, backend: str):
    """Where V goes in the per-sample tensor `t` of this kind (to be merged with the axis there), or None when
    this fold cannot take a batched `t`."""
    if kind == "bc":
        kind = "chan" if t.dim() == 2 else "seq"  # constant (dim, N), or grouped (batch, G, N, L): G after batch
    if kind == "ckpt":
        return checkpoint_axes(backend)[0 if mode == "batch" else 1]
    if mode == "batch":
        return 0 if kind == "seq" else None
    return 1 if kind == "seq" else 0


def _per_sample_dim(t, bdim):
    return t.dim() - (bdim is not None)


def _fold(t, bdim, kind, mode, backend, V):
    """A per-sample tensor `t` (batched at bdim, or shared when bdim is None) with V merged into one axis."""
    if t is None or kind is None or not isinstance(t, torch.Tensor):
        return t
    sample = t.select(bdim, 0) if bdim is not None else t
    p = _position(kind, sample, mode, backend)
    if p is None:  # shared (batch mode only takes a shared "chan")
        return t
    t = t.movedim(bdim, p) if bdim is not None else t.unsqueeze(p).expand(*t.shape[:p], V, *t.shape[p:])
    return t.flatten(p, p + 1)


def _unfold(t, kind, mode, backend, V):
    """The folded call's output `t` back as (V samples, their out_dim)."""
    if kind == "bc":
        kind = "chan" if t.dim() == 2 else "seq"
    p = _position(kind, t, mode, backend)
    return t.unflatten(p, (V, -1)), p


def _mode(in_dims, args, kinds):
    """"batch" when every batched argument is one that folds into batch, else "dim"."""
    for bdim, t, kind in zip(in_dims, args, kinds):
        if bdim is not None and (kind == "chan" or (kind == "bc" and _per_sample_dim(t, bdim) == 2)):
            return "dim"
    return "batch"


def _forward(u, delta, A, B, C, D, z, delta_bias, prev_state, softplus, window, backend):
    if backend == "torch":
        window = min(window, u.shape[-1])
        return lb_forward(u, delta, A, B, C, D, z, delta_bias, softplus, window, chunk_length(window, u.shape[-1]),
                          prev_state, keep=True)
    return _fused.lb_scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, window, backend, prev_state)


def _backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state, softplus, window, backend):
    """The gradients of u, delta, A, B, C and of those of D, z, delta_bias, prev_state that are given."""
    if backend == "torch":
        window = min(window, u.shape[-1])
        grads = lb_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, window,
                            chunk_length(window, u.shape[-1]), checkpoints, prev_state)
        grads = grads[:8] + grads[11:]
    else:
        grads = _fused.lb_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, window, backend,
                                   checkpoints, prev_state)
    optional = (D, z, delta_bias, prev_state)
    return tuple(grads[:5]) + tuple(g for g, t in zip(grads[5:], optional) if t is not None)


class FuncScan(torch.autograd.Function):
    """(out, last_state, checkpoints) of the scan; B and C canonical (constant (dim, N) or grouped)."""

    @staticmethod
    def forward(u, delta, A, B, C, D, z, delta_bias, prev_state, softplus, window, backend):
        return _forward(u, delta, A, B, C, D, z, delta_bias, prev_state, softplus, window, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, z, delta_bias, prev_state, softplus, window, backend = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2], prev_state)
        ctx.options = (softplus, window, backend)
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, dout, dlast, _dcheckpoints):
        u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state = ctx.saved_tensors
        grads = iter(ScanBackward.apply(dout, dlast, u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state,
                                        *ctx.options))
        first = [next(grads) for _ in range(5)]
        rest = [None if t is None else next(grads) for t in (D, z, delta_bias)]
        dprev = None if prev_state is None else next(grads)
        return (*first, *rest, dprev, None, None, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        V, backend = info.batch_size, args[-1]
        mode = _mode(in_dims, args, _FORWARD_KINDS)
        folded = [_fold(t, b, k, mode, backend, V) for t, b, k in zip(args, in_dims, _FORWARD_KINDS)]
        out, last_state, checkpoints = FuncScan.apply(*folded)
        results = [_unfold(t, k, mode, backend, V) for t, k in ((out, "seq"), (last_state, "seq"),
                                                                (checkpoints, "ckpt"))]
        return tuple(r[0] for r in results), tuple(r[1] for r in results)


class ScanBackward(torch.autograd.Function):
    """FuncScan's backward as a Function with a vmap rule (it is not differentiable itself)."""

    @staticmethod
    def forward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state, softplus, window,
                backend):
        return _backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state, softplus,
                         window, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("the LB scan's backward is not differentiable (no double backward / hessian)")

    @staticmethod
    def vmap(info, in_dims, *args):
        V, backend = info.batch_size, args[-1]
        kinds = ("seq", "seq") + _FORWARD_KINDS[:8] + ("ckpt", "seq", None, None, None)
        folded = [_fold(t, b, k, "dim", backend, V) for t, b, k in zip(args, in_dims, kinds)]
        grads = ScanBackward.apply(*folded)
        u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state = args[2:12]
        grad_kinds = ["seq", "seq", "chan", "bc", "bc"] + [k for t, k in zip((D, z, delta_bias, prev_state),
                                                                            ("chan", "seq", "chan", "seq"))
                                                        if t is not None]
        results = [_unfold(g, k, "dim", backend, V) for g, k in zip(grads, grad_kinds)]
        return tuple(r[0] for r in results), tuple(r[1] for r in results)


def func_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, prev_state, window: int, backend: str):
    """(out, last_state) through FuncScan: B and C canonical, window an int (the call's, not clipped)."""
    out, last_state, _ = FuncScan.apply(u, delta, A, B, C, D, z, delta_bias, prev_state, bool(delta_softplus),
                                        window, backend)
    return out, last_state


# The registered ops themselves (`lbmamba::lb_scan_fwd` / `lb_scan_bwd`) under vmap, with the same folds: for
# code that calls them directly (selective_scan_fn goes through FuncScan under transforms).
_OP_FORWARD_KINDS = _FORWARD_KINDS[:8] + (None, None, None, "seq")  # ..., softplus, window, backend, prev_state
_OP_BACKWARD_KINDS = ("seq", "seq") + _FORWARD_KINDS[:8] + (None, None, None, "ckpt", "seq")


def _op_forward_vmap(info, in_dims, *args):
    V, backend = info.batch_size, args[10]
    mode = _mode(in_dims, args, _OP_FORWARD_KINDS)
    folded = [_fold(t, b, k, mode, backend, V) for t, b, k in zip(args, in_dims, _OP_FORWARD_KINDS)]
    outputs = _fused.lb_scan_fwd(*folded)
    results = [_unfold(t, k, mode, backend, V) for t, k in zip(outputs, ("seq", "seq", "ckpt"))]
    return tuple(r[0] for r in results), tuple(r[1] for r in results)


def _op_backward_vmap(info, in_dims, *args):
    V, backend = info.batch_size, args[12]
    folded = [_fold(t, b, k, "dim", backend, V) for t, b, k in zip(args, in_dims, _OP_BACKWARD_KINDS)]
    grads = _fused.lb_scan_bwd(*folded)
    results = []
    for g, kind in zip(grads, ("seq", "seq", "chan", "bc", "bc", "chan", "seq", "chan", "seq")):
        # dz / dprev_state are empty when z / prev_state were not given
        results.append((g.new_empty((V, 0)), 0) if g.numel() == 0 else _unfold(g, kind, "dim", backend, V))
    return tuple(r[0] for r in results), tuple(r[1] for r in results)


torch.library.register_vmap("lbmamba::lb_scan_fwd", _op_forward_vmap)
torch.library.register_vmap("lbmamba::lb_scan_bwd", _op_backward_vmap)
