"""torch.func (grad, vjp, jacrev, vmap and nestings) through selective_scan_fn, against the float64 reference."""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

from lbmamba.ops import selective_scan_fn
from lbmamba.ops.reference import selective_scan_ref
from lbmamba.ops.scan import available_backends

BACKENDS = [b for b in ("torch", "cpu") if b in available_backends("cpu", torch.float64)]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "prev_state")


def make(batch=2, dim=4, L=13, N=3, bc="variable", D=True, z=True, bias=True, prev=True):
    f = torch.float64
    g = {
        "u": torch.randn(batch, dim, L, dtype=f),
        "delta": torch.randn(batch, dim, L, dtype=f) * 0.5,
        "A": -torch.rand(dim, N, dtype=f) - 0.2,
        "D": torch.randn(dim, dtype=f) if D else None,
        "z": torch.randn(batch, dim, L, dtype=f) if z else None,
        "delta_bias": torch.rand(dim, dtype=f) * 0.3 if bias else None,
        "prev_state": torch.randn(batch, dim, N, dtype=f) if prev else None,
    }
    shape = {"variable": (batch, N, L), "grouped": (batch, 2, N, L), "constant": (dim, N)}[bc]
    g["B"], g["C"] = torch.randn(shape, dtype=f), torch.randn(shape, dtype=f)
    return g


def scan(backend, window, last=True):
    def fn(u, delta, A, B, C, D, z, delta_bias, prev_state):
        res = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, last, prev_state, window=window,
                                backend=backend)
        return res if not last else res[0].sum() + (res[1] * res[1]).sum() * 0.5  # a scalar using both outputs
    return fn


def ref(window, last=True):
    return scan("reference", window, last)


