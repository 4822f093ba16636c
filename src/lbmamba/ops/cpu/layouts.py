"""The cpu backend's tensors as the kernels read and write them: the compute dtype, numpy views,
(batch, L, dim) or (batch, dim, L) layouts, B / C constant or grouped, placeholders for absent inputs,
and the task blocks. Shared by the forward's plans (plans.py) and the backward (__init__.py).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .kernels import _blocks, block_width


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _np(t: torch.Tensor, dtype: torch.dtype, axes: tuple | None = None) -> np.ndarray:
    """t detached, in the compute dtype, axes permuted by `axes` (as numpy.transpose), as a C-contiguous
    array: copied only when it is not one already. Each step only when needed, and
    views taken in numpy: each of torch's no-op .to(), .transpose() and .contiguous() costs about a
    microsecond, and a short call makes a dozen of these."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    array = t.numpy()  # a view, strided like t
    if axes is not None:
        array = array.transpose(axes)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _bc_kernel_layout(t: torch.Tensor, dtype: torch.dtype):
    """(constant, grouped): constant (dim, N) as it is and None when B / C is grouped; grouped
    (batch, G, N, L) or variable (batch, N, L) as (batch, G, L, N), a small placeholder with the right
    rank when constant."""
    rank = t.dim()
    if rank == 2:
        return _np(t, dtype), _placeholder(4, dtype)
    if rank == 3:  # one group: the view taken in numpy, a third of the cost of torch's unsqueeze
        return None, _np(t, dtype, (0, 2, 1))[:, None]
    return None, _np(t, dtype, (0, 1, 3, 2))


@functools.lru_cache(maxsize=16)
def _placeholder(rank: int, dtype: torch.dtype) -> np.ndarray:
    """A one-element array of this rank, for an absent input."""
    return _shared_zeros((1,) * rank, dtype)


@functools.lru_cache(maxsize=64)
def _shared_zeros(shape: tuple, dtype: torch.dtype) -> np.ndarray:
    """Zeros standing in for an absent input (shared between calls: never written)."""
    return np.zeros(shape, dtype=_np_dtype(dtype))


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def _kernel_layout(t, dtype: torch.dtype):
    """(array, channels_last): a (batch, dim, L) tensor as the kernels read it, in the compute dtype:
    as (batch, L, dim) when channels are its fastest axis (the Mamba mixer's delta and z), else as
    (batch, dim, L); contiguous, copied only if it is not already. The kernels transpose blocks as
    they load them, so either layout is read without a transposed copy of the whole tensor. None (no
    z): a placeholder of the right rank."""
    if t is None:
        return _placeholder(3, dtype), False
    channels_last, convert = _sequence_layout(t, dtype)  # the forward's rule, so both read alike
    if convert:
        t = _as_compute(t, dtype, channels_last)
    elif channels_last:
        t = t.transpose(1, 2)
    return _np(t, dtype), channels_last


def _per_channel(t, dim: int, dtype: torch.dtype) -> np.ndarray:
    """D or delta_bias as a (dim,) array; zeros when absent."""
    return _np(t, dtype) if t is not None else _shared_zeros((dim,), dtype)


def _tasks(batch: int, dim: int, Bg: np.ndarray, Cg: np.ndarray, threads: int):
    width = block_width(batch, dim, threads)
    return width, _blocks(dim, width, Bg.shape[1], Cg.shape[1])


def _as_compute(t: torch.Tensor, ct: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """t in the compute dtype, C-contiguous; a (batch, dim, L) tensor as (batch, L, dim) when channels_last."""
    if channels_last:
        t = t.transpose(1, 2)
    return torch.empty(t.shape, dtype=ct).copy_(t)  # one copy (t.to() would keep t if only its strides differ)


def _sequence_layout(t, ct: torch.dtype) -> tuple:
    """(channels_last, convert) for a (batch, dim, L) input of the kernels: read as (batch, L, dim)
    when channels are its fastest axis (the Mamba mixer's delta and z), else as (batch, dim, L); converted
    (_as_compute) unless it is already contiguous that way in the compute dtype."""
    if t is None:
        return False, False
    channels_last = t.shape[1] > 1 and t.stride(1) == 1
    dense = (t.transpose(1, 2) if channels_last else t).is_contiguous()
    return channels_last, not dense or t.dtype != ct


def _needs_compute_copy(t, ct: torch.dtype) -> bool:
    return t is not None and (t.dtype != ct or not t.is_contiguous())


def _grouped_view(t, ct: torch.dtype, convert: bool) -> tuple:
    """(shape, strides in bytes) of a grouped (batch, G, N, L) or variable (batch, N, L) B / C as the kernel
    reads it: (batch, G, L, N), any strides (a slice of the mixer's projection is read in place)."""
    strides = torch.empty(t.shape, dtype=ct).stride() if convert else t.stride()
    itemsize = torch.finfo(ct).bits // 8
    if t.dim() == 3:
        (batch, dstate, seqlen), (sb, sn, sl) = t.shape, strides
        return (batch, 1, seqlen, dstate), (sb * itemsize, 0, sl * itemsize, sn * itemsize)
    (batch, groups, dstate, seqlen), (sb, sg, sn, sl) = t.shape, strides
    return (batch, groups, seqlen, dstate), (sb * itemsize, sg * itemsize, sl * itemsize, sn * itemsize)
