"""PlainMamba's token mixer (`PlainMamba2D`): a Mamba-1 mixer over a 2-D token grid with four zig-zag scans.

    x, z = in_proj(tokens)                     (with bias)
    x = silu(depthwise conv2d 7 x 7 ("same" padding) of x on the H x W grid)
    dt, B, C = x_proj(x);  delta = dt_proj(dt)
    for each zig-zag order k (see `lbmamba.nn.zigzag_scan`), sharing x_proj, dt_proj, A_log and D:
        y_k = scan(u = x in order k, delta, A, B + direction_Bs[label_k], C, D, delta_bias=dt_proj.bias,
                   softplus)  put back in raster order
    out = out_proj((y_0 + y_1 + y_2 + y_3) * silu(z))   (with bias; D * u therefore counts 4 times)

The four scans run as **one** `selective_scan_fn` call, the directions stacked on the batch axis (they
share A, D and the dt bias); the window is that of one scan (LB windows start at position 0 of each
order).

Two quirks of the official code (ChenhongyiYang/PlainMamba, `PlainMamba2D.forward`) are reproduced by
default, because the released checkpoints were trained with them:

1. `reorder_only_u=True`: only u is put in scan order; delta, B and C stay in raster order, while the
   direction embedding `direction_Bs[label_k[t]]` is indexed by scan position t and added to the raster
   B at position t. `False` puts u, delta, B and C all in scan order (the evident intent).
2. `dt_bias_twice=True`: delta = dt_proj(dt) already includes dt_proj.bias, and the bias is passed to the
   scan again as delta_bias, so softplus sees W dt + 2 bias. `False` applies it once.

Parameter names and shapes are the official ones: `in_proj.{weight,bias}`, `conv2d.{weight,bias}`
(d_inner, 1, 7, 7), `x_proj.weight`, `dt_proj.{weight,bias}`, `A_log` (d_inner, N), `D` (d_inner,),
`direction_Bs` (5, N), `out_proj.{weight,bias}`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..ops import resolve_window, selective_scan_fn
from .mixer import at_least_fp32, init_dt_proj, s4d_real_log
from .tables import table_cache
from .zigzag_scan import NUM_LABELS, NUM_ORDERS, zigzag_tables

__all__ = ["PlainMamba2D", "stacked_zigzag_tables"]


@table_cache(maxsize=64)
def stacked_zigzag_tables(height: int, width: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """(orders (4 L,), inverse (4 L,), labels (4, L)) for the stacked layout of `PlainMamba2D`.

    `x.index_select(-1, orders)` lays the 4 orders of a (..., L) tensor side by side (..., 4 L);
    `y.index_select(-1, inverse)` puts 4 side-by-side scan outputs (..., 4 L) back in raster order each.
    """
    tables = zigzag_tables(height, width, device)
    length = height * width
    offsets = torch.arange(NUM_ORDERS, device=device).unsqueeze(1) * length
    return tables.orders.reshape(-1), (tables.inverse + offsets).reshape(-1), tables.labels


def _in_orders(t: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """(batch, C, L) -> (batch, 4, C, L): t in each of the 4 orders."""
    batch, channels, length = t.shape
    return t.index_select(-1, orders).view(batch, channels, NUM_ORDERS, length).transpose(1, 2)


def _repeat_orders(t: torch.Tensor) -> torch.Tensor:
    """(batch, C, L) -> (batch, 4, C, L): t as it is, once per order."""
    return t.unsqueeze(1).expand(-1, NUM_ORDERS, -1, -1)


class PlainMamba2D(nn.Module):
    """PlainMamba's mixer on (batch, H * W, d_model) tokens in raster order.

    Args:
        d_model: width.  d_state: SSM state size N.  expand: d_inner = expand * d_model.
        dt_rank: "auto" = ceil(d_model / 16).  dt_min, dt_max, dt_init, dt_scale, dt_init_floor: the
            Mamba initialisation of dt_proj (a model-wide init may overwrite it, as PlainMamba's does).
        conv_size: depthwise conv2d kernel (odd; 7 in PlainMamba).  conv_bias: its bias.
        bias: biases of in_proj and out_proj (True in every PlainMamba configuration).
        window: LB window of each scan: 1 = the vanilla Mamba scan (the original PlainMamba), "auto" or an
            int > 1 = the LB scan.
        reorder_only_u: reproduce the official code's quirk 1 (default True, see the module docstring).
        dt_bias_twice: reproduce the official code's quirk 2 (default True).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_size: int = 7,
        conv_bias: bool = True,
        bias: bool = True,
        window=1,
        reorder_only_u: bool = True,
        dt_bias_twice: bool = True,
    ):
        super().__init__()
        if conv_size % 2 != 1:
            raise ValueError(f"conv_size must be odd (a 'same' padded depthwise conv), got {conv_size}")
        resolve_window(window, 1)  # validate early: a positive int or "auto"
        self.d_model = d_model
        self.d_state = d_state
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.conv_size = conv_size
        self.window = window
        self.reorder_only_u = bool(reorder_only_u)
        self.dt_bias_twice = bool(dt_bias_twice)

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv2d = nn.Conv2d(
            self.d_inner, self.d_inner, kernel_size=conv_size, padding=conv_size // 2, groups=self.d_inner,
            bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        init_dt_proj(self.dt_proj, self.dt_rank, self.d_inner, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(s4d_real_log(self.d_inner, d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.direction_Bs = nn.Parameter(torch.zeros(NUM_LABELS, d_state))
        trunc_normal_(self.direction_Bs, std=0.02)
        for p in (self.A_log, self.D, self.direction_Bs):
            p._no_weight_decay = True

    def forward(self, x: torch.Tensor, hw_shape: Tuple[int, int]) -> torch.Tensor:
        """x: (batch, H * W, d_model) in raster order -> (batch, H * W, d_model)."""
        height, width = int(hw_shape[0]), int(hw_shape[1])
        batch, length, channels = x.shape
        if length != height * width or channels != self.d_model:
            raise ValueError(f"{type(self).__name__} expects tokens of shape (batch, {height} * {width}, "
                             f"{self.d_model}) for hw_shape {(height, width)}, got {tuple(x.shape)}")
        d_inner, n = self.d_inner, self.d_state
        xz = self.in_proj(x)
        x, z = xz.chunk(2, dim=-1)
        x = x.transpose(1, 2).reshape(batch, d_inner, height, width)
        x = F.silu(self.conv2d(x)).flatten(2)  # (batch, d_inner, L), raster order
        dt, B, C = torch.split(F.linear(x.transpose(1, 2), self.x_proj.weight), [self.dt_rank, n, n], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight, self.dt_proj.bias if self.dt_bias_twice else None)
        delta, B, C = delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

        orders, inverse, labels = stacked_zigzag_tables(height, width, x.device)
        direction_B = self.direction_Bs[labels].transpose(1, 2).to(B.dtype)  # (4, N, L), by scan position
        u = _in_orders(x, orders)
        if self.reorder_only_u:
            delta, B, C = _repeat_orders(delta), B.unsqueeze(1) + direction_B, _repeat_orders(C)
        else:
            delta, B, C = _in_orders(delta, orders), _in_orders(B, orders) + direction_B, _in_orders(C, orders)
        stacked = batch * NUM_ORDERS
        y = selective_scan_fn(
            u.reshape(stacked, d_inner, length),
            delta.reshape(stacked, d_inner, length),
            -torch.exp(at_least_fp32(self.A_log)),
            B.reshape(stacked, n, length),
            C.reshape(stacked, n, length),
            at_least_fp32(self.D),
            z=None,
            delta_bias=at_least_fp32(self.dt_proj.bias),
            delta_softplus=True,
            window=self.window,
        )
        # (batch * 4, d_inner, L) in scan order -> the 4 side by side, each put back in raster order, summed
        y = y.view(batch, NUM_ORDERS, d_inner, length).transpose(1, 2).reshape(batch, d_inner, NUM_ORDERS * length)
        y = y.index_select(-1, inverse).view(batch, d_inner, NUM_ORDERS, length).sum(2)
        return self.out_proj(y.transpose(1, 2) * F.silu(z))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_inner={self.d_inner}, dt_rank={self.dt_rank}, "
            f"conv_size={self.conv_size}, window={self.window!r}, reorder_only_u={self.reorder_only_u}, "
            f"dt_bias_twice={self.dt_bias_twice}"
        )
