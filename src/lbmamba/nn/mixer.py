"""The Mamba-1 token mixer, with the LB scan, the plain forward scan, or Vim's bidirectional ("v2") pair.

Parameter names and shapes match mamba_ssm's / Vim's `Mamba` module so that their checkpoints load
without renaming (see docs/models.md):

    in_proj.weight (2 d_inner, d_model)       conv1d.weight (d_inner, 1, d_conv), conv1d.bias
    x_proj.weight (dt_rank + 2 N, d_inner)    dt_proj.weight (d_inner, dt_rank), dt_proj.bias
    A_log (d_inner, N)   D (d_inner)          out_proj.weight (d_model, d_inner)
    scan="bi" adds A_b_log, conv1d_b.*, x_proj_b.weight, dt_proj_b.*, D_b.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import resolve_window, selective_scan_fn

__all__ = ["Mamba", "SCAN_TYPES"]

#: "lb": one LB scan with the given window; "forward": window 1 (vanilla Mamba-1);
#: "bi": Vim's v2 mixer, a second independent branch over the flipped sequence (two vanilla scans).
SCAN_TYPES = ("lb", "forward", "bi")


def init_dt_proj(dt_proj: nn.Linear, dt_rank: int, d_inner: int, dt_min, dt_max, dt_init, dt_scale, dt_init_floor):
    """dt_proj.weight uniform in ±dt_scale·dt_rank^-0.5 (or constant); bias = softplus^-1(log-uniform dt)."""
    std = dt_rank**-0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            dt_proj.weight.fill_(std)
        elif dt_init == "random":
            dt_proj.weight.uniform_(-std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        device = dt_proj.bias.device
        dt = torch.exp(
            torch.rand(d_inner, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        dt_proj.bias.copy_(inv_dt)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """float32 for the low-precision dtypes (the scan wants fp32 A / D / delta_bias); float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def s4d_real_log(d_inner: int, d_state: int, device=None) -> torch.Tensor:
    """log(1..N) for every channel (S4D-real), float32."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
    return torch.log(A).expand(d_inner, d_state).contiguous()


class Mamba(nn.Module):
    """Mamba-1 mixer on (batch, L, d_model) inputs.

    Args:
        d_model: model width.  d_state: SSM state size N.  d_conv: depthwise causal conv width.
        expand: d_inner = expand * d_model.  dt_rank: "auto" = ceil(d_model / 16).
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: initialisation of the dt projection.
        conv_bias, bias: biases of conv1d and of in_proj / out_proj.
        scan: "lb" (LB scan with `window`), "forward" (window 1, plain Mamba-1) or "bi" (Vim v2).
        window: the LB window, a positive int or "auto" (used by scan="lb" only).
        if_divide_out: scan="bi" only, combine the two directions as (y_f + y_b) / 2.
        layer_idx: kept for API compatibility with mamba_ssm (unused).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan: str = "lb",
        window="auto",
        if_divide_out: bool = True,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if scan not in SCAN_TYPES:
            raise ValueError(f"scan must be one of {SCAN_TYPES}, got {scan!r}")
        resolve_window(window, 1)  # validate early: a positive int or "auto"
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan = scan
        self.window = window if scan == "lb" else 1
        self.if_divide_out = if_divide_out
        self.layer_idx = layer_idx

        # what every scan branch is built from (this one and any extra: scan="bi", SRMamba)
        self._branch_init = dict(conv_bias=conv_bias, dt_min=dt_min, dt_max=dt_max, dt_init=dt_init,
                                 dt_scale=dt_scale, dt_init_floor=dt_init_floor, factory=factory)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.add_branch("")
        if scan == "bi":
            self.add_branch("_b")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def add_branch(self, suffix: str) -> None:
        """Create one scan branch's modules and parameters under the reference names: `conv1d{suffix}`,
        `x_proj{suffix}`, `dt_proj{suffix}`, `A{suffix}_log`, `D{suffix}` (suffix "" is the main branch;
        Vim's backward branch and SRMamba's re-ordered one use "_b"), initialised as the main one."""
        init = self._branch_init
        factory = init["factory"]
        conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
            padding=self.d_conv - 1, bias=init["conv_bias"], **factory,
        )
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        init_dt_proj(dt_proj, self.dt_rank, self.d_inner, init["dt_min"], init["dt_max"], init["dt_init"],
                      init["dt_scale"], init["dt_init_floor"])
        A_log = nn.Parameter(s4d_real_log(self.d_inner, self.d_state, device=factory["device"]))
        D = nn.Parameter(torch.ones(self.d_inner, device=factory["device"], dtype=torch.float32))
        A_log._no_weight_decay = D._no_weight_decay = True
        setattr(self, f"conv1d{suffix}", conv1d)
        setattr(self, f"x_proj{suffix}", x_proj)
        if not suffix:
            # a model-wide init that zeroes Linear biases leaves this one alone (mamba_ssm's mark); Vim's
            # backward branch carries no mark, so Vim's init zeroes its bias (backward step sizes start at
            # softplus(0))
            dt_proj.bias._no_reinit = True
        setattr(self, f"dt_proj{suffix}", dt_proj)
        setattr(self, f"A{suffix}_log", A_log)
        setattr(self, f"D{suffix}", D)

    def branch(self, suffix: str = "") -> tuple:
        """(conv1d, x_proj, dt_proj, A_log, D) of the branch made by `add_branch(suffix)`."""
        return tuple(getattr(self, f"{name}{suffix}") for name in ("conv1d", "x_proj", "dt_proj")) + (
            getattr(self, f"A{suffix}_log"), getattr(self, f"D{suffix}"))

    def project_in(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj of (batch, L, d_model) hidden states, as xz (batch, 2 d_inner, L) for `ssm_branch`."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__} expects hidden_states of shape (batch, L, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        return self.in_proj(hidden_states).transpose(1, 2)

    def ssm_branch(self, xz, conv1d, x_proj, dt_proj, A_log, D, window):
        """One direction: conv -> silu -> x_proj -> (dt, B, C) -> scan with the silu(z) gate.

        xz: (batch, 2 d_inner, L). Returns y (batch, d_inner, L), before out_proj.
        """
        seqlen = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(F.conv1d(x, conv1d.weight, conv1d.bias, padding=self.d_conv - 1, groups=self.d_inner)[..., :seqlen])
        x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)  # (batch, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (batch, d_inner, L)
        A = -torch.exp(at_least_fp32(A_log))
        return selective_scan_fn(
            x,
            delta,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            at_least_fp32(D),
            z=z,
            delta_bias=at_least_fp32(dt_proj.bias),
            delta_softplus=True,
            window=window,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model)."""
        xz = self.project_in(hidden_states)
        y = self.ssm_branch(xz, *self.branch(), self.window)
        if self.scan == "bi":
            y_b = self.ssm_branch(xz.flip(-1), *self.branch("_b"), 1).flip(-1)
            y = y + y_b
            if self.if_divide_out:
                y = y / 2
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_inner={self.d_inner}, dt_rank={self.dt_rank}, "
            f"scan={self.scan!r}, window={self.window!r}"
        )
