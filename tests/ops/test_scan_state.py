"""mamba_ssm's stateful API on the LB scan: prev_state (a sequence scanned in chunks, gradients through the
carried state), position_offset, selective_state_update / selective_window_update, mamba_inner_fn.

The same properties as mamba_ssm's own scan test (chunked calls with a carried state against one call, at 2
and 3 chunks, grouped B / C, every gradient), against the float64 sequential reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import check_against_reference, fresh_seed, make_inputs, rel_err, vanilla_mamba_scan
from lbmamba.ops import (
    mamba_inner_fn,
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
    selective_window_update,
)

BACKENDS = ["cpu", "torch"]
PER_POSITION = ("u", "delta", "z")


def with_prev(inputs, seed, scale=1.0):
    """inputs plus a prev_state (batch, dim, N) in float32 (float64 for float64 inputs)."""
    batch, dim, _ = inputs["u"].shape
    dstate = inputs["A"].shape[1]
    dtype = torch.float64 if inputs["u"].dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 7)
    prev = torch.randn(batch, dim, dstate, generator=g, dtype=torch.float64) * scale
    return dict(inputs, prev_state=prev.to(dtype))


def piece(inputs, s, e):
    """The inputs of positions s..e-1 (constant B / C and per-channel tensors as they are)."""
    out = {}
    for name, t in inputs.items():
        per_position = name in PER_POSITION or (name in ("B", "C") and t is not None and t.dim() >= 3)
        out[name] = t[..., s:e] if per_position and t is not None else t
    return out


def chunked(inputs, cuts, window, backend, softplus=True, prev_state=None, offsets=False):
    """selective_scan_fn over the pieces between `cuts`, each starting from the last state of the one before."""
    seqlen = inputs["u"].shape[-1]
    bounds = [0, *cuts, seqlen]
    outs, state = [], prev_state
    for s, e in zip(bounds[:-1], bounds[1:]):
        out, state = selective_scan_fn(**piece(inputs, s, e), delta_softplus=softplus, return_last_state=True,
                                       prev_state=state, window=window, position_offset=s if offsets else 0,
                                       backend=backend)
        outs.append(out)
    return torch.cat(outs, dim=-1), state


def leaves_of(inputs):
    return {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inputs.items()}


def loss_and_grads(out, last, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    loss = loss + (last.double() * torch.randn(last.shape, generator=g, dtype=torch.float64)).sum()
    names = [k for k, v in leaves.items() if v is not None]
    return dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))


# -- prev_state: each backend against the float64 reference ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form,window,seqlen", [("variable", 4, 37), ("grouped", 1, 20), ("constant", 3, 9),
                                                ("mixed", "auto", 130)])
def test_prev_state_matches_reference_with_every_gradient(backend, form, window, seqlen):
    """out, last state and the gradients of every input, prev_state's included (mamba_ssm refuses that)."""
    seed = fresh_seed()
    inputs = with_prev(make_inputs(2, 6, seqlen, 5, bc=form, groups=3, seed=seed), seed)
    check_against_reference(backend, inputs, softplus=True, window=window, tol=2e-5, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prev_state_half_precision(backend, dtype):
    seed = fresh_seed()
    inputs = with_prev(make_inputs(1, 4, 21, 3, bc="grouped", groups=2, dtype=dtype, seed=seed), seed)
    check_against_reference(backend, inputs, softplus=True, window=4, tol=1e-2, seed=seed)


def test_prev_state_of_zeros_is_no_prev_state():
    inputs = make_inputs(2, 4, 30, 3, dtype=torch.float64, seed=fresh_seed())
    zeros = torch.zeros(2, 4, 3, dtype=torch.float64)
    for backend in BACKENDS + ["reference"]:
        a = selective_scan_fn(**inputs, delta_softplus=True, window=4, backend=backend)
        b = selective_scan_fn(**inputs, delta_softplus=True, prev_state=zeros, window=4, backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prev_state_is_mamba_ssms_positional_argument():
    """mamba_ssm's order: ..., delta_softplus, return_last_state, prev_state; window 1 is its scan."""
    inputs = make_inputs(2, 4, 12, 3, dtype=torch.float64, seed=fresh_seed())
    order = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    first, state = selective_scan_fn(*[piece(inputs, 0, 5)[k] for k in inputs], True, True, window=1)
    second = selective_scan_fn(*[piece(inputs, 5, 12)[k] for k in inputs], True, False, state, window=1)
    expected = vanilla_mamba_scan(*order, softplus=True)
    assert rel_err(torch.cat([first, second], -1), expected) < 1e-12


# -- chunked calls = one call -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["variable", "grouped", "constant"])
@pytest.mark.parametrize("window,cuts", [(1, [13]), (4, [8, 44]), (16, [32, 48]),
                                         pytest.param(1, [5, 41], marks=pytest.mark.slow),
                                         pytest.param(4, [16], marks=pytest.mark.slow)])
def test_chunks_cut_at_window_multiples_give_the_one_call(backend, form, window, cuts):
    """Outputs, last state and every input's gradient (through the carried states: truncated back-propagation
    that is not truncated) are those of one call."""
    seed = fresh_seed()
    inputs = make_inputs(2, 6, 64, 4, bc=form, groups=2, dtype=torch.float64, seed=seed)
    one_leaves, ch_leaves = leaves_of(inputs), leaves_of(inputs)
    out, last = selective_scan_fn(**one_leaves, delta_softplus=True, return_last_state=True, window=window,
                                  backend=backend)
    ch_out, ch_last = chunked(ch_leaves, cuts, window, backend)
    assert rel_err(ch_out, out) < 1e-12 and rel_err(ch_last, last) < 1e-12
    grads, ch_grads = loss_and_grads(out, last, one_leaves, seed), loss_and_grads(ch_out, ch_last, ch_leaves, seed)
    for name, grad in grads.items():
        assert rel_err(ch_grads[name], grad) < 1e-11, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 4])
