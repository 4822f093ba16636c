"""What the tests share: random scan inputs, the vanilla Mamba scan written out, the comparison of a
backend with the float64 reference, MIL bags and labels on disk, and fixtures that put global state
(threads, RNG) back.

Test modules import the plain functions (`from conftest import make_inputs`); `tests/` is on the path
(see `pythonpath` in pyproject.toml), also for the Triton interpreter subprocess.

Random inputs are the same on every run, so a failure replays: before each test, torch's, numpy's and
Python's global generators are seeded from the test's node id, and `fresh_seed()` draws seeds from a
generator seeded the same way (adding or removing a test shifts no other test's seeds). The environment
variable LBMAMBA_TEST_SEED changes the base these seeds are derived from: unset (or 0) the fixed base 0,
`LBMAMBA_TEST_SEED=random` a fresh base per session (new inputs every run), `LBMAMBA_TEST_SEED=<int>` that
base. The base is printed in pytest's header and under every failure; run the failed test again with
LBMAMBA_TEST_SEED=<that base> to replay it.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lbmamba.engine.rng import capture_rng_state, restore_rng_state
from lbmamba.ops import selective_scan_fn, selective_scan_ref

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


SEED_VARIABLE = "LBMAMBA_TEST_SEED"


def _base_seed() -> int:
    text = os.environ.get(SEED_VARIABLE, "").strip()
    if text.lower() == "random":
        return int.from_bytes(os.urandom(4), "little") % 2**31
    try:
        return int(text or 0)
    except ValueError:
        raise ValueError(f"{SEED_VARIABLE} must be an integer or 'random', got {text!r}") from None


#: the base every test seed is derived from (see the module's docstring)
BASE_SEED = _base_seed()


def seed_for(label: str) -> int:
    """A seed in [0, 2**31) for `label` (a test's node id), from the base seed: the same on every run."""
    text = f"{BASE_SEED}:{label}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") % 2**31


_seeds = random.Random(seed_for(""))  # reseeded per test by _seed_every_test


