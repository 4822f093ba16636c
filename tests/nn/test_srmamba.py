"""SRMamba: the stride re-ordering and its second scan branch."""

import math

import pytest
import torch

from lbmamba.nn import Mamba, SRMamba, sr_permutation, sr_reorder, sr_restore


@pytest.mark.parametrize("length,rate", [(1, 3), (7, 3), (10, 5), (23, 10), (9, 1), (4, 10)])
def test_sr_reorder_is_an_inverted_permutation(length, rate):
    perm = sr_permutation(length, rate)
    k = -(-length // rate)
    assert perm.numel() == k * rate
    real = perm[perm >= 0]
    assert sorted(real.tolist()) == list(range(length))  # every position exactly once
    assert (perm < 0).sum() == k * rate - length  # the rest is padding
    # the re-ordered sequence visits position (i * rate + j) at slot (j * k + i)
    expected = [i * rate + j for j in range(rate) for i in range(k)]
    assert perm.tolist() == [p if p < length else -1 for p in expected]
    x = torch.randn(2, 5, length)
    assert torch.equal(sr_restore(sr_reorder(x, rate), rate, length), x)
    assert torch.equal(sr_reorder(x, rate)[..., perm >= 0], x[..., real])


def test_second_branch_is_built_and_initialised_like_the_first():
    """Both branches come from Mamba's one branch builder, with the mixer's own initialisation arguments."""
    torch.manual_seed(0)
    mixer = SRMamba(16, d_state=4, rate=3, dt_min=0.01, dt_max=0.02)
    plain = Mamba(16, d_state=4)
    names = {n for n, _ in mixer.named_parameters()}
    assert names == {n for n, _ in plain.named_parameters()} | {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight",
                                                                 "dt_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"}
    for bias in (mixer.dt_proj.bias, mixer.dt_proj_b.bias):  # softplus(bias) = the initial step, in [dt_min, dt_max]
        dt = torch.nn.functional.softplus(bias)
        assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.02 + 1e-6
    torch.testing.assert_close(mixer.A_b_log, torch.log(torch.arange(1.0, 5.0)).expand(32, 4))
    assert mixer.A_b_log._no_weight_decay and mixer.D_b._no_weight_decay
    assert abs(mixer.dt_proj_b.weight).max() <= math.ceil(16 / 16) ** -0.5


def test_forward_is_both_branches_summed():
    torch.manual_seed(0)
    mixer = SRMamba(8, d_state=4, rate=3, window=1).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    xz = mixer.project_in(x)
    y = mixer.ssm_branch(xz, *mixer.branch(), 1)
    y = y + sr_restore(mixer.ssm_branch(sr_reorder(xz, 3), *mixer.branch("_b"), 1), 3, 10)
    torch.testing.assert_close(mixer(x), mixer.out_proj(y.transpose(1, 2)))
    with pytest.raises(ValueError, match="SRMamba expects hidden_states of shape"):
        mixer(torch.randn(2, 10, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="rate must be a positive int"):
        SRMamba(8, rate=0)
