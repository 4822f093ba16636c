"""The fused backends ("cpu", "triton") as one PyTorch custom op with a hand-written backward.

A fused backend is a module with this interface (B and C arrive canonical: constant (dim, N) or
grouped (batch, G, N, L), and in `forward` also variable (batch, N, L); other tensors in the caller's
dtypes, not necessarily contiguous):

    is_available() -> str | None        None when usable, else the reason it is not
    supports(device, dtype) -> bool     whether it runs tensors of this device and dtype of u
    MAX_DSTATE: int | None              the largest d_state it runs (None: any)
    checkpoint_shape(batch, dim, seqlen, dstate, window) -> tuple of ints
    forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window,
            keep_last_state=True, keep_checkpoints=True, prev_state=None)
        -> out (u's dtype), last_state (batch, dim, N), checkpoints (checkpoint_shape(...): whatever
           the backend's backward needs to recompute the states, e.g. h^L at every chunk start);
           the backend may skip what the caller does not keep and return None for it; prev_state
           (batch, dim, N) or None: h^L before the first position (None: zeros)
    forward_plan(u, delta, A, B, C, D, z, delta_bias, window, keep_last_state=True, keep_checkpoints=True)
        -> run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, prev_state=None), the same as forward for
           tensors with these types, shapes, strides, dtypes and devices (its set-up done once: short calls reuse it)
    backward(dout, dlast_state | None, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, checkpoints,
             prev_state=None)
        -> du, ddelta, dA, dB, dC, dD (dim,), dz (empty when z is None), ddelta_bias (dim,),
           dprev_state (batch, dim, N) in prev_state's dtype (empty when prev_state is None)

last_state and checkpoints are float64 for float64 inputs and float32 otherwise; each gradient has its
input's dtype (dD / ddelta_bias: float32 when D / delta_bias is None).

Registering through `torch.library` lets `torch.compile`, `torch.export` and `torch.func` treat the
scan as one opaque op instead of tracing into numba or Triton.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

_MODULES = {"cpu": "lbmamba.ops.cpu", "triton": "lbmamba.ops.triton_scan"}


#: the backend modules imported so far (importlib's own look-up costs a microsecond or two a call)
_LOADED: dict = {}


def backend_module(name: str):
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


def fused_backend_names():
    return tuple(_MODULES)


def _state_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


#: the backward op's outputs (the gradients of u, delta, A, B, C, D, z, delta_bias, prev_state), spelled out for its
#: schema
_NineTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor, torch.Tensor]


@torch.library.custom_op("lbmamba::lb_scan_fwd", mutates_args=())
def lb_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    window: int,
    backend: str,
    prev_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend_module(backend).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window,
                                           prev_state=prev_state)


@lb_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, backend, prev_state=None):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    checkpoints = backend_module(backend).checkpoint_shape(batch, dim, seqlen, dstate, window)
    state_dtype = _state_dtype(u)
    return (
        torch.empty_like(u),
        u.new_empty((batch, dim, dstate), dtype=state_dtype),
        u.new_empty(checkpoints, dtype=state_dtype),
    )


@torch.library.custom_op("lbmamba::lb_scan_bwd", mutates_args=())
def lb_scan_bwd(
    dout: torch.Tensor,
    dlast_state: Optional[torch.Tensor],
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    window: int,
    backend: str,
    checkpoints: torch.Tensor,
    prev_state: Optional[torch.Tensor] = None,
) -> _NineTensors:
    return tuple(
        backend_module(backend).backward(
            dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, checkpoints, prev_state
        )
    )


@lb_scan_bwd.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, backend, checkpoints,
      prev_state=None):
    dim = u.shape[1]
    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D) if D is not None else u.new_empty((dim,), dtype=torch.float32),
        torch.empty_like(z) if z is not None else u.new_empty((0,)),
        torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty((dim,), dtype=torch.float32),
        torch.empty_like(prev_state) if prev_state is not None else u.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, backend = inputs[:11]
    prev_state = inputs[11] if len(inputs) > 11 else None  # a call that leaves the default out
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2], prev_state)
    ctx.scan_options = (delta_softplus, window, backend)


def _backward(ctx, dout, dlast_state, _dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, checkpoints, prev_state = ctx.saved_tensors
    delta_softplus, window, backend = ctx.scan_options
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dprev = lb_scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, window, backend, checkpoints,
        prev_state,
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta_bias if delta_bias is not None else None,
        None,
        None,
        None,
        dprev if prev_state is not None else None,
    )


torch.library.register_autograd("lbmamba::lb_scan_fwd", _backward, setup_context=_setup_context)