def test_one_position_calls_from_a_carried_state(backend, window):
    """Chunks of one position (a decay to apply to the carried state even at L = 1), with and without autograd:
    at window 1 the one call; at window 4 the one call whose windows are all one position long."""
    inputs = make_inputs(2, 5, 9, 3, bc="grouped", groups=5, dtype=torch.float64, seed=fresh_seed())
    expected = selective_scan_ref(**inputs, delta_softplus=True, window=1)
    with torch.no_grad():
        out, _ = chunked(inputs, list(range(1, 9)), window, backend)
    assert rel_err(out, expected) < 1e-12
    leaves = leaves_of(inputs)
    out, _ = chunked(leaves, list(range(1, 9)), window, backend)
    assert rel_err(out.detach(), expected) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_in_training_dtypes(backend, dtype):
    """fp32 / bf16 chunked calls match the float64 one call as closely as the one call does."""
    seed = fresh_seed()
    inputs = make_inputs(1, 8, 96, 4, bc="grouped", groups=2, dtype=dtype, seed=seed)
    ref = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True, window=8)
    one = selective_scan_fn(**inputs, delta_softplus=True, window=8, backend=backend)
    ch, _ = chunked(inputs, [32, 64], 8, backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ch.dtype == dtype
    assert rel_err(ch, ref) < tol and rel_err(one, ref) < tol


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [1024, 4096])
@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("window", [1, 16])
def test_long_sequences_in_chunks(backend, seqlen, chunks, window):
    """fp32 at mamba_ssm's test lengths: chunked = one call, values and every gradient."""
    seed = fresh_seed()
    inputs = make_inputs(1, 4, seqlen, 16, bc="grouped", groups=2, dtype=torch.float32, seed=seed)
    cut = (seqlen // chunks // window) * window
    cuts = [cut * i for i in range(1, chunks)]
    one_leaves, ch_leaves = leaves_of(inputs), leaves_of(inputs)
    one, last = selective_scan_fn(**one_leaves, delta_softplus=True, return_last_state=True, window=window,
                                  backend=backend)
    ch, ch_last = chunked(ch_leaves, cuts, window, backend)
    assert rel_err(ch, one) < 1e-6 and rel_err(ch_last, last) < 1e-6
    grads, ch_grads = loss_and_grads(one, last, one_leaves, seed), loss_and_grads(ch, ch_last, ch_leaves, seed)
    for name, grad in grads.items():
        assert rel_err(ch_grads[name], grad) < 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_chunked_gradients_match_float64_reference(backend):
    """1,024 positions in 3 chunks, fp32, against autograd through the float64 sequential reference."""
    seed = fresh_seed()
    inputs = make_inputs(1, 4, 1024, 8, bc="variable", dtype=torch.float32, seed=seed)
    leaves = leaves_of(inputs)
    out, state = chunked(leaves, [336, 672], 16, backend)
    grads = loss_and_grads(out, state, leaves, seed)
    ref_leaves = leaves_of({k: v.double() for k, v in inputs.items()})
    r_out, r_last = selective_scan_ref(**ref_leaves, delta_softplus=True, return_last_state=True, window=16)
    r_grads = loss_and_grads(r_out, r_last, ref_leaves, seed)
    assert rel_err(out, r_out) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, r_grads[name]) < 1e-4, name


