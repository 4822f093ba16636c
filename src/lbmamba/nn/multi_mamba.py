"""LocalMamba's `MultiMamba` mixer: one Mamba-1 branch per scan direction, with a shared channel gate.

For a layer with directions d_0..d_{K-1} (see `lbmamba.nn.local_scan`), on tokens (batch, L, d_model):

1. ``xz = in_proj(tokens)`` (shared, no bias), split later into x and z (d_inner each).
2. For each direction k: put xz (x **and** z) in d_k's order (padded with zero tokens for windowed
   directions, the middle class token re-inserted at index (L - 1) // 2), then the ordinary Mamba-1
   branch with the direction's own parameters: causal depthwise ``conv1d_k`` + SiLU on x,
   ``x_proj_k`` -> (dt, B, C), ``dt_proj_k`` (its bias as the scan's delta_bias, softplus), the scan
   with ``A_log_k``, ``D_k`` and the SiLU(z) gate; the output is put back in token order.
3. Each direction's output goes through the shared channel gate ``attn``: LayerNorm, mean over the
   tokens, Linear(d_inner -> d_inner / 8), GELU, Linear(-> d_inner), sigmoid, times the output.
4. The K gated outputs are summed and projected by ``out_proj`` (shared, no bias).

Parameter names are the official ones (``A_log_{k}``, ``D_{k}``, ``conv1d_{k}.*``, ``x_proj_{k}.weight``,
``dt_proj_{k}.*``, ``in_proj.weight``, ``out_proj.weight``, ``attn.norm.*``, ``attn.global_reduce.*``,
``attn.channel_select.*``). The scan is the LB scan with `window` ("auto": the window follows each
direction's own sequence length, padded length and class token included); window 1 is the official
(vanilla Mamba-1) scan. Directions whose sequences have the same length run as **one** scan call, the
directions stacked on the channel axis (A, D, delta_bias concatenated, B / C grouped with one group per
direction); the convolutions and projections of those directions are batched the same way.

In the official code the four ``A_log_k`` of a layer are created from one tensor and share its storage
until the model is moved to another device or dtype (its training script moves it to the GPU first, so
they train independently). Here they are independent from the start, with the same initial values.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import resolve_window, selective_scan_fn
from .local_scan import V_REVERSE, ScanPlan, device_plan, parse_direction
from .mixer import at_least_fp32, init_dt_proj, s4d_real_log

__all__ = ["MultiMamba", "ChannelGate", "causal_depthwise_conv1d"]


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Mamba's causal depthwise convolution of x (batch, channels, L) with weight (channels, 1, width):
    y_t = bias + sum_j weight[:, 0, j] * x_{t - width + 1 + j} (zeros before the start).

    On the CPU it is computed as `width` shifted multiply-adds, several times faster there than the
    (mkldnn) grouped convolution at these sizes; elsewhere it is `F.conv1d`.
    """
    width, seqlen = weight.shape[-1], x.shape[-1]
    if x.device.type != "cpu":
        return F.conv1d(x, weight, bias, padding=width - 1, groups=x.shape[1])[..., :seqlen]
    xp = F.pad(x, (width - 1, 0))
    w = weight[:, 0, :].to(x.dtype)
    y = xp[..., 0:seqlen] * w[:, 0:1]
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    for j in range(1, width):
        y = torch.addcmul(y, xp[..., j:j + seqlen], w[:, j:j + 1])
    return y


