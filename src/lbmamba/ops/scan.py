"""`selective_scan_fn`: the one public scan, and the dispatcher that picks its backend."""

from __future__ import annotations

import contextlib

import torch

from . import _fused
from ._checks import ScanShape, as_grouped, check_scan_args
from .func_transforms import func_scan
from .reference import selective_scan_ref
from .torch_scan import selective_scan_torch

BACKENDS = ("auto", "reference", "torch") + _fused.fused_backend_names()


#: _fused_unavailable's answers: they cannot change within a process, and every call asks
_UNAVAILABLE: dict = {}


@torch.compiler.assume_constant_result
def _fused_unavailable(name: str, device_type: str, dtype: torch.dtype, dstate: int | None = None):
    """None when fused backend `name` can run tensors of this device type and dtype (and d_state), else
    why not.

    A constant to torch.compile: it is evaluated once while tracing, never inside the graph.
    """
    key = (name, device_type, dtype, dstate)
    if key not in _UNAVAILABLE:
        _UNAVAILABLE[key] = _why_unavailable(name, device_type, dtype, dstate)
    return _UNAVAILABLE[key]


def _why_unavailable(name: str, device_type: str, dtype: torch.dtype, dstate: int | None):
    try:
        module = _fused.backend_module(name)
    except ImportError as exc:  # a missing optional dependency (numba, triton)
        return f"it needs a package that failed to import ({exc})"
    reason = module.is_available()
    if reason is None and not module.supports(torch.device(device_type), dtype):
        reason = f"it does not run {dtype} tensors on {device_type}"
    if reason is None and dstate is not None and module.MAX_DSTATE is not None and dstate > module.MAX_DSTATE:
        reason = f"it runs d_state up to {module.MAX_DSTATE}, got {dstate}"
    return reason


#: whether a torch.func transform (vmap, grad, jvp) is running: its tensors are wrapped
_functorch_active = torch._C._are_functorch_transforms_active
#: whether torch.jit.trace is recording (it would not see a kernel called directly)
_jit_tracing = torch._C._is_tracing
#: tensor types the fused backends may be called with directly (not fake or functional tensors)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

class _Signature:
    """_checked's answer for one signature of arguments, and the backend's forward plans for direct calls
    with it (one per return_last_state)."""

    __slots__ = ("shape", "name", "plain", "needs_grad", "plans")

    def __init__(self, shape: ScanShape, name: str, plain: bool, needs_grad: bool):
        self.shape, self.name, self.plain, self.needs_grad = shape, name, plain, needs_grad
        self.plans: dict = {}

    def direct_plan(self, keep_last_state: bool, tensors: tuple):
        """The fused backend's forward for these arguments, run without the registered op (see _checked)."""
        plan = self.plans.get(keep_last_state)
        if plan is None:
            plan = self.plans[keep_last_state] = _fused.backend_module(self.name).forward_plan(
                *tensors, self.shape.window, keep_last_state=keep_last_state, keep_checkpoints=False)
        return plan


#: _checked's answers by what they depend on: each argument's type, shape, strides, dtype, device and
#: requires_grad, the window and the backend asked for. The checks cost about 15 us, as much as the
#: whole scan of one position at dim 1024.
_CHECKED: dict = {}
#: enough for every layer shape of a model at a few lengths; more distinct signatures (e.g. MIL bags of
#: every length) start the table again rather than grow it without bound
_CHECKED_MAX = 4096


def _checked(u, delta, A, B, C, D, z, delta_bias, window, backend, prev_state=None
             ) -> tuple[ScanShape, str, _Signature | None]:
    """(check_scan_args(...), choose_backend(backend, u), direct), from _CHECKED when these arguments'
    signature passed before.

    direct: the signature, whose fused backend may run without the registered op because neither
    autograd, nor torch.compile / export, nor a torch.func transform, nor torch.jit.trace can see this
    call; else None. The
    op's dispatch costs tens of microseconds, which at short lengths was as much as the scan itself.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, prev_state)
    if torch.compiler.is_compiling():  # traced once per graph: nothing to save, and no global state in it
        return check_scan_args(*tensors[:8], window, prev_state), choose_backend(backend, u, A.shape[1]), None
    try:
        key = (type(window), window, backend, *[  # a list, not a generator: 10 % of the look-up
            t if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors])
        answer = _CHECKED.get(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable argument: the checks say what is wrong
        key, answer = None, None
    if answer is None:
        shape = check_scan_args(*tensors[:8], window, prev_state)  # raise on bad input
        name = choose_backend(backend, u, A.shape[1])
        present = [t for t in tensors if t is not None]
        answer = _Signature(shape, name, all(type(t) in _PLAIN_TENSORS for t in present),
                            any(t.requires_grad for t in present))
        if key is not None:
            if len(_CHECKED) >= _CHECKED_MAX:
                _CHECKED.clear()
            _CHECKED[key] = answer
    direct = (answer.plain and not (answer.needs_grad and torch.is_grad_enabled()) and not _functorch_active()
              and not _jit_tracing())
    return answer.shape, answer.name, answer if direct else None


def choose_backend(backend: str, u: torch.Tensor, dstate: int | None = None) -> str:
    """Resolve `backend` ("auto" or a name in BACKENDS) for tensors like `u` (and d_state `dstate`, when
    given); raise if unusable."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        preferred = {"cpu": "cpu", "cuda": "triton"}.get(u.device.type)
        if preferred is not None and _fused_unavailable(preferred, u.device.type, u.dtype, dstate) is None:
            return preferred
        return "torch"
    if backend in _fused.fused_backend_names():
        reason = _fused_unavailable(backend, u.device.type, u.dtype, dstate)
        if reason is not None:
            raise ValueError(f"backend={backend!r} is not available for these inputs: {reason}")
    return backend