# -- cuts that are not window multiples, and position_offset -----------------------------------------


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_position_offset_keeps_windows_aligned(backend):
    """Cut at 10 with W = 4: without an offset every later window shifts; with position_offset only the window
    the cut falls in ([8, 12)) differs from the one call, in its positions before the cut (8, 9)."""
    seed = fresh_seed()
    inputs = make_inputs(2, 4, 30, 3, dtype=torch.float64, seed=seed)
    one = selective_scan_fn(**inputs, delta_softplus=True, window=4, backend=backend)
    shifted, _ = chunked(inputs, [10], 4, backend)
    aligned, _ = chunked(inputs, [10], 4, backend, offsets=True)
    differs = (aligned - one).abs().amax((0, 1)) > 1e-12
    assert differs.nonzero().flatten().tolist() == [8, 9]
    assert ((shifted - one).abs().amax((0, 1)) > 1e-12)[10:].sum() >= 10  # windows [10, 14), ... vs [12, 16), ...
    # and the offset call is the reference's definition (windows at whole-sequence multiples of W)
    rest = piece(inputs, 10, 30)
    _, state = selective_scan_ref(**piece(inputs, 0, 10), delta_softplus=True, return_last_state=True, window=4)
    expected = selective_scan_ref(**rest, delta_softplus=True, prev_state=state, window=4, position_offset=10)
    assert rel_err(aligned[..., 10:], expected) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_offset_gradients(backend):
    seed = fresh_seed()
    inputs = with_prev(make_inputs(2, 4, 23, 3, bc="grouped", groups=2, seed=seed), seed)

    def at_offset(**kw):
        return selective_scan_fn(**kw, position_offset=6, backend=backend)

    def reference(**kw):
        return selective_scan_ref(**kw, position_offset=6)

    from conftest import run_with_grads

    ref_inputs = {k: v.double() for k, v in inputs.items()}
    out, last, grads = run_with_grads(at_offset, inputs, True, 4, seed)
    r_out, r_last, r_grads = run_with_grads(reference, ref_inputs, True, 4, seed)
    assert rel_err(out, r_out) < 2e-5 and rel_err(last, r_last) < 2e-5
    for name, grad in grads.items():
        assert rel_err(grad, r_grads[name]) < 2e-5, name


