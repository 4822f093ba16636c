"""VMamba's 2-D selective-scan mixer (SS2D, forward type ``v05_noz``) on the LB scan, and its cross-scan tables.

Channels-first throughout, as VMamba's ``v05_noz`` models run: inputs and outputs are (batch, C, H, W).

The four cross-scan routes of an H x W map (K = 4), each a permutation of the H * W raster positions:

* route 0: row-major (the raster order itself),
* route 1: column-major (down the first column, then the next, ...),
* route 2: route 0 reversed,
* route 3: route 1 reversed.

They are index tables (`cross_scan_tables`), computed once per (H, W, device) and applied with
`index_select` / `gather`; `cross_scan` puts a map into the four orders and `cross_merge` undoes each
route's order and sums the four (VMamba's CrossScan / CrossMerge).

Parameter names and shapes are VMamba's, so its checkpoints load unchanged::

    in_proj.weight   (d_inner, d_model)           "Linear2d": a 1x1 projection stored as a Linear weight;
                                                  (d_inner, d_model, 1, 1) conv weights load too
    conv2d.weight    (d_inner, 1, 3, 3)           depthwise, bias only with conv_bias=True
    x_proj_weight    (K, dt_rank + 2 N, d_inner)  one projection per route
    dt_projs_weight  (K, d_inner, dt_rank)        dt_projs_bias (K, d_inner)
    A_logs           (K * d_inner, N)             Ds (K * d_inner,)
    out_norm.weight / .bias (d_inner)             out_proj.weight (d_model, d_inner)
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import resolve_window, selective_scan_fn
from .mixer import at_least_fp32, init_dt_proj, s4d_real_log
from .tables import table_cache

__all__ = ["SS2D", "Linear2d", "LayerNorm2d", "cross_scan_tables", "cross_scan", "cross_merge", "NUM_ROUTES"]

#: VMamba's cross scan: row-major, column-major, and the two reversed
NUM_ROUTES = 4


@table_cache(maxsize=64)
def cross_scan_tables(height: int, width: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse), both int64 (4, H * W) on `device` (default: the CPU), cached per (H, W, device).

    ``order[k, t]`` is the raster index (h * W + w) of the token that route k visits at step t;
    ``inverse[k, p]`` is the step at which route k visits raster position p, so
    ``order[k, inverse[k, p]] == p``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"the map must have at least one row and one column, got {height} x {width}")
    raster = torch.arange(height * width, dtype=torch.int64)
    column_major = raster.view(height, width).t().reshape(-1)
    order = torch.stack([raster, column_major, raster.flip(0), column_major.flip(0)])
    inverse = torch.argsort(order, dim=1)
    return (order, inverse) if device is None else (order.to(device), inverse.to(device))


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H * W): the map read along the four routes."""
    batch, channels, height, width = x.shape
    order, _ = cross_scan_tables(height, width, x.device)
    xs = x.reshape(batch, channels, height * width).index_select(2, order.reshape(-1))
    return xs.view(batch, channels, NUM_ROUTES, height * width).transpose(1, 2)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4, C, H * W) in route order -> (B, C, H, W): each route put back in raster order, the four summed."""
    batch, routes, channels, length = ys.shape
    if routes != NUM_ROUTES or length != height * width:
        raise ValueError(f"expected (batch, {NUM_ROUTES}, C, {height * width}), got {tuple(ys.shape)}")
    _, inverse = cross_scan_tables(height, width, ys.device)
    index = inverse.view(1, NUM_ROUTES, 1, length).expand(batch, NUM_ROUTES, channels, length)
    return ys.gather(3, index).sum(1).view(batch, channels, height, width)


class Linear2d(nn.Linear):
    """A 1x1 projection of a (B, C, H, W) map, stored as an ``nn.Linear`` (weight (out, in)) as VMamba does.

    A (out, in, 1, 1) convolution weight in a state dict is reshaped on load, so checkpoints that
    stored it either way load.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2:] == (1, 1):
            state_dict[key] = value.reshape(value.shape[:2])
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (VMamba's LayerNorm2d; eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SS2D(nn.Module):
    """VMamba's SS2D mixer, forward type ``v05_noz`` (no z gate), channels-first, on the LB scan.

    in_proj (1x1) -> depthwise conv (d_conv x d_conv) -> SiLU -> cross scan into K = 4 routes ->
    per-route x_proj to (dt, B, C) and dt_projs -> **one** selective-scan call over all routes
    (u / delta (B, K * d_inner, L), B / C grouped (B, K, N, L): channel k * d_inner + d uses route
    k's B and C) -> cross merge -> out_norm (LayerNorm2d) -> out_proj (1x1).

    The LB scan then runs per route: each route is its own block of channels over the same L
    positions, so its windows start at that route's own position 0 (for the reversed routes, at the
    last token of the image). ``window=1`` is VMamba's vanilla scan.

    Args:
        d_model: input / output channels.  d_state: N (VMamba-T / -S: 1).
        ssm_ratio: d_inner = ssm_ratio * d_model.  dt_rank: "auto" = ceil(d_model / 16).
        d_conv: depthwise conv size (3; < 2 means no conv, as VMamba).  conv_bias: its bias (False in v05 models).
        bias: biases of in_proj / out_proj (False in VMamba).
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: initialisation of dt_projs (Mamba's).
        window: the LB window, a positive int or "auto" (1 = VMamba's vanilla scan, the default).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank="auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        window=1,
    ):
        super().__init__()
        resolve_window(window, 1)  # validate early
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = int(math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank)
        self.d_conv = int(d_conv)
        self.window = window
        K, D, R, N = NUM_ROUTES, self.d_inner, self.dt_rank, self.d_state

        self.in_proj = Linear2d(self.d_model, D, bias=bias)
        self.act = nn.SiLU()
        if self.d_conv > 1:
            self.conv2d = nn.Conv2d(D, D, kernel_size=self.d_conv, padding=(self.d_conv - 1) // 2, groups=D,
                                    bias=conv_bias)
        # nn.Linear's default initialisation for each route's projection, as VMamba's stacked Linear layers
        bound = 1.0 / math.sqrt(D)
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D).uniform_(-bound, bound))
        dt_weights, dt_biases = [], []
        for _ in range(K):
            dt_proj = nn.Linear(R, D, bias=True)
            init_dt_proj(dt_proj, R, D, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
            dt_weights.append(dt_proj.weight.detach())
            dt_biases.append(dt_proj.bias.detach())
        self.dt_projs_weight = nn.Parameter(torch.stack(dt_weights))  # (K, D, R)
        self.dt_projs_bias = nn.Parameter(torch.stack(dt_biases))  # (K, D)
        self.A_logs = nn.Parameter(s4d_real_log(D, N).repeat(K, 1))  # (K * D, N)
        self.Ds = nn.Parameter(torch.ones(K * D))
        self.A_logs._no_weight_decay = self.Ds._no_weight_decay = True
        self.out_norm = LayerNorm2d(D)
        self.out_proj = Linear2d(D, self.d_model, bias=bias)

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The SSM part: (B, d_inner, H, W) after conv + SiLU -> (B, d_inner, H, W), before out_norm."""
        batch, D, height, width = x.shape
        K, R, N, L = NUM_ROUTES, self.dt_rank, self.d_state, height * width
        xs = cross_scan(x)  # (B, K, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight.to(xs.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight.to(xs.dtype))
        ys = selective_scan_fn(
            u=xs.reshape(batch, K * D, L),
            delta=dts.reshape(batch, K * D, L),
            A=-torch.exp(at_least_fp32(self.A_logs)),
            B=Bs.contiguous(),
            C=Cs.contiguous(),
            D=at_least_fp32(self.Ds),
            delta_bias=at_least_fp32(self.dt_projs_bias).reshape(-1),
            delta_softplus=True,
            window=self.window,
        )
        return cross_merge(ys.view(batch, K, D, L), height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_model, H, W) -> (B, d_model, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.d_model:
            raise ValueError(f"SS2D expects a (batch, {self.d_model}, H, W) map, got {tuple(x.shape)}")
        x = self.in_proj(x)
        if self.d_conv > 1:
            x = self.conv2d(x)
        y = self.scan(self.act(x))
        return self.out_proj(self.out_norm(y).to(x.dtype))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_inner={self.d_inner}, dt_rank={self.dt_rank}, "
                f"routes={NUM_ROUTES}, window={self.window!r}")
