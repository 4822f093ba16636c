"""The "torch" backend (chunked scan in plain PyTorch ops, hand-written backward): gradcheck, lengths around its
chunks and windows, windows past L, a loss on the last state only, window 1 = vanilla Mamba (values and
gradients), strided inputs as the Mamba mixer passes them, what it keeps for the backward, and no host code
that needs the data (it runs meta tensors)."""

from __future__ import annotations

import pytest
import torch

from conftest import check_against_reference, fresh_seed, make_inputs, rel_err, vanilla_mamba_scan
from lbmamba.ops import selective_scan_fn, selective_scan_ref
from lbmamba.ops.torch_scan import chunk_length


def _scan(window, last_state=True, softplus=True):
    def fn(**kw):
        return selective_scan_fn(**kw, delta_softplus=softplus, return_last_state=last_state, window=window,
                                 backend="torch")
    return fn


@pytest.mark.parametrize("form,window", [("constant", 3), ("variable", 3), ("grouped", 3), ("mixed", 3),
                                         ("variable", 1), ("grouped", 1)])
def test_torch_gradcheck(form, window):
    """float64 gradcheck of out and last state w.r.t. every input; L = 11 is several chunks, for W = 3 the
    last chunk and its window cut short."""
    inputs = make_inputs(1, 4, 11, 2, bc=form, groups=2, dtype=torch.float64, seed=fresh_seed())
    names = [k for k, v in inputs.items() if v is not None]
    assert 11 // chunk_length(window, 11) >= 3

    def fn(*tensors):
        return _scan(window)(**dict(zip(names, tensors)))

    tensors = tuple(inputs[k].detach().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


def _awkward_lengths(window):
    """1, W - 1, W + 1, one past a whole number of chunks, and (for small W) several chunks of several windows
    each, ending inside a window."""
    lengths = {1, window + 1} | ({window - 1} if window > 1 else set())
    lengths.add(next(L for L in range(window + 1, 10_000) if L % chunk_length(min(window, L), L) == 1))
    if window <= 4:
        lengths.add(next(L for L in range(window + 1, 10_000)
                         if chunk_length(window, L) >= 2 * window and L // chunk_length(window, L) >= 3
                         and L % window == window - 1))
    return sorted(lengths)


@pytest.mark.parametrize("window,seqlen", [(w, L) for w in (1, 3, 4, 16) for L in _awkward_lengths(w)])
def test_torch_lengths_around_chunks_and_windows(window, seqlen):
    seed = fresh_seed()
    form = ["variable", "grouped", "constant"][seqlen % 3]
    inputs = make_inputs(2, 3, seqlen, 2, bc=form, groups=3, dtype=torch.float64, seed=seed)
    check_against_reference("torch", inputs, softplus=True, window=window, tol=1e-10, seed=seed)


def test_torch_window_past_the_length():
    """A window longer than the sequence is one window [0, L): the buffers are bounded by L, not by W."""
    seed = fresh_seed()
    inputs = make_inputs(2, 3, 6, 4, bc="variable", dtype=torch.float64, seed=seed)
    assert chunk_length(min(10**9, 6), 6) == 6
    outs = [selective_scan_fn(**inputs, delta_softplus=True, window=w, backend="torch") for w in (6, 7, 10**9)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    check_against_reference("torch", inputs, softplus=True, window=10**9, tol=1e-12, seed=seed)
    fp32 = make_inputs(1, 2, 3, 2, bc="grouped", groups=2, seed=seed)
    check_against_reference("torch", fp32, softplus=True, window=10**9, tol=2e-5, seed=seed)


@pytest.mark.parametrize("window", [1, 4])
def test_torch_loss_on_the_last_state_only(window):
    """out takes no part in the loss (its gradient is None): the last-state gradient alone flows back."""
    seed = fresh_seed()
    inputs = make_inputs(2, 4, 23, 3, bc="grouped", groups=2, dtype=torch.float64, seed=seed)
    w = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = []
    for fn in (_scan(window), lambda **kw: selective_scan_ref(**kw, delta_softplus=True, return_last_state=True,
                                                              window=window)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        _, last = fn(**leaves)
        g = torch.autograd.grad((last * w).sum(), list(leaves.values()), allow_unused=True)
        grads.append([torch.zeros_like(v) if gi is None else gi for gi, v in zip(g, leaves.values())])
    for name, ours, ref in zip(inputs, *grads):
        if ref.abs().max() == 0:  # z, C, D only reach out
            assert ours.abs().max() == 0, name
        else:
            assert rel_err(ours, ref) < 1e-12, f"d{name} seed={seed}"


@pytest.mark.parametrize("form", ["constant", "variable", "grouped"])
def test_torch_window_one_is_vanilla_mamba_with_gradients(form):
    """W = 1 against Mamba-1's scan written out (vanilla_mamba_scan), several chunks: values and gradients."""
    inputs = make_inputs(2, 5, 53, 4, bc=form, groups=5, dtype=torch.float64, seed=fresh_seed())
    ours_in = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    theirs_in = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    ours = selective_scan_fn(**ours_in, delta_softplus=True, window=1, backend="torch")
    theirs = vanilla_mamba_scan(**theirs_in)
    assert rel_err(ours, theirs) < 1e-12
    w = torch.randn_like(ours)
    g_ours = torch.autograd.grad((ours * w).sum(), list(ours_in.values()))
    g_theirs = torch.autograd.grad((theirs * w).sum(), list(theirs_in.values()))
    for name, a, b in zip(inputs, g_ours, g_theirs):
        assert rel_err(a, b) < 1e-12, name


def test_torch_strided_inputs_as_the_mamba_mixer_passes_them():
    """delta and z as transposes of (batch, L, dim) tensors, u in (L, batch, dim) memory, B and C as
    transposes of (batch, L, N): values and gradients match the reference."""
    seed = fresh_seed()
    inputs = make_inputs(2, 10, 45, 4, bc="variable", seed=seed)
    laid_out = dict(inputs)
    for name in ("delta", "z", "B", "C"):
        laid_out[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    laid_out["u"] = inputs["u"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not any(laid_out[k].is_contiguous() for k in ("u", "delta", "z", "B", "C"))
    check_against_reference("torch", laid_out, softplus=True, window="auto", tol=2e-5, seed=seed)


def test_torch_keeps_only_the_inputs_and_one_state_per_chunk():
    """What the backward keeps: the inputs themselves and h^L before every chunk, (chunks, batch, dim, N);
    nothing of size (batch, dim, L, N)."""
    inputs = make_inputs(2, 8, 300, 16, bc="variable", seed=fresh_seed())
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = selective_scan_fn(**leaves, delta_softplus=True, backend="torch")
    saved = out.grad_fn.saved_tensors
    extra = [t for t in saved if t is not None and not any(t is v for v in leaves.values())]
    n_chunks = -(-300 // chunk_length(16, 300))
    assert [tuple(t.shape) for t in extra] == [(n_chunks, 2, 8, 16)]


def test_torch_backend_needs_no_host_data():
    """Meta tensors carry no data: the forward and backward run them, so no step reads values on the host."""
    inputs = make_inputs(2, 6, 37, 4, bc="grouped", groups=3, seed=0)
    meta = {k: v.to("meta").requires_grad_(True) for k, v in inputs.items()}
    out, last = selective_scan_fn(**meta, delta_softplus=True, return_last_state=True, window=4, backend="torch")
    assert out.device.type == "meta" and out.shape == (2, 6, 37) and last.shape == (2, 6, 4)
    grads = torch.autograd.grad(out.sum() + last.sum(), list(meta.values()))
    assert [g.shape for g in grads] == [v.shape for v in meta.values()]
