"""Random inputs for scan tests and the comparison against the float64 reference."""

from __future__ import annotations

import os

import torch

from lbmamba.ops import selective_scan_fn, selective_scan_ref

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def fresh_seed() -> int:
    """A new seed per call (reported in failure messages, so a failure can be replayed)."""
    return int.from_bytes(os.urandom(4), "little")


def make_inputs(batch, dim, seqlen, dstate, bc="variable", groups=2, with_D=True, with_z=True, with_bias=True,
                dtype=torch.float32, seed=0):
    """Inputs as a Mamba layer makes them (negative A, moderate delta), in `dtype` (A, D, bias fp32)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    inputs = {
        "u": rnd(batch, dim, seqlen),
        "delta": rnd(batch, dim, seqlen, scale=0.3, shift=0.3),
        "A": -torch.exp(rnd(dim, dstate, scale=0.5)),
        "D": rnd(dim) if with_D else None,
        "z": rnd(batch, dim, seqlen) if with_z else None,
        "delta_bias": rnd(dim, scale=0.2) if with_bias else None,
    }
    if bc == "constant":
        inputs["B"], inputs["C"] = rnd(dim, dstate), rnd(dim, dstate)
    elif bc == "variable":
        inputs["B"], inputs["C"] = rnd(batch, dstate, seqlen), rnd(batch, dstate, seqlen)
    elif bc == "grouped":
        inputs["B"], inputs["C"] = rnd(batch, groups, dstate, seqlen), rnd(batch, groups, dstate, seqlen)
    elif bc == "mixed":  # constant B, grouped C
        inputs["B"], inputs["C"] = rnd(dim, dstate), rnd(batch, groups, dstate, seqlen)
    else:
        raise ValueError(bc)
    per_channel = ("A", "D", "delta_bias")
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
        elif name in per_channel or (name in ("B", "C") and t.dim() == 2):
            out[name] = t.to(torch.float32 if dtype != torch.float64 else torch.float64)
        else:
            out[name] = t.to(dtype)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_with_grads(fn, inputs, softplus, window, out_grad_seed, last_state=True):
    """Output, last state and the gradient of a random linear loss w.r.t. every input tensor."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    out, last = fn(**leaves, delta_softplus=softplus, return_last_state=True, window=window)
    g = torch.Generator().manual_seed(out_grad_seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * w_out).sum()
    if last_state:
        loss = loss + (last.double() * w_last).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out.detach(), last.detach(), dict(zip(names, grads))


def check_against_reference(backend, inputs, softplus, window, tol, seed, last_state=True):
    """Compare a backend with the float64 reference on the same (rounded) inputs: values and grads."""
    ref_inputs = {k: (v.double() if v is not None else None) for k, v in inputs.items()}

    def fast(**kw):
        return selective_scan_fn(**kw, backend=backend)

    out, last, grads = run_with_grads(fast, inputs, softplus, window, seed, last_state)
    r_out, r_last, r_grads = run_with_grads(selective_scan_ref, ref_inputs, softplus, window, seed, last_state)
    assert out.dtype == inputs["u"].dtype, f"output dtype {out.dtype} != u's {inputs['u'].dtype}"
    ctx = f"backend={backend} window={window} softplus={softplus} seed={seed}"
    assert torch.isfinite(out).all(), f"non-finite output ({ctx})"
    assert rel_err(out, r_out) < tol, f"out rel err {rel_err(out, r_out):.2e} ({ctx})"
    assert rel_err(last, r_last) < tol, f"last_state rel err {rel_err(last, r_last):.2e} ({ctx})"
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape, f"d{name} shape {tuple(grad.shape)} ({ctx})"
        assert grad.dtype == inputs[name].dtype, f"d{name} dtype {grad.dtype} != {inputs[name].dtype} ({ctx})"
        err = rel_err(grad, r_grads[name])
        assert err < tol, f"d{name} rel err {err:.2e} ({ctx})"