#: a function with selective_scan_fn's signature that every call goes to while set (`scan_stand_in`)
_STAND_IN = None


@contextlib.contextmanager
def scan_stand_in(fn):
    """Inside the block, `selective_scan_fn` calls `fn` (same signature) instead: how `lbmamba.export` traces
    models with the scan written in standard ONNX ops. Set here, at the one function every layer calls, so
    that no module's imported name has to be swapped (and none can be missed or left swapped)."""
    global _STAND_IN
    before, _STAND_IN = _STAND_IN, fn
    try:
        yield
    finally:
        _STAND_IN = before


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
    prev_state=None,
    *,
    window="auto",
    position_offset=0,
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
        prev_state: (batch, dim, N) or None: the forward state h^L before position 0 (the last state of
            the previous chunk of a longer sequence), as mamba_ssm's. Unlike mamba_ssm it takes
            gradients: chunked training back-propagates through it.
        window: size W of the local backward windows, a positive int or "auto" (4 / 8 / 16 for
            L <= 128 / <= 256 / longer, as the reference CUDA kernel). window=1 is vanilla Mamba.
            "auto" depends on this call's L: give an int when scanning a sequence in chunks.
        position_offset: the position of u[..., 0] in the whole sequence (int >= 0): windows are aligned
            at whole-sequence multiples of W, so the first window of this call may be the tail of one
            that began in the previous chunk. Chunks cut at multiples of W need no offset.
        backend: "auto", "reference", "torch", "cpu" or "triton".

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state) when return_last_state.
    """
    if _STAND_IN is not None:
        return _STAND_IN(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, prev_state,
                         window=window, position_offset=position_offset, backend=backend)
    shape, name, direct = _checked(u, delta, A, B, C, D, z, delta_bias, window, backend, prev_state)
    if position_offset:
        if isinstance(position_offset, bool) or not isinstance(position_offset, int) or position_offset < 0:
            check_scan_args(u, delta, A, B, C, D, z, delta_bias, window, prev_state, position_offset)  # raises
        head = (-position_offset) % shape.window  # this call's positions before its first aligned window start
        if name == "reference":
            return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      prev_state, window=shape.window, position_offset=position_offset)
        if 0 < head < shape.seqlen:
            return _scan_from_offset(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     prev_state, shape.window, head, name)
        window = shape.window  # aligned at this call's start, or all of it is one window's tail
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  prev_state, window=window)
    if name == "torch" and not _functorch_active():
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    prev_state, window=window)
    if direct is not None:
        keep_last = bool(return_last_state)
        plan = direct.plans.get(keep_last) or direct.direct_plan(keep_last, (u, delta, A, B, C, D, z, delta_bias))
        out, last_state, _ = plan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, prev_state)
    elif _functorch_active():  # torch.func's transforms need Functions with setup_context and a vmap rule
        out, last_state = func_scan(u, delta, A, as_grouped(B), as_grouped(C), D, z, delta_bias, delta_softplus,
                                    prev_state, shape.window, name)
    else:
        out, last_state, _ = _fused.lb_scan_fwd(
            u, delta, A, as_grouped(B), as_grouped(C), D, z, delta_bias, bool(delta_softplus), shape.window, name,
            prev_state)
    return (out, last_state) if return_last_state else out


def _scan_from_offset(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, prev_state, window,
                      head, backend):
    """A call whose first `head` positions (0 < head < L) are the tail of a window begun before it: those
    positions as one call (one window), then the rest from its last state, windows aligned at `head`."""

    def part(t, s):
        return t if t is None or t.dim() == 2 else t[..., s]  # constant B / C: (dim, N), no positions

    first, rest = slice(0, head), slice(head, None)
    out1, state1 = selective_scan_fn(
        part(u, first), part(delta, first), A, part(B, first), part(C, first), D, part(z, first), delta_bias,
        delta_softplus, True, prev_state, window=window, backend=backend)
    out2 = selective_scan_fn(
        part(u, rest), part(delta, rest), A, part(B, rest), part(C, rest), D, part(z, rest), delta_bias,
        delta_softplus, return_last_state, state1, window=window, backend=backend)
    if return_last_state:
        out2, last_state = out2
        return torch.cat([out1, out2], dim=-1), last_state
    return torch.cat([out1, out2], dim=-1)


def available_backends(device="cpu", dtype=torch.float32):
    """Names of the backends that can run tensors of `device` and `dtype` here."""
    device_type = torch.device(device).type
    return ("reference", "torch") + tuple(
        name for name in _fused.fused_backend_names() if _fused_unavailable(name, device_type, dtype) is None
    )

