"""Normalisation layers: RMSNorm and the add + norm step of the residual block, in plain PyTorch.

`add_norm` does what mamba_ssm's fused `rms_norm_fn` / `layer_norm_fn` do with ``prenorm=True``:
``residual = residual + x`` (or ``x`` when there is no residual yet), then ``hidden = norm(residual)``.
The normalisation is computed in float32 whatever the input dtype; the normalised output comes back in
``x``'s dtype and the residual stream stays in float32 when ``residual_in_fp32``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RMSNorm", "rms_norm", "add_norm"]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`, written only where the dtype changes: the same tensor in eager mode, and no no-op cast
    node per norm in a torch.export trace (the ONNX export's trace time grows with its node count)."""
    return t if t.dtype == dtype else t.to(dtype)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32, returned in x's dtype."""
    x32 = _cast(x, torch.float32)
    y = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _cast(weight, torch.float32)
    return _cast(y, x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale only (``weight``; no bias), eps 1e-5 by default."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


def _norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply `norm` to `x` in float32 when it is one of the two norms we know how to upcast."""
    if isinstance(norm, RMSNorm):
        return rms_norm(_cast(x, torch.float32), norm.weight, norm.eps)
    if isinstance(norm, nn.LayerNorm):
        weight = _cast(norm.weight, torch.float32) if norm.weight is not None else None
        bias = _cast(norm.bias, torch.float32) if norm.bias is not None else None
        return F.layer_norm(_cast(x, torch.float32), norm.normalized_shape, weight, bias, norm.eps)
    return norm(x)


def add_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    norm: nn.Module,
    residual_in_fp32: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(norm(residual + x), residual + x)``; with ``residual=None`` the new residual is ``x``.

    The returned residual is float32 when ``residual_in_fp32`` (else it keeps the promoted dtype of the
    sum); the normalised tensor has ``x``'s dtype.
    """
    residual = x if residual is None else residual + x
    if residual_in_fp32:
        residual = _cast(residual, torch.float32)
    hidden = _cast(_norm_fp32(norm, residual), x.dtype)
    return hidden, residual