def fresh_seed() -> int:
    """A seed for a test's random inputs, a different one per call; the n-th call of a test gives the same
    seed on every run with the same base (report it in failure messages)."""
    return _seeds.randrange(2**31)


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Seed torch, numpy, Python's `random` and `fresh_seed` from the test's node id and the base seed."""
    global _seeds
    seed = seed_for(request.node.nodeid)
    _seeds = random.Random(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    yield


# Parallel tests (pytest-xdist, `-n auto` in pyproject.toml): most tests are short and single-threaded at heart,
# so workers beat threads; each worker gets an equal share of the cores for torch's (and the CPU scan's) threads,
# since oversubscribed OpenMP threads slow every worker down many times over.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    from lbmamba.engine.device import usable_cores

    return max(1, min(MAX_WORKERS, usable_cores()))


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        from lbmamba.engine.device import usable_cores

        torch.set_num_threads(max(1, usable_cores() // int(workers)))


def pytest_report_header(config):
    how = "fresh this session" if os.environ.get(SEED_VARIABLE, "").strip().lower() == "random" else "fixed"
    return f"test seeds: base {BASE_SEED} ({how}; {SEED_VARIABLE}=<int> or random to change it)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("test seeds", f"base {BASE_SEED}: {SEED_VARIABLE}={BASE_SEED} replays this test's "
                                              f"random inputs (its seeds come from its node id {item.nodeid!r})"))
    return report


def make_inputs(batch, dim, seqlen, dstate, bc="variable", groups=2, B=None, C=None, with_D=True, with_z=True,
                with_bias=True, softplus=True, dtype=torch.float32, seed=0):
    """Scan inputs as a Mamba layer makes them (negative A, moderate delta), in `dtype` (A, D, bias and
    constant B / C in float32, or float64 for float64).

    bc: the form of both B and C: "constant" (dim, N), "variable" (batch, N, L), "grouped"
        (batch, G, N, L) or "mixed" (constant B, grouped C); `B` / `C` override it per input.
    groups: G, or (G of B, G of C).
    softplus=False: delta and delta_bias are made non-negative (without the softplus their sum is the step
        size itself; a negative step makes the scan grow without bound and its gradients ill-conditioned).
    """
    g = torch.Generator().manual_seed(seed)
    b_groups, c_groups = (groups, groups) if isinstance(groups, int) else groups
    forms = {"mixed": ("constant", "grouped")}.get(bc, (bc, bc))
    b_form, c_form = B or forms[0], C or forms[1]

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    def bc_input(form, n_groups):
        if form == "constant":
            return rnd(dim, dstate)
        if form == "variable":
            return rnd(batch, dstate, seqlen)
        if form == "grouped":
            return rnd(batch, n_groups, dstate, seqlen)
        raise ValueError(f"unknown B / C form {form!r}")

    delta = rnd(batch, dim, seqlen, scale=0.3, shift=0.3)
    inputs = {
        "u": rnd(batch, dim, seqlen),
        "delta": delta if softplus else delta.abs(),
        "A": -torch.exp(rnd(dim, dstate, scale=0.5)),
        "B": bc_input(b_form, b_groups),
        "C": bc_input(c_form, c_groups),
        "D": rnd(dim) if with_D else None,
        "z": rnd(batch, dim, seqlen) if with_z else None,
        "delta_bias": rnd(dim, scale=0.2) if with_bias else None,
    }
    if not softplus and with_bias:
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    per_channel_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
        elif name in ("A", "D", "delta_bias") or (name in ("B", "C") and t.dim() == 2):
            out[name] = t.to(per_channel_dtype)
        else:
            out[name] = t.to(dtype)
    return out


def vanilla_mamba_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=True):
    """Mamba-1's selective scan written out on its own (h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
    y_t = C_t h_t + D u_t, gated by silu(z)), in float64, for every B / C form."""
    u, delta, A = u.double(), delta.double(), A.double()
    batch, dim, seqlen = u.shape

    def per_channel(t):  # -> (batch, dim, N, L)
        t = t.double()
        if t.dim() == 2:
            return t[None, :, :, None].expand(batch, dim, t.shape[1], seqlen)
        if t.dim() == 3:
            return t[:, None].expand(batch, dim, *t.shape[1:])
        return t.repeat_interleave(dim // t.shape[1], dim=1)

    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = F.softplus(delta)
    B_t, C_t = per_channel(B), per_channel(C)
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B_t[..., t]
        ys.append((h * C_t[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    return y * F.silu(z.double()) if z is not None else y


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
    with torch.no_grad():  # no autograd: the fused backends run directly, without the registered op
        direct_out, direct_last = fast(**inputs, delta_softplus=softplus, return_last_state=True, window=window)
    assert rel_err(direct_out, r_out) < tol, f"no-grad out rel err {rel_err(direct_out, r_out):.2e} ({ctx})"
    assert rel_err(direct_last, r_last) < tol, f"no-grad last_state rel err {rel_err(direct_last, r_last):.2e} ({ctx})"
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape, f"d{name} shape {tuple(grad.shape)} ({ctx})"
        assert grad.dtype == inputs[name].dtype, f"d{name} dtype {grad.dtype} != {inputs[name].dtype} ({ctx})"
        err = rel_err(grad, r_grads[name])
        assert err < tol, f"d{name} rel err {err:.2e} ({ctx})"


def write_bag(root, slide, feats, fmt):
    """One slide's features in the CLAM layout: `root/pt_files/<slide>.pt` or `root/h5_files/<slide>.h5`."""
    if fmt == "pt":
        os.makedirs(os.path.join(root, "pt_files"), exist_ok=True)
        torch.save(torch.as_tensor(feats), os.path.join(root, "pt_files", slide + ".pt"))
    else:
        os.makedirs(os.path.join(root, "h5_files"), exist_ok=True)
        with h5py.File(os.path.join(root, "h5_files", slide + ".h5"), "w") as f:
            f.create_dataset("features", data=np.asarray(feats, dtype=np.float32))
            coords = np.stack([np.arange(len(feats)) * 256, np.zeros(len(feats))], 1).astype(np.int32)
            f.create_dataset("coords", data=coords)