class ChannelGate(nn.Module):
    """LocalMamba's `BiAttn` channel gate on (..., L, C): x * sigmoid(channel_select(GELU(global_reduce(
    mean_L(norm(x)))))). Names as in the official code: ``norm`` (LayerNorm, eps 1e-5),
    ``global_reduce`` (C -> int(C * act_ratio)), ``channel_select`` (-> C)."""

    def __init__(self, in_channels: int, act_ratio: float = 0.125, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        reduce_channels = int(in_channels * act_ratio)
        self.norm = nn.LayerNorm(in_channels, **factory)
        self.global_reduce = nn.Linear(in_channels, reduce_channels, **factory)
        self.act_fn = nn.GELU()
        self.channel_select = nn.Linear(reduce_channels, in_channels, **factory)
        self.gate_fn = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(x).mean(dim=-2, keepdim=True)
        return x * self.gate_fn(self.channel_select(self.act_fn(self.global_reduce(pooled))))


class MultiMamba(nn.Module):
    """LocalMamba's multi-direction Mamba-1 mixer, with the LB scan (see the module docstring).

    Args:
        d_model: model width.  directions: this layer's scan directions, e.g. ("h", "v_flip", "w7", "w7_flip").
        d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, conv_bias,
            bias: as in `lbmamba.nn.Mamba` (and the official MultiMamba).
        window: the LB window, a positive int or "auto" (default); 1 is the official (vanilla) scan.
        class_token: the tokens hold LocalVim's middle class token at index (L - 1) // 2.
        v_reverse: "exact" (default) or "official": the reference code's v / v_flip reverse, which is the
            inverse of the v order only on square grids (see `lbmamba.nn.local_scan`).
        attn_ratio: the channel gate's reduction (official 0.125).
        layer_idx: kept for API compatibility (unused).

    forward(hidden_states (batch, L, d_model), grid (H, W)) -> (batch, L, d_model); L = H * W (+ 1 with
    the class token).
    """

    def __init__(
        self,
        d_model: int,
        directions: Sequence[str] = ("h", "h_flip", "w2", "w2_flip"),
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
        window="auto",
        class_token: bool = False,
        v_reverse: str = "exact",
        attn_ratio: float = 0.125,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        resolve_window(window, 1)  # validate early
        if v_reverse not in V_REVERSE:
            raise ValueError(f"v_reverse must be one of {V_REVERSE}, got {v_reverse!r}")
        if isinstance(directions, str) or len(directions) == 0:
            raise ValueError(f"directions must be a non-empty list of direction names, got {directions!r}")
        for d in directions:
            parse_direction(d)
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.directions = tuple(directions)
        self.window = window
        self.class_token = bool(class_token)
        self.v_reverse = v_reverse
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        for k in range(len(self.directions)):
            A_log = nn.Parameter(s4d_real_log(self.d_inner, d_state, device=device))
            A_log._no_weight_decay = True
            setattr(self, f"A_log_{k}", A_log)
            setattr(self, f"conv1d_{k}", nn.Conv1d(
                self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1,
                bias=conv_bias, **factory))
            setattr(self, f"x_proj_{k}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
            init_dt_proj(dt_proj, self.dt_rank, self.d_inner, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
            dt_proj.bias._no_reinit = True
            setattr(self, f"dt_proj_{k}", dt_proj)
            D = nn.Parameter(torch.ones(self.d_inner, device=device, dtype=torch.float32))
            D._no_weight_decay = True
            setattr(self, f"D_{k}", D)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.attn = ChannelGate(self.d_inner, attn_ratio, **factory)

    # ------------------------------------------------------------------ tables
    def plan(self, grid: Tuple[int, int], device=None) -> ScanPlan:
        """The scan tables for this layer on an H x W grid, on `device` (cached per grid and device)."""
        return device_plan(self.directions, int(grid[0]), int(grid[1]), self.class_token, self.v_reverse,
                           torch.device(device if device is not None else "cpu"))

    # ------------------------------------------------------------------ forward
    def _params(self, name: str, indices: Sequence[int]):
        return [getattr(self, f"{name}_{k}") for k in indices]

    def scan_directions(self, seq: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Run the Mamba-1 branches of directions `indices` on their ordered inputs in one scan call.

        seq: (batch, k, L', 2 d_inner), direction j's xz in its scan order. Returns (batch, k, d_inner, L').
        """
        batch, k, seqlen, _ = seq.shape
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        x, z = seq.split(d, dim=-1)
        x = x.permute(0, 1, 3, 2).reshape(batch, k * d, seqlen)
        z = z.permute(0, 1, 3, 2).reshape(batch, k * d, seqlen)
        convs = self._params("conv1d", indices)
        conv_w = torch.cat([c.weight for c in convs])
        conv_b = torch.cat([c.bias for c in convs]) if convs[0].bias is not None else None
        x = F.silu(causal_depthwise_conv1d(x, conv_w, conv_b))
        x_proj_w = torch.stack([p.weight for p in self._params("x_proj", indices)])  # (k, r + 2n, d)
        x_dbl = torch.matmul(x.view(batch, k, d, seqlen).transpose(2, 3), x_proj_w.transpose(1, 2))  # (b, k, L', r+2n)
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        dt_projs = self._params("dt_proj", indices)
        dt_w = torch.stack([p.weight for p in dt_projs])  # (k, d, r)
        delta = torch.matmul(dt_w, dt.transpose(2, 3)).reshape(batch, k * d, seqlen)
        A = -torch.exp(at_least_fp32(torch.cat(self._params("A_log", indices))))
        D = at_least_fp32(torch.cat(self._params("D", indices)))
        delta_bias = at_least_fp32(torch.cat([p.bias for p in dt_projs]))
        y = selective_scan_fn(
            x, delta, A, B.transpose(2, 3), C.transpose(2, 3), D, z=z, delta_bias=delta_bias,
            delta_softplus=True, window=self.window,
        )
        return y.view(batch, k, d, seqlen)

    def forward(self, hidden_states: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"MultiMamba expects hidden_states of shape (batch, L, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        plan = self.plan(grid, hidden_states.device)
        batch, num_tokens, _ = hidden_states.shape
        if num_tokens != plan.num_tokens:
            raise ValueError(
                f"MultiMamba got {num_tokens} tokens for a {grid[0]} x {grid[1]} grid"
                f"{' with a class token' if self.class_token else ''} ({plan.num_tokens} expected)"
            )
        xz = self.in_proj(hidden_states)
        if plan.padded:
            xz = F.pad(xz, (0, 0, 0, 1))  # one zero token at the end: the padding of windowed directions
        outs = [None] * len(self.directions)
        for group in plan.groups:
            k = len(group.indices)
            seq = xz.index_select(1, group.gather.reshape(-1)).view(batch, k, group.seqlen, -1)
            y = self.scan_directions(seq, group.indices)  # (b, k, d, L')
            index = group.scatter.view(1, k, 1, num_tokens).expand(batch, k, self.d_inner, num_tokens)
            y = torch.gather(y, 3, index)  # back in token order (b, k, d, L)
            if len(plan.groups) == 1:  # one group holds every direction, in order
                outs = y
                break
            for j, i in enumerate(group.indices):
                outs[i] = y[:, j]
        y = (outs if torch.is_tensor(outs) else torch.stack(outs, dim=1)).transpose(2, 3)  # (b, K, L, d)
        y = self.attn(y).sum(dim=1)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_inner={self.d_inner}, dt_rank={self.dt_rank}, "
            f"directions={list(self.directions)}, window={self.window!r}, class_token={self.class_token}"
        )
