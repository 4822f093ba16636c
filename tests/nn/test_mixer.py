"""Layers: the Mamba-1 mixer ("lb" / "forward" / "bi"), RMSNorm, add+norm and the residual block."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lbmamba.nn import Block, Mamba, RMSNorm, add_norm
from lbmamba.ops import selective_scan_ref

D_MODEL = 16


def _mixer(scan="lb", window="auto", seed=0, **kwargs):
    torch.manual_seed(seed)
    return Mamba(D_MODEL, d_state=8, scan=scan, window=window, **kwargs).double()


def _randomise(module, seed=1):
    """Give every parameter random values so that no equality holds by accident (e.g. D = 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _manual_branch(xz, conv1d, x_proj, dt_proj, A_log, D, window, d_conv=4, dt_rank=1, d_state=8):
    """One direction of the mixer written out with the sequential reference scan."""
    seqlen = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(F.pad(x, (d_conv - 1, 0)), conv1d.weight, conv1d.bias, groups=x.shape[1]))
    assert x.shape[-1] == seqlen
    x_dbl = torch.einsum("bdl,rd->blr", x, x_proj.weight)
    dt = x_dbl[..., :dt_rank]
    B = x_dbl[..., dt_rank : dt_rank + d_state]
    C = x_dbl[..., dt_rank + d_state :]
    delta = torch.einsum("blr,dr->bdl", dt, dt_proj.weight)
    A = -torch.exp(A_log)
    return selective_scan_ref(
        x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z, dt_proj.bias, True, window=window
    )


# ---------------------------------------------------------------------------------- names, sizes, init
def test_mixer_parameter_names_and_shapes():
    m = Mamba(192)  # d_inner 384, dt_rank 12, N 16
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (768, 192),
        "conv1d.weight": (384, 1, 4),
        "conv1d.bias": (384,),
        "x_proj.weight": (12 + 32, 384),
        "dt_proj.weight": (384, 12),
        "dt_proj.bias": (384,),
        "A_log": (384, 16),
        "D": (384,),
        "out_proj.weight": (192, 384),
    }
    bi = Mamba(192, scan="bi")
    extra = set(bi.state_dict()) - set(shapes)
    assert extra == {
        "A_b_log", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias", "D_b",
    }
    assert Mamba(100).dt_rank == math.ceil(100 / 16)


def test_mixer_initialisation():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, scan="bi", dt_min=0.001, dt_max=0.1)
    for suffix in ("", "_b"):
        A_log = getattr(m, "A_log" if not suffix else "A_b_log")
        assert torch.allclose(A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(128, 16))
        assert torch.equal(getattr(m, "D" + suffix), torch.ones(128))
        dt_proj = getattr(m, "dt_proj" + suffix)
        dt = F.softplus(dt_proj.bias)
        assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
        assert dt_proj.weight.abs().max() <= m.dt_rank**-0.5
        # only the main branch carries mamba_ssm's "do not re-initialise" mark (Vim's backward one does not)
        assert getattr(dt_proj.bias, "_no_reinit", False) == (suffix == "")
    for name in ("A_log", "D", "A_b_log", "D_b"):
        assert getattr(getattr(m, name), "_no_weight_decay", False)


def test_mixer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scan"):
        Mamba(16, scan="backward")
    with pytest.raises((ValueError, TypeError), match="window"):
        Mamba(16, window=0)
    with pytest.raises(ValueError, match="hidden_states"):
        Mamba(16)(torch.randn(2, 5, 8))


# ---------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("window", [1, 3, "auto"])
def test_lb_mixer_equals_hand_written_composition(window):
    m = _mixer("lb", window)
    _randomise(m)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    xz = torch.einsum("bld,ed->bel", x, m.in_proj.weight)
    y = _manual_branch(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, window)
    expected = torch.einsum("bdl,ed->ble", y, m.out_proj.weight)
    torch.testing.assert_close(m(x), expected, rtol=1e-9, atol=1e-9)


def test_forward_mixer_equals_lb_with_window_1():
    fwd = _mixer("forward")
    _randomise(fwd)
    lb1 = _mixer("lb", window=1)
    lb1.load_state_dict(fwd.state_dict())
    lb4 = _mixer("lb", window=4)
    lb4.load_state_dict(fwd.state_dict())
    x = torch.randn(3, 13, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(fwd(x), lb1(x), rtol=0, atol=0)
    assert not torch.allclose(fwd(x), lb4(x))  # the window matters


@pytest.mark.parametrize("divide", [True, False])
def test_bi_mixer_equals_forward_plus_flipped_backward_branch(divide):
    m = _mixer("bi", if_divide_out=divide)
    _randomise(m)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    xz = torch.einsum("bld,ed->bel", x, m.in_proj.weight)
    y_f = _manual_branch(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D, window=1)
    # the backward branch: its own parameters, run on the reversed sequence, output reversed back
    y_b = _manual_branch(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b, window=1).flip(-1)
    y = (y_f + y_b) / 2 if divide else y_f + y_b
    expected = torch.einsum("bdl,ed->ble", y, m.out_proj.weight)
    torch.testing.assert_close(m(x), expected, rtol=1e-9, atol=1e-9)


def test_mixer_gradients_reach_every_parameter():
    m = Mamba(D_MODEL, d_state=4, scan="bi")
    x = torch.randn(2, 7, D_MODEL, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_mixer_runs_in_bfloat16():
    m = Mamba(D_MODEL, d_state=4).to(torch.bfloat16)
    y = m(torch.randn(2, 8, D_MODEL, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# ---------------------------------------------------------------------------------- norms and block
def test_rms_norm():
    norm = RMSNorm(8)
    assert [n for n, _ in norm.named_parameters()] == ["weight"] and norm.eps == 1e-5
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    xb = x.to(torch.bfloat16)
    assert norm(xb).dtype == torch.bfloat16


def test_add_norm_keeps_residual_fp32():
    norm = RMSNorm(8)
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    hidden, residual = add_norm(x, None, norm, residual_in_fp32=True)
    assert residual.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    torch.testing.assert_close(residual, x.float())
    res0 = torch.randn(2, 4, 8)
    hidden, residual = add_norm(x, res0, norm, residual_in_fp32=True)
    torch.testing.assert_close(residual, res0 + x.float())
    torch.testing.assert_close(hidden, norm(res0 + x.float()).to(torch.bfloat16))
    ln = nn.LayerNorm(8).to(torch.bfloat16)  # a bf16 LayerNorm still normalises the fp32 residual
    hidden, _ = add_norm(x, res0, ln)
    assert hidden.dtype == torch.bfloat16


def test_block_is_add_norm_mixer():
    torch.manual_seed(0)
    block = Block(D_MODEL, mixer_cls=lambda d: Mamba(d, d_state=4), residual_in_fp32=True)
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 6, D_MODEL)
    r = torch.randn(2, 6, D_MODEL)
    out, res = block(h, r)
    torch.testing.assert_close(res, r + h)
    torch.testing.assert_close(out, block.mixer(block.norm(r + h)))
    out0, res0 = block(h, None)  # the first block: the residual is the input itself
    torch.testing.assert_close(res0, h)
    torch.testing.assert_close(out0, block.mixer(block.norm(h)))
    assert isinstance(block.norm, RMSNorm)
    assert isinstance(Block(D_MODEL, drop_path=0.1).drop_path, nn.Module)