def write_labels(path, rows):
    """A labels CSV (case_id, slide_id, label) from (slide, label) pairs."""
    with open(path, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["case_id", "slide_id", "label"])
        for s, y in rows:
            w.writerow([s, s, y])


@pytest.fixture
def tiny_bags(tmp_path):
    """8 slides (4 per class) of 4-d features in tmp_path/feats (h5), and tmp_path/labels.csv."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        y = i % 2
        write_bag(tmp_path / "feats", f"s{i}", rng.normal(size=(int(rng.integers(3, 7)), 4)) + y, "h5")
        rows.append((f"s{i}", ["benign", "tumor"][y]))
    write_labels(tmp_path / "labels.csv", rows)
    return tmp_path


def load_script(path, monkeypatch):
    """A benchmark script imported as a module, as it runs (its folder first on sys.path); `monkeypatch` puts
    sys.path and the benchmarks' helper modules it imported back after the test."""
    import importlib.util

    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("machine", "models_cpu"):
        if name in sys.modules and name not in before:  # registered through monkeypatch: removed at teardown
            monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
    return module


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and the machine is shared); the count is put back after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def restore_globals():
    """Put back what a run in this process changes: torch's thread count and every RNG."""
    threads, rng = torch.get_num_threads(), capture_rng_state()
    yield
    torch.set_num_threads(threads)
    restore_rng_state(rng)


# the other vision Mambas as dense backbones, tiny: (model, kwargs, feature source)
OTHER_BACKBONES = [
    ("vmamba_tiny_s1l8", dict(depths=(1, 1, 2, 1), dims=8), "residual"),  # its four stages: strides 4-32
    ("lb_vmamba_tiny_s1l8", dict(depths=(1, 1, 2, 1), dims=8), "residual"),
    ("localvim_tiny", dict(patch_size=8, embed_dim=16, depth=4), "mixer"),
    ("lb_localvim_tiny", dict(patch_size=8, embed_dim=16, depth=4), "mixer"),
    ("plainmamba_l1", dict(patch_size=8, embed_dim=16, depth=4), "residual"),
    ("lb_plainmamba_l1", dict(patch_size=8, embed_dim=16, depth=4), "residual"),
    ("adventurer_tiny_patch16_224", dict(patch_size=8, embed_dim=16, depth=4, d_state=8, headdim=8), "residual"),
    ("lb_adventurer_tiny_patch16_224", dict(patch_size=8, embed_dim=16, depth=4, d_state=8, headdim=8),
     "residual"),
]


def backbone_params(with_source: bool = True):
    """OTHER_BACKBONES as pytest parameters: an LB version and its original share every line of code but the
    scan's direction, so the default run takes the LB versions and `-m slow` adds the originals."""
    return [pytest.param(*((name, kwargs, source) if with_source else (name, kwargs)), id=name,
                         marks=() if name.startswith("lb_") else pytest.mark.slow)
            for name, kwargs, source in OTHER_BACKBONES]


def torchrun_lbmamba(args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc -m lbmamba ARGS` with this checkout's src first on the
    path; the finished process (stdout, stderr as text)."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           "lbmamba", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def corrupt_copy(dataset, root):
    """A copy of a generated data set at `root` whose first training image is not an image; that file."""
    import shutil
    from pathlib import Path

    shutil.copytree(dataset, root)
    victim = sorted((Path(root) / "images" / "train").iterdir())[0]
    victim.write_bytes(b"not an image")
    return victim