@pytest.mark.parametrize("name,kwargs,exc,message", [
    ("prev_state", dict(prev_state=torch.zeros(2, 4)), ValueError, r"prev_state must have shape \(batch, dim, N\)"),
    ("prev_state", dict(prev_state=[0.0]), TypeError, "prev_state must be a torch.Tensor or None, got list"),
    ("position_offset", dict(position_offset=-1), ValueError, "position_offset must be an int >= 0"),
])
def test_bad_state_arguments(name, kwargs, exc, message):
    inputs = make_inputs(2, 4, 9, 3, seed=fresh_seed())
    with pytest.raises(exc, match=message):
        selective_scan_fn(**inputs, **kwargs)


@pytest.mark.slow  # about 9 s; the gradient tests above run the op with prev_state through its autograd
def test_custom_op_contract_with_prev_state():
    from lbmamba.ops import _fused

    inputs = make_inputs(2, 4, 19, 3, bc="variable", seed=fresh_seed())
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1),
            inputs["D"], inputs["z"], inputs["delta_bias"], True, 4, "cpu", torch.randn(2, 4, 3))
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(_fused.lb_scan_fwd, args)


# -- selective_state_update and selective_window_update --------------------------------------------------


def test_state_update_is_one_step_of_the_scan():
    """Token by token from a zero state: every output and the final state of the window-1 reference."""
    seed = fresh_seed()
    inputs = make_inputs(2, 6, 11, 4, bc="variable", dtype=torch.float64, seed=seed)
    expected, last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True, window=1)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    ys = []
    for t in range(11):
        ys.append(selective_state_update(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"],
                                         inputs["B"][..., t], inputs["C"][..., t], inputs["D"], z=inputs["z"][..., t],
                                         dt_bias=inputs["delta_bias"], dt_softplus=True))
    assert rel_err(torch.stack(ys, -1), expected) < 1e-12
    assert rel_err(state, last) < 1e-12


def test_state_update_with_heads_and_groups():
    """mamba_ssm's multi-head layout (batch, nheads, dim, N) with B / C per group of heads, fp32 state."""
    g = torch.Generator().manual_seed(fresh_seed())
    batch, nheads, dim, n, groups = 2, 4, 3, 5, 2
    state = torch.randn(batch, nheads, dim, n, generator=g)
    x, dt, z = (torch.randn(batch, nheads, dim, generator=g) for _ in range(3))
    A = -torch.rand(nheads, dim, n, generator=g)
    B, C = (torch.randn(batch, groups, n, generator=g) for _ in range(2))
    D, bias = torch.randn(nheads, dim, generator=g), torch.randn(nheads, dim, generator=g)
    before = state.clone()
    y = selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=bias, dt_softplus=True)
    delta = F.softplus(dt + bias)
    Bh, Ch = B.repeat_interleave(2, 1)[:, :, None], C.repeat_interleave(2, 1)[:, :, None]
    h = torch.exp(delta[..., None] * A) * before + (delta * x)[..., None] * Bh
    torch.testing.assert_close(state, h)
    torch.testing.assert_close(y, ((h * Ch).sum(-1) + D * x) * F.silu(z))
    with pytest.raises(ValueError, match=r"A must have shape \(4, 3, 5\)"):
        selective_state_update(state, x, dt, A[:, :2], B, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_by_window_stream_is_the_full_lb_scan(backend):
    """Streaming whole windows (and the truncated last one) on a carried state gives the one LB call."""
    seed = fresh_seed()
    inputs = make_inputs(2, 6, 22, 4, bc="grouped", groups=3, dtype=torch.float64, seed=seed)
    expected, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True, window=8,
                                       backend=backend)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    outs = [selective_window_update(state, **piece(inputs, s, min(s + 8, 22)), delta_softplus=True, window=8,
                                    backend=backend) for s in range(0, 22, 8)]
    assert rel_err(torch.cat(outs, -1), expected) < 1e-12
    assert rel_err(state, last) < 1e-12


# -- mamba_inner_fn ------------------------------------------------------------------------------------