@contextlib.contextmanager
def no_fallback():
    """Make functorch's per-sample loop fallback ("There is a performance drop ...") an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [4])
def test_grad_all_inputs_matches_reference(backend, window):
    g = make()
    args = [g[n] for n in NAMES]
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    got = grad(scan(backend, window), argnums=argnums)(*args)
    want = grad(ref(window), argnums=argnums)(*args)
    assert len(got) == 9
    for a, b in zip(got, want):
        close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_of_out_and_last_state(backend):
    g = make(bc="grouped", D=False, bias=False)

    def both(u, delta, A, B, C):
        return selective_scan_fn(u, delta, A, B, C, None, g["z"], None, False, True, g["prev_state"],
                                 backend=backend)

    def both_ref(u, delta, A, B, C):
        return selective_scan_ref(u, delta, A, B, C, None, g["z"], None, False, True, g["prev_state"])

    args = [g[n] for n in NAMES[:5]]
    (out, last), pull = vjp(both, *args)
    (out_r, last_r), pull_r = vjp(both_ref, *args)
    close(out, out_r)
    close(last, last_r)
    cot = (torch.randn_like(out), torch.randn_like(last))
    for a, b in zip(pull(cot), pull_r(cot)):
        close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_folds_without_fallback(backend):
    """vmap over u, delta, z, B, C and prev_state (A, D, delta_bias shared): no loop fallback, same values."""
    V = 3
    g = make(batch=2)
    batched = {n: torch.randn((V,) + g[n].shape, dtype=torch.float64) for n in ("u", "z", "B", "C", "prev_state")}
    batched["delta"] = torch.randn((V,) + g["delta"].shape, dtype=torch.float64) * 0.5

    def f(u, delta, B, C, z, prev_state):
        return selective_scan_fn(u, delta, g["A"], B, C, g["D"], z, g["delta_bias"], True, True, prev_state,
                                 window=4, backend=backend)

    order = ("u", "delta", "B", "C", "z", "prev_state")
    with no_fallback():
        out, last = vmap(f)(*[batched[n] for n in order])
    for v in range(V):
        want = selective_scan_ref(batched["u"][v], batched["delta"][v], g["A"], batched["B"][v], batched["C"][v],
                                  g["D"], batched["z"][v], g["delta_bias"], True, True, batched["prev_state"][v],
                                  window=4)
        close(out[v], want[0])
        close(last[v], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_parameters_ensemble(backend):
    """vmap over A, D, delta_bias and constant B / C (an ensemble of layers) with u shared, in_dims not 0."""
    V = 2
    g = make(batch=1, bc="constant", prev=False)
    A = -torch.rand(g["A"].shape[0], g["A"].shape[1], V, dtype=torch.float64) - 0.2  # vmapped at dim 2
    D = torch.randn(V, *g["D"].shape, dtype=torch.float64)
    B = torch.randn(V, *g["B"].shape, dtype=torch.float64)

    def f(A, D, B):
        return selective_scan_fn(g["u"], g["delta"], A, B, g["C"], D, g["z"], g["delta_bias"], True, window=4,
                                 backend=backend)

    with no_fallback():
        out = vmap(f, in_dims=(2, 0, 0))(A, D, B)
    for v in range(V):
        want = selective_scan_ref(g["u"], g["delta"], A[..., v], B[v], g["C"], D[v], g["z"], g["delta_bias"], True,
                                  window=4)
        close(out[v], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_vmap_of_grad(backend):
    """vmap(grad(...)): each sample's gradients of u and of the shared A, D, delta_bias, B, C."""
    g = make(batch=3, L=13, prev=False)

    def loss(params, u, delta, z):
        A, B, C, D, bias = params
        out = selective_scan_fn(u[None], delta[None], A, B[None], C[None], D, z[None], bias, True, window="auto",
                                backend=backend)
        return (out * out).sum()

    def loss_ref(params, u, delta, z):
        A, B, C, D, bias = params
        out = selective_scan_ref(u[None], delta[None], A, B[None], C[None], D, z[None], bias, True)
        return (out * out).sum()

    params = (g["A"], g["B"], g["C"], g["D"], g["delta_bias"])
    with no_fallback():
        got = vmap(grad(loss, argnums=(0, 1)), in_dims=((None, 0, 0, None, None), 0, 0, 0))(
            params, g["u"], g["delta"], g["z"])
    for s in range(3):
        p = (g["A"], g["B"][s], g["C"][s], g["D"], g["delta_bias"])
        want = grad(loss_ref, argnums=(0, 1))(p, g["u"][s], g["delta"][s], g["z"][s])
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            close(a[s], b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_matches_autograd_jacobian(backend):
    g = make(batch=1, dim=2, L=5, N=2, z=False)

    def f(u, A):
        return selective_scan_fn(u, g["delta"], A, g["B"], g["C"], g["D"], None, g["delta_bias"], True,
                                 window=2, backend=backend)

    def f_ref(u, A):
        return selective_scan_ref(u, g["delta"], A, g["B"], g["C"], g["D"], None, g["delta_bias"], True, window=2)

    got = jacrev(f, argnums=(0, 1))(g["u"], g["A"])
    want = torch.autograd.functional.jacobian(f_ref, (g["u"], g["A"]))
    for a, b in zip(got, want):
        close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 4, "auto"])
@pytest.mark.parametrize("bc", ["variable", "grouped", "constant"])
@pytest.mark.parametrize("optional", [True, False])
def test_grad_and_vmap_grid(backend, window, bc, optional):
    g = make(bc=bc, D=optional, z=optional, bias=optional, prev=optional)
    args = [g[n] for n in NAMES]
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    for a, b in zip(grad(scan(backend, window), argnums=argnums)(*args),
                    grad(ref(window), argnums=argnums)(*args)):
        close(a, b)
    # per-sample gradients of everything over a vmapped batch
    in_dims = tuple(0 if n in ("u", "delta", "z", "prev_state") and a is not None
                    else (0 if n in ("B", "C") and bc != "constant" else None) for n, a in zip(NAMES, args))

    def one(backend_fn):
        def f(*xs):
            xs = [x if d is None or x is None else x[None] for x, d in zip(xs, in_dims)]
            return backend_fn(*xs)
        return f

    with no_fallback():
        got = vmap(grad(one(scan(backend, window)), argnums=argnums), in_dims=in_dims)(*args)
    want = vmap(grad(one(ref(window)), argnums=argnums), in_dims=in_dims)(*args)
    for a, b in zip(got, want):
        close(a, b)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton backend on CPU needs TRITON_INTERPRET=1")
