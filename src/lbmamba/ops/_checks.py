"""Argument checking and normalisation shared by every scan backend.

Every public entry point runs `check_scan_args` first, so a user gets the same clear error whichever
backend would have run, and backends can assume canonical shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: dtypes accepted for u / delta / z and variable B / C. Arithmetic is fp32 inside for the three
#: training dtypes; float64 runs in float64 (for gradcheck and ground truth).
SCAN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def resolve_window(window, seqlen: int) -> int:
    """Return the window size W used for a sequence of `seqlen` positions.

    `"auto"` reproduces the reference CUDA kernel: 4 up to 128 positions, 8 up to 256, 16 beyond.
    """
    if isinstance(window, str):
        if window != "auto":
            raise ValueError(f"window must be a positive int or 'auto', got the string {window!r}")
        if seqlen <= 128:
            return 4
        if seqlen <= 256:
            return 8
        return 16
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be a positive int or 'auto', got {window!r} of type {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (1 is the vanilla Mamba scan), got {window}")
    return window


@dataclass(frozen=True)
class ScanShape:
    batch: int
    dim: int
    seqlen: int
    dstate: int
    #: "constant" (dim, N) or "grouped" (batch, G, N, L); variable (batch, N, L) is grouped with G = 1.
    b_form: str
    c_form: str
    b_groups: int
    c_groups: int
    window: int


def _check_float(name: str, t: torch.Tensor, allowed=SCAN_DTYPES) -> None:
    if t.is_complex():
        raise TypeError(
            f"{name} is complex ({t.dtype}); complex scans are not supported by lbmamba: pass a real tensor"
        )
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def _bc_form(name: str, t: torch.Tensor, batch: int, dim: int, seqlen: int, dstate: int):
    """Classify B or C; return (form, groups)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_float(name, t)
    if t.dim() == 2:
        if tuple(t.shape) != (dim, dstate):
            raise ValueError(f"{name} given as constant (dim, N) must have shape ({dim}, {dstate}), "
                             f"got {tuple(t.shape)}")
        return "constant", 1
    if t.dim() == 3:
        if tuple(t.shape) != (batch, dstate, seqlen):
            raise ValueError(
                f"{name} given as variable (batch, N, L) must have shape ({batch}, {dstate}, {seqlen}), "
                f"got {tuple(t.shape)}"
            )
        return "grouped", 1
    if t.dim() == 4:
        b, g, n, l = t.shape
        if (b, n, l) != (batch, dstate, seqlen):
            raise ValueError(
                f"{name} given as grouped (batch, G, N, L) must have shape ({batch}, G, {dstate}, {seqlen}), "
                f"got {tuple(t.shape)}"
            )
        if g < 1 or dim % g != 0:
            raise ValueError(f"{name} has {g} groups, but dim {dim} is not divisible by the number of groups")
        return "grouped", g
    raise ValueError(
        f"{name} must be constant (dim, N), variable (batch, N, L) or grouped (batch, G, N, L); "
        f"got rank {t.dim()} with shape {tuple(t.shape)}"
    )


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, window="auto", prev_state=None,
                    position_offset=0) -> ScanShape:
    """Validate the arguments of a selective scan; raise TypeError / ValueError naming the culprit."""
    for name, t in (("u", u), ("delta", delta), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got rank {u.dim()} with shape {tuple(u.shape)}")
    _check_float("u", u)
    batch, dim, seqlen = u.shape
    if seqlen < 1:
        raise ValueError(f"u must have at least one position (L >= 1), got shape {tuple(u.shape)}")
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"delta must have the same shape as u {tuple(u.shape)}, got {tuple(delta.shape)}")
    _check_float("delta", delta)
    if A.is_complex():
        raise TypeError(f"A is complex ({A.dtype}); complex A is not supported by lbmamba: pass a real (dim, N) tensor")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, N), got {tuple(A.shape)}")
    _check_float("A", A, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    dstate = A.shape[1]
    if dstate < 1:
        raise ValueError(f"A must have at least one state (N >= 1), got shape {tuple(A.shape)}")
    b_form, b_groups = _bc_form("B", B, batch, dim, seqlen, dstate)
    c_form, c_groups = _bc_form("C", C, batch, dim, seqlen, dstate)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        _check_float(name, t)
        if tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must have shape (dim,) = ({dim},), got {tuple(t.shape)}")
    if z is not None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor or None, got {type(z).__name__}")
        _check_float("z", z)
        if tuple(z.shape) != tuple(u.shape):
            raise ValueError(f"z must have the same shape as u {tuple(u.shape)}, got {tuple(z.shape)}")
    if prev_state is not None:
        if not isinstance(prev_state, torch.Tensor):
            raise TypeError(f"prev_state must be a torch.Tensor or None, got {type(prev_state).__name__}")
        _check_float("prev_state", prev_state)
        if tuple(prev_state.shape) != (batch, dim, dstate):
            raise ValueError(f"prev_state must have shape (batch, dim, N) = ({batch}, {dim}, {dstate}), "
                             f"got {tuple(prev_state.shape)}")
    if isinstance(position_offset, bool) or not isinstance(position_offset, int) or position_offset < 0:
        raise ValueError(f"position_offset must be an int >= 0 (the position of u[..., 0] in the whole sequence), "
                         f"got {position_offset!r}")
    # the per-position tensors share u's dtype (as mamba_ssm requires): a silent cast would change what is computed
    per_position = [("delta", delta), ("z", z)] + [(n, t) for n, t in (("B", B), ("C", C)) if t.dim() >= 3]
    others = [f"{n} is {t.dtype}" for n, t in per_position if t is not None and t.dtype != u.dtype]
    if others:
        raise TypeError(f"u, delta, z and variable B / C must have one dtype: u is {u.dtype} but {', '.join(others)}; "
                        "convert them first, e.g. delta.to(u.dtype)")
    tensors = [("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias),
               ("prev_state", prev_state)]
    devices = {name: t.device for name, t in tensors if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return ScanShape(batch, dim, seqlen, dstate, b_form, c_form, b_groups, c_groups, resolve_window(window, seqlen))


def as_grouped(t: torch.Tensor) -> torch.Tensor:
    """View variable (batch, N, L) B/C as grouped with one group; leave other forms alone."""
    return t.unsqueeze(1) if t.dim() == 3 else t
