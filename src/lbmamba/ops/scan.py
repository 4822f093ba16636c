"""`selective_scan_fn`: the one public scan, and the dispatcher that picks its backend."""

from __future__ import annotations

import torch

from . import _fused
from ._checks import as_grouped, check_scan_args
from .reference import selective_scan_ref
from .torch_scan import selective_scan_torch

BACKENDS = ("auto", "reference", "torch") + _fused.fused_backend_names()


#: _fused_unavailable's answers: they cannot change within a process, and every call asks
_UNAVAILABLE: dict = {}


@torch.compiler.assume_constant_result
def _fused_unavailable(name: str, device_type: str, dtype: torch.dtype):
    """None when fused backend `name` can run tensors of this device type and dtype, else why not.

    A constant to torch.compile: it is evaluated once while tracing, never inside the graph.
    """
    key = (name, device_type, dtype)
    if key not in _UNAVAILABLE:
        _UNAVAILABLE[key] = _why_unavailable(name, device_type, dtype)
    return _UNAVAILABLE[key]


def _why_unavailable(name: str, device_type: str, dtype: torch.dtype):
    try:
        module = _fused.backend_module(name)
    except ImportError as exc:  # a missing optional dependency (numba, triton)
        return f"it needs a package that failed to import ({exc})"
    reason = module.is_available()
    if reason is None and not module.supports(torch.device(device_type), dtype):
        reason = f"it does not run {dtype} tensors on {device_type}"
    return reason


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
#: tensor types the fused backends may be called with directly (not fake, functional or batched tensors)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_inference_call(tensors) -> bool:
    """True when neither autograd, nor torch.compile / export, nor a torch.func transform can see this
    call: then the fused backend runs directly, without the registered op's dispatch (tens of
    microseconds, which at short lengths was as much as the scan itself)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if (grad and t.requires_grad) or type(t) not in _PLAIN_TENSORS or _is_functorch_wrapped(t):
            return False
    return True



def choose_backend(backend: str, u: torch.Tensor) -> str:
    """Resolve `backend` ("auto" or a name in BACKENDS) for tensors like `u`; raise if unusable."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        preferred = {"cpu": "cpu", "cuda": "triton"}.get(u.device.type)
        if preferred is not None and _fused_unavailable(preferred, u.device.type, u.dtype) is None:
            return preferred
        return "torch"
    if backend in _fused.fused_backend_names():
        reason = _fused_unavailable(backend, u.device.type, u.dtype)
        if reason is not None:
            raise ValueError(f"backend={backend!r} is not available for these inputs: {reason}")
    return backend


def selective_scan_fn(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    window="auto",
    backend="auto",
):
    """The LB selective scan, with `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`'s signature.

    Args:
        u, delta: (batch, dim, L), float32 / float16 / bfloat16 (float64 for exact checks).
        A: (dim, N), real.
        B, C: constant (dim, N), variable (batch, N, L) or grouped (batch, G, N, L).
        D, delta_bias: (dim,) or None.  z: (batch, dim, L) or None (output gate silu(z)).
        delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the forward state at the last position, (batch, dim, N).
        window: size W of the local backward windows, a positive int or "auto" (4 / 8 / 16 for
            L <= 128 / <= 256 / longer, as the reference CUDA kernel). window=1 is vanilla Mamba.
        backend: "auto", "reference", "torch", "cpu" or "triton".

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state) when return_last_state.
    """
    shape = check_scan_args(u, delta, A, B, C, D, z, delta_bias, window)
    name = choose_backend(backend, u)
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, window=window)
    if name == "torch":
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    window=window)
    args = (u, delta, A, as_grouped(B), as_grouped(C), D, z, delta_bias, bool(delta_softplus), shape.window)
    if _plain_inference_call(args[:8]):
        out, last_state, _ = _fused.backend_module(name).forward(*args)
    else:
        out, last_state, _ = _fused.lb_scan_fwd(*args, name)
    return (out, last_state) if return_last_state else out


def available_backends(device="cpu", dtype=torch.float32):
    """Names of the backends that can run tensors of `device` and `dtype` here."""
    device_type = torch.device(device).type
    return ("reference", "torch") + tuple(
        name for name in _fused.fused_backend_names() if _fused_unavailable(name, device_type, dtype) is None
    )