def test_triton_interpreted_grad_and_vmap():
    if "triton" not in available_backends("cpu", torch.float32):
        pytest.skip("triton not available")
    g = make(batch=1, dim=4, L=13, N=4)
    args = [t.float() if t is not None else None for t in (g[n] for n in NAMES)]
    argnums = (0, 1, 2, 3, 4)
    got = grad(scan("triton", 4), argnums=argnums)(*args)
    want = grad(ref(4), argnums=argnums)(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    out = vmap(lambda u: selective_scan_fn(u, *args[1:8], True, backend="triton", window=4))(args[0][None])
    torch.testing.assert_close(out[0], selective_scan_ref(*args[:8], True, window=4), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_vmap_and_forward_mode_refused(backend):
    g = make(batch=2, L=6, z=False, D=False, bias=False, prev=False)
    uu = torch.randn(3, 2, *g["u"].shape, dtype=torch.float64)

    def f(u):
        return selective_scan_fn(u, g["delta"], g["A"], g["B"], g["C"], window=4, backend=backend)

    with no_fallback():
        out = vmap(vmap(f))(uu)
    for i in range(3):
        for j in range(2):
            close(out[i, j], selective_scan_ref(uu[i, j], g["delta"], g["A"], g["B"], g["C"], window=4))
    with pytest.raises(NotImplementedError, match="jvp"):  # forward mode: documented as not supported
        torch.func.jvp(f, (g["u"],), (torch.ones_like(g["u"]),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_vmap_with_position_offset(backend):
    """A chunk whose first positions end a window begun before it (position_offset 3, window 4)."""
    g = make(batch=2, L=13)

    def f(backend_name):
        def fn(u, A, prev_state):
            out, last = selective_scan_fn(u, g["delta"], A, g["B"], g["C"], g["D"], g["z"], g["delta_bias"], True,
                                          True, prev_state, window=4, position_offset=3, backend=backend_name)
            return out.sum() + last.square().sum()
        return fn

    args = (g["u"], g["A"], g["prev_state"])
    for a, b in zip(grad(f(backend), argnums=(0, 1, 2))(*args), grad(f("reference"), argnums=(0, 1, 2))(*args)):
        close(a, b)
    with no_fallback():
        got = vmap(f(backend), in_dims=(0, None, 0))(torch.stack([g["u"], -g["u"]]), g["A"],
                                                       torch.stack([g["prev_state"]] * 2))
    close(got[1], f("reference")(-g["u"], g["A"], g["prev_state"]))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not available")
def test_registered_ops_vmap_rules():
    """torch.ops.lbmamba.lb_scan_fwd / lb_scan_bwd under vmap (no fallback) equal the per-sample calls."""
    V = 2
    g = make(batch=1, L=9, bc="grouped", prev=False)
    us = torch.randn(V, *g["u"].shape, dtype=torch.float64)
    As = -torch.rand(V, *g["A"].shape, dtype=torch.float64) - 0.2
    rest = (g["B"], g["C"], g["D"], g["z"], g["delta_bias"], True, 4, "cpu")

    def fwd(u, A):
        return torch.ops.lbmamba.lb_scan_fwd(u, g["delta"], A, *rest)

    def bwd(dout, u, A):
        _, _, ckpt = fwd(u, A)
        return torch.ops.lbmamba.lb_scan_bwd(dout, None, u, g["delta"], A, *rest, ckpt)

    douts = torch.randn_like(us)
    for in_dims in ((0, None), (0, 0)):  # folded into batch, then into channels (A per sample)
        with no_fallback():
            got = vmap(fwd, in_dims=in_dims)(us, As if in_dims[1] == 0 else g["A"])
            got_b = vmap(bwd, in_dims=(0,) + in_dims)(douts, us, As if in_dims[1] == 0 else g["A"])
        for v in range(V):
            A = As[v] if in_dims[1] == 0 else g["A"]
            for a, b in zip(got, fwd(us[v], A)):
                close(a[v], b)
            for a, b in zip(got_b, bwd(douts[v], us[v], A)):
                close(a[v], b)
