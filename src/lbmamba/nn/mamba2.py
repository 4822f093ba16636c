"""The Mamba-2 token mixer (as used by Adventurer), run through the LB selective scan.

Parameter names and shapes are those of mamba_ssm's `Mamba2` (and Adventurer's `MambaCustom`), so
their checkpoints load without renaming:

    in_proj.weight (2 d_inner + 2 G N + H, d_model)   rows in the order [z, x, B, C, dt]
    conv1d.weight (d_inner + 2 G N, 1, d_conv), conv1d.bias
    dt_bias (H)   A_log (H)   D (H)                    one value per head
    norm.weight (d_inner)                              gated RMSNorm, norm(y * silu(z))
    out_proj.weight (d_model, d_inner)

with H = d_inner / headdim heads, G groups of B / C and N = d_state.

Mamba-2's scan (SSD) is a Mamba-1 selective scan whose per-head values are shared by the head's
`headdim` channels: with u = x as (batch, d_inner, L), delta = dt repeated over each head's channels,
A[d, n] = -exp(A_log[head(d)]) for every n, B and C grouped (batch, G, N, L) (channel d reads group
d // (d_inner / G), which is its head's group), D and delta_bias repeated per channel. The two are
the same computation, so `selective_scan_fn` runs it exactly, with window 1 (Mamba-2 itself) or an
LB window. The cost is that of an N-state Mamba-1 scan over d_inner channels (N = 64 here, four times
Vim's 16): the op does not use the head-wise sharing that makes Mamba-2's own kernels fast.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import resolve_window, selective_scan_fn
from .mixer import at_least_fp32

__all__ = ["Mamba2", "RMSNormGated", "gated_rms_norm", "head_repeat"]


def gated_rms_norm(
    x: torch.Tensor,
    z: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    eps: float = 1e-5,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """mamba_ssm's gated RMSNorm over the last dimension, in float32 (float64 stays float64), returned in
    x's dtype.

    norm_before_gate=False (Mamba-2's default): rms_norm(x * silu(z)) * weight; True:
    rms_norm(x) * weight * silu(z). The mean of squares is taken over groups of `group_size` channels
    (None: all of them).
    """
    dtype = x.dtype
    x = at_least_fp32(x)
    if z is not None:
        z = z.to(x.dtype)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    size = x.shape[-1] if group_size is None else group_size
    if x.shape[-1] % size:
        raise ValueError(f"group_size {size} does not divide the normalised dimension {x.shape[-1]}")
    grouped = x.unflatten(-1, (x.shape[-1] // size, size))
    y = (grouped * torch.rsqrt(grouped.square().mean(dim=-1, keepdim=True) + eps)).flatten(-2)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if z is not None and norm_before_gate:
        y = y * F.silu(z)
    return y.to(dtype)


class RMSNormGated(nn.Module):
    """Gated RMSNorm with a learned scale `weight` (mamba_ssm.ops.triton.layernorm_gated.RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = False, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")


def head_repeat(t: torch.Tensor, headdim: int, dim: int = 0) -> torch.Tensor:
    """Repeat each entry along `dim` headdim times: per-head values -> per-channel values
    (channel d = head * headdim + p reads head d // headdim)."""
    return torch.repeat_interleave(t, headdim, dim=dim)


def _inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """softplus^-1 of n step sizes drawn log-uniformly in [dt_min, dt_max], floored at dt_init_floor
    (Mamba-2's dt_bias initialisation; the same draw as Mamba-1's dt_proj bias)."""
    dt = torch.exp(
        torch.rand(n, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2(nn.Module):
    """Mamba-2 mixer on (batch, L, d_model) inputs, with the LB scan.

    in_proj -> (z, xBC, dt); causal depthwise conv1d + SiLU on xBC -> (x, B, C); the selective scan
    with per-head A, D and dt_bias (delta = softplus(dt + dt_bias)); the gated RMSNorm norm(y * silu(z));
    out_proj. Defaults are mamba_ssm's Mamba2 / Adventurer's MambaCustom.

    Args:
        d_model: model width.  d_state: N.  d_conv: conv width.  expand: d_inner = expand * d_model.
        headdim: channels per head (d_inner must be a multiple).  ngroups: groups of B / C.
        A_init_range: A_log = log(uniform(A_init_range)) per head.
        dt_min, dt_max, dt_init_floor: dt_bias = softplus^-1(log-uniform dt in [dt_min, dt_max]).
        dt_limit: (lo, hi) clamp of softplus(dt + dt_bias); the default (0, inf) applies none (as Mamba-2).
        conv_bias, bias: biases of conv1d (yes) and of in_proj / out_proj (no).
        norm_eps, norm_before_gate: the gated RMSNorm (eps 1e-5, norm(y * silu(z))).
        window: the scan's window: 1 is Mamba-2's own scan; an int W > 1 or "auto" (4 / 8 / 16 for
            L <= 128 / <= 256 / longer) the LB scan.
        layer_idx: kept for API compatibility with mamba_ssm (unused).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: Tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: Tuple[float, float] = (0.0, float("inf")),
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        norm_before_gate: bool = False,
        window=1,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        resolve_window(window, 1)  # validate early: a positive int or "auto"
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"d_inner = expand * d_model = {self.d_inner} is not a multiple of headdim {headdim}")
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups {ngroups} does not divide the number of heads {self.nheads}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.ngroups = ngroups
        self.dt_limit = tuple(dt_limit)
        self.window = window
        self.layer_idx = layer_idx
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(_inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device))
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.nheads, device=device))
        self.dt_bias._no_weight_decay = self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.norm = RMSNormGated(self.d_inner, eps=norm_eps, group_size=self.d_inner // ngroups,
                                 norm_before_gate=norm_before_gate, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def scan_inputs(self, hidden_states: torch.Tensor):
        """Everything the scan reads, in `selective_scan_fn`'s layout, and the gate z.

        Returns (u, delta, A, B, C, D, delta_bias, delta_softplus, z): u, delta (batch, d_inner, L);
        A (d_inner, N); B, C (batch, G, N, L); D, delta_bias (d_inner,) or None; z (batch, L, d_inner).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects hidden_states of shape (batch, L, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        gn = self.ngroups * self.d_state
        z, xBC, dt = torch.split(self.in_proj(hidden_states), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = F.conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, padding=self.d_conv - 1,
                       groups=self.conv_dim)[..., :seqlen]
        x, B, C = torch.split(F.silu(xBC), [self.d_inner, gn, gn], dim=1)  # (batch, ., L)
        B = B.unflatten(1, (self.ngroups, self.d_state))
        C = C.unflatten(1, (self.ngroups, self.d_state))
        dt = head_repeat(dt.transpose(1, 2), self.headdim, dim=1)  # (batch, d_inner, L)
        A = -torch.exp(at_least_fp32(self.A_log))
        A = head_repeat(A, self.headdim).unsqueeze(1).expand(self.d_inner, self.d_state)
        D = head_repeat(at_least_fp32(self.D), self.headdim)
        dt_bias = head_repeat(at_least_fp32(self.dt_bias), self.headdim)
        if self.dt_limit != (0.0, float("inf")):
            # the clamp sits after the softplus: apply both here and hand the scan the final step sizes
            delta = F.softplus(at_least_fp32(dt) + dt_bias[:, None]).clamp(*self.dt_limit).to(dt.dtype)
            return x, delta, A, B, C, D, None, False, z
        return x, dt, A, B, C, D, dt_bias, True, z

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model)."""
        u, delta, A, B, C, D, delta_bias, softplus, z = self.scan_inputs(hidden_states)
        y = selective_scan_fn(u, delta, A, B, C, D, z=None, delta_bias=delta_bias, delta_softplus=softplus,
                              window=self.window)
        return self.out_proj(self.norm(y.transpose(1, 2), z))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_inner={self.d_inner}, nheads={self.nheads}, "
                f"headdim={self.headdim}, ngroups={self.ngroups}, window={self.window!r}")
