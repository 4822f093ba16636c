"""The LB scan op: every backend against the float64 reference, the window rules, gradcheck,
torch.compile, the custom-op contract and the promised errors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import lbmamba
from conftest import check_against_reference, fresh_seed, make_inputs, rel_err, vanilla_mamba_scan
from lbmamba.ops import available_backends, resolve_window, selective_scan_fn, selective_scan_ref

BACKENDS = ["cpu", "torch"]
FORMS = ["constant", "variable", "grouped", "mixed"]
FULL_LENGTHS = [1, 2, 7, 8, 9, 127, 128, 129, 196, 197, 256, 257, 1000, 2049]
FULL_WINDOWS = ["auto", 1, 2, 3, 8, 16]


def test_exports():
    assert lbmamba.selective_scan_fn is selective_scan_fn
    assert lbmamba.selective_scan_ref is selective_scan_ref
    assert "cpu" in available_backends("cpu")


# -- every backend against the float64 reference ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "seqlen,window", [(1, "auto"), (7, 3), (9, 8), (129, "auto"), (197, 16), (257, "auto"), (130, 1), (66, 2)]
)
def test_backend_matches_reference(backend, form, seqlen, window):
    seed = fresh_seed()
    inputs = make_inputs(2, 6, seqlen, 5, bc=form, groups=3, seed=seed)
    check_against_reference(backend, inputs, softplus=True, window=window, tol=2e-5, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_D,with_z,with_bias,softplus", list(itertools.product([False, True], repeat=4)))
def test_optional_inputs(backend, with_D, with_z, with_bias, softplus):
    seed = fresh_seed()
    inputs = make_inputs(2, 4, 41, 3, bc="variable", with_D=with_D, with_z=with_z, with_bias=with_bias,
                         softplus=softplus, seed=seed)
    check_against_reference(backend, inputs, softplus=softplus, window=4, tol=2e-5, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_realistic_layer_shape(backend):
    """A Mamba layer's shape: many channels, N = 16, several chunks and channel blocks, no last-state loss."""
    seed = fresh_seed()
    inputs = make_inputs(2, 40, 300, 16, bc="variable", seed=seed)
    check_against_reference(backend, inputs, softplus=True, window="auto", tol=2e-5, seed=seed, last_state=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seqlen", FULL_LENGTHS)
@pytest.mark.parametrize("window", FULL_WINDOWS)
def test_full_grid(backend, form, seqlen, window):
    seed = fresh_seed()
    inputs = make_inputs(2, 4, seqlen, 4, bc=form, groups=2, seed=seed)
    check_against_reference(backend, inputs, softplus=True, window=window, tol=3e-5, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    seed = fresh_seed()
    inputs = make_inputs(2, 8, 77, 4, bc="variable", dtype=dtype, seed=seed)
    check_against_reference(backend, inputs, softplus=True, window="auto", tol=1e-2, seed=seed)


def test_float64_backends_agree_to_rounding():
    seed = fresh_seed()
    inputs = make_inputs(2, 5, 70, 4, bc="grouped", groups=5, dtype=torch.float64, seed=seed)
    check_against_reference("cpu", inputs, softplus=True, window=3, tol=1e-12, seed=seed)


# -- the window rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_window_one_is_vanilla_mamba(backend):
    inputs = make_inputs(2, 5, 53, 6, bc="variable", dtype=torch.float64, seed=fresh_seed())
    ours = selective_scan_fn(**inputs, delta_softplus=True, window=1, backend=backend)
    theirs = vanilla_mamba_scan(**inputs)
    assert rel_err(ours, theirs) < 1e-12


def test_auto_window_boundaries():
    for seqlen, expected in [(1, 4), (128, 4), (129, 8), (196, 8), (256, 8), (257, 16), (1024, 16), (8192, 16)]:
        assert resolve_window("auto", seqlen) == expected, seqlen
    # and the op really uses them: "auto" equals the explicit window on each side of each boundary
    for seqlen, explicit in [(128, 4), (129, 8), (256, 8), (257, 16)]:
        inputs = make_inputs(1, 3, seqlen, 4, dtype=torch.float64, seed=fresh_seed())
        auto = selective_scan_fn(**inputs, delta_softplus=True, window="auto", backend="cpu")
        fixed = selective_scan_fn(**inputs, delta_softplus=True, window=explicit, backend="cpu")
        other = selective_scan_fn(**inputs, delta_softplus=True, window=explicit * 2, backend="cpu")
        assert torch.equal(auto, fixed), seqlen
        assert not torch.allclose(auto, other), seqlen


def test_windows_do_not_leak_across_boundaries():
    """Changing x after a window's end leaves every earlier output of that window unchanged."""
    inputs = make_inputs(1, 3, 24, 4, bc="variable", dtype=torch.float64, seed=fresh_seed())
    base = selective_scan_fn(**inputs, window=8, backend="cpu")
    bumped = dict(inputs, u=inputs["u"].clone())
    bumped["u"][:, :, 16] += 1.0  # first position of the third window
    out = selective_scan_fn(**bumped, window=8, backend="cpu")
    assert torch.equal(out[:, :, :16], base[:, :, :16])
    bumped = dict(inputs, u=inputs["u"].clone())
    bumped["u"][:, :, 13] += 1.0  # inside the second window: positions 8..12 see it from the right
    out = selective_scan_fn(**bumped, window=8, backend="cpu")
    assert torch.equal(out[:, :, :8], base[:, :, :8])
    assert not torch.allclose(out[:, :, 8:13], base[:, :, 8:13])


# -- gradcheck, compile, custom op --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("form", ["constant", "variable", "grouped"])
def test_gradcheck(backend, form):
    inputs = make_inputs(2, 4, 11, 3, bc=form, groups=2, dtype=torch.float64, seed=fresh_seed())
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        out, last = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True, window=3, backend=backend)
        return out, last

    tensors = tuple(inputs[k].detach().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torch_compile_traces_through_the_op():
    inputs = make_inputs(2, 8, 37, 4, bc="variable", seed=fresh_seed())

    def layer(u, delta, A, B, C, D, z, delta_bias):
        y = selective_scan_fn(u.tanh(), delta, A, B, C, D, z, delta_bias, True, window="auto", backend="cpu")
        return (y * 2).sum(dim=1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    eager_out = layer(**leaves)
    (eager_grad,) = torch.autograd.grad(eager_out.sum(), [leaves["u"]])
    comp_out = compiled(**leaves)
    (comp_grad,) = torch.autograd.grad(comp_out.sum(), [leaves["u"]])
    torch.testing.assert_close(comp_out, eager_out)
    torch.testing.assert_close(comp_grad, eager_grad)


def test_custom_op_contract():
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration."""
    from lbmamba.ops import _fused

    inputs = make_inputs(2, 4, 19, 3, bc="variable", seed=fresh_seed())
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"].unsqueeze(1), inputs["C"].unsqueeze(1),
            inputs["D"], inputs["z"], inputs["delta_bias"], True, 4, "cpu")
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(_fused.lb_scan_fwd, args)


def test_last_state_matches_reference_and_carries_gradient():
    inputs = make_inputs(2, 4, 50, 3, dtype=torch.float64, seed=fresh_seed())
    out, last = selective_scan_fn(**inputs, return_last_state=True, backend="cpu")
    r_out, r_last = selective_scan_ref(**inputs, return_last_state=True)
    assert last.shape == (2, 4, 3)
    assert rel_err(last, r_last) < 1e-12
    u = inputs["u"].clone().requires_grad_(True)
    _, last = selective_scan_fn(**dict(inputs, u=u), return_last_state=True, backend="cpu")
    (g,) = torch.autograd.grad(last.sum(), [u])
    assert g.abs().sum() > 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("seqlen,window", [(1, 4), (7, 1), (40, 4), (70, "auto")])
def test_direct_inference_call_matches_the_op(form, seqlen, window):
    """Without autograd, the fused backend runs directly (no registered op, no checkpoints, the last state
    only when asked): the same values as through the op, including B / C given as (batch, N, L)."""
    inputs = make_inputs(2, 40, seqlen, 5, bc=form, groups=2, seed=fresh_seed())
    watched = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    op_out, op_last = selective_scan_fn(**watched, delta_softplus=True, return_last_state=True, window=window,
                                        backend="cpu")
    with torch.no_grad():
        out = selective_scan_fn(**watched, delta_softplus=True, window=window, backend="cpu")
        out2, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True, window=window,
                                       backend="cpu")
    for a, b in ((out, op_out), (out2, op_out), (last, op_last)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1, 9])
def test_direct_call_reads_the_mixers_layouts(dtype, seqlen):
    """The direct path reads tensors by address with a plan made once per signature: the Mamba mixer's
    layouts (x and z halves of one projection, B / C slices of another, delta channels last), half
    precision, and new data under a plan made for earlier calls all give the reference's values."""
    batch, dim, dstate = 2, 24, 4
    for _ in range(2):  # the second round reuses the plans of the first with new data
        seed = fresh_seed()
        g = torch.Generator().manual_seed(seed)
        xz = torch.randn(batch, seqlen, 2 * dim, generator=g).to(dtype).transpose(1, 2)  # (batch, 2 dim, L) view
        u, z = xz.chunk(2, dim=1)  # channels fastest, every other block of channels: not dense
        x_dbl = torch.randn(batch * seqlen, 3 + 2 * dstate, generator=g).to(dtype)
        B = x_dbl[:, 3:3 + dstate].reshape(batch, seqlen, dstate).transpose(1, 2)  # (batch, N, L) strided slice
        C = x_dbl[:, 3 + dstate:].reshape(batch, seqlen, dstate).transpose(1, 2)
        delta = (torch.randn(batch, seqlen, dim, generator=g) * 0.3).to(dtype).transpose(1, 2)  # channels last
        params = dict(A=-torch.rand(dim, dstate, generator=g) - 0.5, D=torch.randn(dim, generator=g),
                      delta_bias=torch.randn(dim, generator=g) * 0.1)
        inputs = dict(u=u, delta=delta, B=B, C=C, z=z, **params)
        with torch.no_grad():
            out, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True, window=4,
                                          backend="cpu")
        ref, ref_last = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True,
                                           return_last_state=True, window=4)
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        assert out.dtype == dtype and out.shape == (batch, dim, seqlen)
        assert rel_err(out, ref) < tol, f"seed {seed}"
        assert rel_err(last, ref_last) < tol, f"seed {seed}"


@pytest.mark.filterwarnings("error:There is a performance drop")  # the vmap rule folds, never a per-sample loop
def test_vmap_goes_through_the_op():
    """Under a torch.func transform the tensors are wrapped: the call must not take the direct path."""
    inputs = make_inputs(3, 8, 9, 4, bc="variable", seed=fresh_seed())
    per_example = ("u", "delta", "B", "C", "z")
    shared = {k: v for k, v in inputs.items() if k not in per_example}

    def one(u, delta, B, C, z):
        return selective_scan_fn(u[None], delta[None], B=B[None], C=C[None], z=z[None], **shared, backend="cpu")[0]

    batched = torch.vmap(one)(*(inputs[k] for k in per_example))
    looped = torch.stack([one(*(inputs[k][i] for k in per_example)) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # deprecated; shapes
def test_jit_trace_records_the_op():
    """torch.jit.trace cannot see a kernel called directly: while it records, the call goes through the op,
    so the trace computes the scan on new inputs (it once failed inside numba on traced shapes)."""
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def scan(*tensors):
        return selective_scan_fn(*tensors, True, window=4, backend="cpu")

    first, second = (make_inputs(2, 8, 9, 4, bc="variable", seed=fresh_seed()) for _ in range(2))
    with torch.no_grad():
        traced = torch.jit.trace(scan, tuple(first[k] for k in names), check_trace=False)
        torch.testing.assert_close(traced(*(second[k] for k in names)), scan(*(second[k] for k in names)))


def test_cpu_backend_threads_agree(monkeypatch):
    """The result does not depend on how many threads ran it (no races in the reductions)."""
    from lbmamba.ops.cpu import threads as cpu_threads

    monkeypatch.setattr(cpu_threads, "PARALLEL_MIN_WORK", 0)  # helpers even for this small call
    inputs = make_inputs(3, 70, 90, 4, bc="grouped", groups=2, seed=fresh_seed())
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = selective_scan_fn(**leaves, delta_softplus=True, backend="cpu")
            results.append([out] + list(torch.autograd.grad(out.sum(), list(leaves.values()))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_handles_extreme_decays_exactly():
    """exp(ΔA) outside the fast polynomial's range (underflow to 0, overflow) still matches libm."""
    inputs = make_inputs(1, 4, 20, 3, seed=fresh_seed())
    inputs["A"] = inputs["A"] * 200  # Δ·A far below -87: decays underflow to exactly 0
    out = selective_scan_fn(**inputs, delta_softplus=True, backend="cpu")
    as_double = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    ref = selective_scan_ref(**as_double, delta_softplus=True)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("layout", ["channels_last", "length_major", "mixed"])
def test_cpu_backend_reads_any_memory_layout(layout):
    """The kernels read (batch, L, dim) memory directly and transpose (batch, dim, L) blocks as they
    load them; views with other strides are copied first. Values and gradients match the reference."""
    seed = fresh_seed()
    inputs = make_inputs(2, 10, 45, 4, bc="variable", seed=seed)

    def relayout(name, t):
        if t is None or t.dim() != 3 or name in ("B", "C"):
            return t
        if layout == "channels_last" or (layout == "mixed" and name in ("delta", "z")):
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "length_major":  # (L, batch, dim) memory: neither layout the kernels read
            return t.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        return t

    laid_out = {k: relayout(k, v) for k, v in inputs.items()}
    assert not laid_out["delta"].is_contiguous()
    check_against_reference("cpu", laid_out, softplus=True, window="auto", tol=2e-5, seed=seed)


@pytest.mark.parametrize("window", [1, "auto"])
def test_cpu_softplus_and_gate_over_their_whole_range(window):
    """The fused softplus of delta and silu gate: both branches of softplus (threshold 20), arguments
    past the vectorised exponential's range (|x| > 87) and NaN, which must propagate as in PyTorch.
    A decay of -1e4 leaves (almost) no memory, so each output checks its own position's Δ and gate."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    inputs = make_inputs(2, 5, 300, 3, bc="constant", seed=seed)
    sweep = torch.linspace(-130.0, 130.0, 300)
    inputs["delta"] = sweep + torch.randn(2, 5, 300, generator=g) * 0.5
    inputs["delta"][0, 0, 173] = 20.0  # exactly at the threshold, among neighbours near 20
    inputs["z"] = sweep[torch.randperm(300, generator=g)].expand(2, 5, 300).contiguous()
    inputs["A"] = torch.full_like(inputs["A"], -1e4)

    def both():
        out = selective_scan_fn(**inputs, delta_softplus=True, window=window, backend="cpu")
        ref = selective_scan_ref(**{k: (v.double() if v is not None else None) for k, v in inputs.items()},
                                 delta_softplus=True, window=window)
        return out.double(), ref

    out, ref = both()
    # each output is C·B Δ u + D u, gated: bound its error by the size of those terms at that position
    d = {k: v.double() for k, v in inputs.items()}
    step = F.softplus(d["delta"] + d["delta_bias"][:, None])
    terms = step * (d["B"] * d["C"]).abs().sum(1)[:, None] + d["D"][:, None].abs()
    scale = terms * d["u"].abs() * F.silu(d["z"]).abs()
    bad = (out - ref).abs() > 2e-5 * scale + 1e-30
    assert not bad.any(), (f"seed {seed}: out {out[bad][:5]}, reference {ref[bad][:5]}, delta {d['delta'][bad][:5]}, "
                           f"z {d['z'][bad][:5]}")
    inputs["delta"][1, 2, 50] = float("nan")
    inputs["z"][0, 3, 9] = float("nan")
    out, ref = both()
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any()


# -- bad input ----------------------------------------------------------------------------------


def _good():
    return make_inputs(2, 4, 10, 3, bc="variable", seed=0)


BAD_CASES = [
    ("u rank", lambda k: k.update(u=k["u"][0]), ValueError, "u must have shape"),
    ("delta shape", lambda k: k.update(delta=k["delta"][:, :, :5]), ValueError, "delta must have the same shape"),
    ("batch mismatch", lambda k: k.update(B=k["B"][:1]), ValueError, "B given as variable"),
    ("length mismatch", lambda k: k.update(C=k["C"][:, :, :9]), ValueError, "C given as variable"),
    ("A shape", lambda k: k.update(A=k["A"][:3]), ValueError, "A must have shape"),
    ("complex A", lambda k: k.update(A=k["A"].to(torch.complex64)), TypeError, "complex A is not supported"),
    ("groups", lambda k: k.update(B=torch.randn(2, 3, 3, 10)), ValueError, "not divisible by the number of groups"),
    ("B rank", lambda k: k.update(B=torch.randn(2, 1, 1, 3, 10)), ValueError, "B must be constant"),
    ("D shape", lambda k: k.update(D=torch.randn(5)), ValueError, "D must have shape"),
    ("z shape", lambda k: k.update(z=torch.randn(2, 4, 11)), ValueError, "z must have the same shape"),
    ("delta_bias shape", lambda k: k.update(delta_bias=torch.randn(4, 1)), ValueError, "delta_bias must have shape"),
    ("int dtype", lambda k: k.update(u=k["u"].long()), TypeError, "u must have dtype"),
    ("devices", lambda k: k.update(D=k["D"].to("meta")), ValueError, "all tensors must be on one device"),
    ("not a tensor", lambda k: k.update(u=[1.0]), TypeError, "u must be a torch.Tensor"),
    ("mixed dtypes", lambda k: k.update(delta=k["delta"].double(), z=k["z"].bfloat16()), TypeError,
     "u is torch.float32 but delta is torch.float64, z is torch.bfloat16"),
    ("variable B dtype", lambda k: k.update(B=k["B"].half()), TypeError, "variable B / C must have one dtype"),
]


@pytest.mark.parametrize("name,mutate,exc,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref])
def test_bad_input(name, mutate, exc, message, fn):
    kw = _good()
    mutate(kw)
    with pytest.raises(exc, match=message):
        fn(**kw)


@pytest.mark.parametrize(
    "window,exc,message",
    [(0, ValueError, "window must be >= 1"), (-3, ValueError, "window must be >= 1"),
     (2.5, TypeError, "window must be"), ("big", ValueError, "window must be a positive int or 'auto'"),
     (True, TypeError, "window must be")],
)
def test_bad_window(window, exc, message):
    with pytest.raises(exc, match=message):
        selective_scan_fn(**_good(), window=window)


def test_checks_are_remembered_per_signature_and_never_skip_an_error(monkeypatch):
    """The dispatcher remembers which argument signatures (types, shapes, dtypes, devices, window, backend)
    passed its checks, since they cost as much as a short scan; anything the checks read that differs is
    checked again, and the table stays bounded."""
    from lbmamba.ops import scan as dispatcher

    kw = _good()
    selective_scan_fn(**kw, window=1)
    with pytest.raises(TypeError, match="window must be"):  # True == 1 and hashes alike
        selective_scan_fn(**kw, window=True)
    with pytest.raises(TypeError, match="u is torch.float64 but delta is torch.float32"):
        selective_scan_fn(**dict(kw, u=kw["u"].double()), window=1)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        selective_scan_fn(**dict(kw, D=kw["D"].to("meta")), window=1)
    with pytest.raises(TypeError, match="D must be a torch.Tensor or None"):
        selective_scan_fn(**dict(kw, D=kw["D"].numpy()), window=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan_fn(**kw, window=1, backend="cuda-magic")
    monkeypatch.setattr(dispatcher, "_CHECKED", {})
    monkeypatch.setattr(dispatcher, "_CHECKED_MAX", 3)
    for seqlen in range(1, 8):
        out = selective_scan_fn(**make_inputs(1, 4, seqlen, 3, seed=seqlen), backend="cpu")
        assert out.shape == (1, 4, seqlen)
        assert 1 <= len(dispatcher._CHECKED) <= 3


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan_fn(**_good(), backend="cuda-magic")
    with pytest.raises(ValueError, match="backend='cpu' is not available"):
        kw = {k: (v.to("meta") if v is not None else None) for k, v in _good().items()}
        selective_scan_fn(**kw, backend="cpu")


def test_triton_runs_d_state_up_to_its_limit(monkeypatch):
    """The triton launch rule covers d_state up to MAX_DSTATE (beyond, register tiles spill): "auto" sends
    larger d_state to the torch backend, and asking for triton, or calling it, says why."""
    import types

    pytest.importorskip("triton")
    from lbmamba.ops import choose_backend, scan, triton_scan

    monkeypatch.setattr(scan, "_UNAVAILABLE", {})
    monkeypatch.setattr(triton_scan, "is_available", lambda: None)  # as on a GPU machine
    monkeypatch.setattr(triton_scan, "supports", lambda device, dtype: True)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    limit = triton_scan.MAX_DSTATE
    assert choose_backend("auto", on_gpu, limit) == "triton"
    assert choose_backend("auto", on_gpu, limit + 1) == "torch"
    with pytest.raises(ValueError, match=f"backend='triton' is not available.*d_state up to {limit}, got 300"):
        choose_backend("triton", on_gpu, 300)
    with pytest.raises(ValueError, match=f"A: the triton backend runs d_state up to {limit}, got {limit + 1}"):
        triton_scan._check_inputs(torch.empty(1, 2, 3), torch.empty(2, limit + 1))


def test_cpu_backend_says_when_a_first_call_compiles(monkeypatch, capsys):
    """numba compiles the kernels on first use (about a minute); a first call that takes long says why."""
    import time

    import numpy as np

    from lbmamba.ops.cpu import threads as cpu_threads

    monkeypatch.setattr(cpu_threads, "COMPILE_NOTE_AFTER_S", 0.05)
    monkeypatch.setattr(cpu_threads, "_RAN", set())

    def slow_kernel(*args):  # stands in for a kernel being compiled
        time.sleep(0.5)

    cpu_threads._run_tasks(slow_kernel, 4, 1, np.zeros(1, np.float32))
    assert "compiling the CPU scan kernels, once per machine" in capsys.readouterr().err
    cpu_threads._run_tasks(slow_kernel, 4, 1, np.zeros(1, np.float32))  # compiled now: no second note
    assert capsys.readouterr().err == ""


def test_cpu_call_never_waits_for_a_helper_that_does_not_come(monkeypatch):
    """The calling thread takes every task itself when no helper turns up (a busy machine)."""
    from lbmamba.ops.cpu import threads as cpu_threads

    class NoHelpers(cpu_threads._TaskPool):
        def _ensure(self, helpers):  # helpers are asked for, but none ever runs
            pass

    monkeypatch.setattr(cpu_threads, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(cpu_threads, "_POOL", NoHelpers())
    inputs = make_inputs(2, 300, 40, 4, bc="variable", seed=fresh_seed())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        out = selective_scan_fn(**inputs, delta_softplus=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, selective_scan_fn(**inputs, delta_softplus=True, backend="reference"),
                               rtol=2e-5, atol=1e-5)


def test_cpu_helper_errors_reach_the_caller():
    """An exception in a helper thread is raised in the caller, which does not hang waiting for it."""
    import threading

    from lbmamba.ops.cpu import threads as cpu_threads

    def loop(counters, n_tasks):  # the caller takes no task; the helper fails in the one it takes
        if threading.current_thread().name == "lbmamba-scan":
            counters[0] += 1
            raise RuntimeError("helper failed")
        return False

    with pytest.raises(RuntimeError, match="helper failed"):
        cpu_threads._TaskPool().run(loop, 1, 1, ())