def inner_parameters(d_model=8, d_inner=12, dstate=4, dt_rank=3, width=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(
        conv1d_weight=rnd(d_inner, 1, width), conv1d_bias=rnd(d_inner),
        x_proj_weight=rnd(dt_rank + 2 * dstate, d_inner),
        delta_proj_weight=rnd(d_inner, dt_rank), out_proj_weight=rnd(d_model, d_inner), out_proj_bias=rnd(d_model),
        A=-torch.exp(rnd(d_inner, dstate, scale=0.5)), D=rnd(d_inner, scale=1.0), delta_bias=rnd(d_inner, scale=0.2),
    )


def inner_reference(xz, p, window):
    """The Mamba mixer written out step by step: causal conv1d (a loop over taps), silu, x_proj, dt_proj, the
    sequential reference scan gated by silu(z), out_proj."""
    x, z = xz.chunk(2, dim=1)
    width = p["conv1d_weight"].shape[-1]
    L = x.shape[-1]
    conv = p["conv1d_bias"][:, None].expand_as(x).clone()
    for k in range(width):  # tap k reads position t - (width - 1 - k)
        shift = width - 1 - k
        conv[..., shift:] = conv[..., shift:] + p["conv1d_weight"][:, 0, k, None] * x[..., :L - shift]
    x = conv * torch.sigmoid(conv)
    dt_rank = p["delta_proj_weight"].shape[1]
    n = p["A"].shape[1]
    x_dbl = torch.einsum("bdl,ed->bel", x, p["x_proj_weight"])
    delta = torch.einsum("brl,dr->bdl", x_dbl[:, :dt_rank], p["delta_proj_weight"])
    B, C = x_dbl[:, dt_rank:dt_rank + n], x_dbl[:, dt_rank + n:]
    y = selective_scan_ref(x, delta, p["A"], B, C, p["D"], z, p["delta_bias"], True, window=window)
    return torch.einsum("bdl,md->blm", y, p["out_proj_weight"]) + p["out_proj_bias"]


def call_inner(xz, p, **kwargs):
    """mamba_ssm's Mamba module's call."""
    return mamba_inner_fn(xz, p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"], p["delta_proj_weight"],
                          p["out_proj_weight"], p["out_proj_bias"], p["A"], None, None, p["D"],
                          delta_bias=p["delta_bias"], delta_softplus=True, **kwargs)


@pytest.mark.parametrize("scan,window,backend", [("forward", None, "cpu"), ("lb", 4, "cpu"), ("lb", "auto", "torch")])
def test_mamba_inner_fn_matches_the_reference_composition(scan, window, backend):
    seed = fresh_seed()
    p = {k: v.requires_grad_(True) for k, v in inner_parameters(seed=seed).items()}
    xz = torch.randn(2, 24, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    out = call_inner(xz, p, scan=scan, window=window, backend=backend)
    expected = inner_reference(xz, p, 1 if scan == "forward" else window)
    assert out.shape == (2, 19, 8)
    assert rel_err(out, expected) < 1e-12
    w = torch.randn(out.shape, dtype=torch.float64)
    leaves = [xz, *p.values()]
    grads = torch.autograd.grad((out * w).sum(), leaves)
    r_grads = torch.autograd.grad((expected * w).sum(), leaves)
    for name, a, b in zip(["xz", *p], grads, r_grads):
        assert rel_err(a, b) < 1e-10, name


def test_mamba_inner_fn_float32_and_bad_arguments():
    p = inner_parameters(seed=fresh_seed(), dtype=torch.float32)
    xz = torch.randn(1, 24, 33)
    expected = inner_reference(xz.double(), {k: v.double() for k, v in p.items()}, 1)
    assert rel_err(call_inner(xz, p), expected) < 1e-5
    with pytest.raises(ValueError, match="scan must be one of"):
        call_inner(xz, p, scan="bi")
    with pytest.raises(ValueError, match="window must be 1 or None with scan='forward'"):
        call_inner(xz, p, window=4)
