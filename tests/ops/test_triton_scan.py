"""The Triton backend.

* Its kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess because the
  variable must be set before the kernels are decorated), through the public
  `selective_scan_fn(..., backend="triton")` and so through the custom op, against the float64
  sequential reference: outputs, last state and every gradient, outputs allocated full of NaN.
* Their compilation for an sm_90 GPU (no GPU needed), which catches what the interpreter accepts but
  the compiler does not.
* The interface functions.

Seeds are fixed (from LBMAMBA_TEST_SEED's base, see conftest.py); a failure prints the case's seed and the
LBMAMBA_TEST_SEED=<base> that replays it (LBMAMBA_TEST_SEED=random: fresh seeds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import BASE_SEED, make_inputs, vanilla_mamba_scan  # noqa: E402  (after the skip when triton is missing)

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
TESTS = ROOT / "tests"
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def _case(case_id, batch, dim, seqlen, dstate, window, B="variable", C="variable", groups=(2, 2), D=True, z=True,
          bias=True, softplus=True, dtype="float32", loss="both", chunk=8, ckpt_every=None, prev=False, offset=0,
          slow=True):  # fmt: skip
    """One interpreter case; chunk / ckpt_every override CHUNK_LEN / CHECKPOINT_EVERY (None: the default);
    prev: a prev_state (fp32) carried in, with its gradient checked; offset: position_offset.
    slow=False: one of the default run's cases (every B / C form, checkpoint spacing, straddling windows, half
    dtype, d_state block and carried state among them); the others run with `-m slow`."""
    return dict(id=case_id, batch=batch, dim=dim, seqlen=seqlen, dstate=dstate, window=window, B=B, C=C,
                groups=groups, D=D, z=z, bias=bias, softplus=softplus, dtype=dtype, loss=loss, chunk=chunk,
                ckpt_every=ckpt_every, prev=prev, offset=offset, slow=slow)  # fmt: skip


# Lengths that are not multiples of the window, several windows per chunk and several chunks per
# sequence (chunk = CHUNK_LEN, lowered to keep the interpreter fast), a checkpoint per chunk, per
# run of chunks and per partial run, every B/C form, with and without each optional input, windows
# that straddle chunks, and the half-precision dtypes.
CASES = [
    _case("lb-variable-w3", 2, 4, 37, 4, 3, slow=False),
    _case("lb-variable-w3-checkpoint-every-chunk", 2, 4, 37, 4, 3, ckpt_every=1),
    _case("lb-constant-auto-checkpoint-every-2", 2, 4, 37, 4, "auto", B="constant", C="constant", ckpt_every=2,
          slow=False),
    _case("vanilla-w1-grouped", 2, 4, 37, 4, 1, B="grouped", D=False, z=False, bias=False, softplus=False, slow=False),
    _case("straddle-w11", 2, 4, 37, 4, 11, C="grouped", z=False),
    _case("straddle-w11-checkpoint-every-4", 1, 4, 37, 4, 11, B="grouped", ckpt_every=4, slow=False),
    _case("window-past-end-last-state-only", 1, 3, 21, 5, 100, B="constant", C="grouped", groups=(1, 3), D=False,
          bias=False, loss="last", slow=False),  # fmt: skip
    _case("auto-w8-output-only", 1, 2, 150, 2, "auto", loss="out"),
    _case("n64", 1, 2, 19, 64, 4, C="constant", z=False),
    _case("odd-dim-n3", 2, 5, 23, 3, 2, B="constant", bias=False),
    _case("grouped-g4-g2", 1, 8, 17, 4, 3, B="grouped", C="grouped", groups=(4, 2)),
    _case("length-1", 2, 3, 1, 4, "auto"),
    _case("length-below-window", 1, 2, 3, 4, 4),
    _case("exact-chunks", 1, 2, 16, 4, 8),
    _case("default-chunk", 1, 2, 40, 4, "auto", chunk=None),
    _case("bf16", 2, 4, 29, 4, "auto", dtype="bfloat16", slow=False),
    _case("bf16-w1-grouped", 1, 4, 21, 4, 1, B="grouped", C="constant", dtype="bfloat16"),
    _case("fp16-w5", 1, 4, 29, 8, 5, B="grouped", C="constant", dtype="float16", slow=False),
    # d_state whose blocks and tile length differ from d_state 16's (`_Launch`): BLOCK_N 1 (the backward's
    # 16 channels in one warp), 4, 64 and 256 (8 warps in the backward), at the lowered and the default
    # CHUNK_LEN (T = CHUNK_LEN / 2 there), with grouped B/C shrinking BLOCK_D and straddling windows
    _case("n1-w3", 1, 20, 37, 1, 3, C="constant"),
    _case("n1-default-chunk-straddle-w11", 1, 3, 40, 1, 11, chunk=None, slow=False),
    _case("n3-grouped-default-chunk", 2, 6, 45, 3, "auto", B="grouped", groups=(3, 1), chunk=None),
    _case("n40-w5", 1, 3, 29, 40, 5, B="constant", bias=False),
    _case("n40-default-chunk-w16", 1, 2, 41, 40, 16, chunk=None, ckpt_every=2),
    _case("n200-straddle-w6", 1, 2, 23, 200, 6, C="grouped", groups=(2, 2), slow=False),
    _case("n200-bf16-default-chunk", 1, 2, 30, 200, "auto", chunk=None, dtype="bfloat16"),
    # a state carried in (prev_state, its gradient too): first checkpoint, several runs, straddling
    # windows, the last state's gradient alone, half precision, and a position offset (the call split at
    # the first window start)
    _case("prev-lb-w3-checkpoint-every-2", 2, 4, 37, 4, 3, ckpt_every=2, prev=True, slow=False),
    _case("prev-straddle-w11-last-only", 1, 3, 30, 4, 11, loss="last", prev=True),
    _case("prev-bf16-offset-5-w4", 1, 4, 29, 4, 4, dtype="bfloat16", prev=True, offset=5, slow=False),
]
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# ----------------------------------------------------------------------------------------------
# The interpreter subprocess (this file run as a script)
# ----------------------------------------------------------------------------------------------


def _inputs(case, seed):
    return make_inputs(case["batch"], case["dim"], case["seqlen"], case["dstate"], B=case["B"], C=case["C"],
                       groups=case["groups"], with_D=case["D"], with_z=case["z"], with_bias=case["bias"],
                       softplus=case["softplus"], dtype=getattr(torch, case["dtype"]), seed=seed)


def _run_case(case, seed, defaults):
    from lbmamba.ops import selective_scan_fn, selective_scan_ref, triton_scan

    triton_scan.CHUNK_LEN = case["chunk"] or defaults["chunk"]
    triton_scan.CHECKPOINT_EVERY = case["ckpt_every"] or defaults["ckpt_every"]
    inputs = _inputs(case, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    # Output gradients exactly representable in u's dtype, so that both sides receive the same.
    g_out = torch.randn(inputs["u"].shape, generator=gen).to(inputs["u"].dtype).double()
    g_last = torch.randn(case["batch"], case["dim"], case["dstate"], generator=gen).double()
    weights = {"both": (1.0, 1.0), "out": (1.0, 0.0), "last": (0.0, 1.0)}[case["loss"]]
    order = ORDER + ("prev_state",)
    inputs["prev_state"] = torch.randn(g_last.shape, generator=gen).float() if case["prev"] else None

    def run(scan, cast, **kwargs):
        leaves = {k: None if v is None else cast(v).detach().requires_grad_(True) for k, v in inputs.items()}
        out, last = scan(*(leaves[k] for k in ORDER), delta_softplus=case["softplus"], return_last_state=True,
                         prev_state=leaves["prev_state"], window=case["window"], position_offset=case["offset"],
                         **kwargs)  # fmt: skip
        loss = weights[0] * (out.double() * g_out).sum() + weights[1] * (last.double() * g_last).sum()
        loss.backward()
        grads = {"d" + k: leaves[k].grad for k in order if leaves[k] is not None}
        return {"out": out, "last_state": last, **grads}

    triton_scan.POISON_OUTPUTS = True  # an element the kernels do not write stays NaN
    got = run(selective_scan_fn, lambda t: t, backend="triton")
    expected = run(selective_scan_ref, lambda t: t.double())
    errors = {}
    for name, value in got.items():
        ref = expected[name].double()
        errors[name] = ((value.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    if case["window"] == 1 and not case["prev"]:  # window 1 is exactly the vanilla Mamba scan
        vanilla = vanilla_mamba_scan(**{k: inputs[k] for k in ORDER}, softplus=case["softplus"])
        errors["out vs vanilla Mamba"] = ((got["out"].double() - vanilla).norm() / vanilla.norm()).item()
    leaf_dtypes = {"d" + k: str(inputs[k].dtype) for k in order if inputs[k] is not None}
    problems = [
        f"{name} has dtype {got[name].dtype} (input {leaf_dtypes[name]})"
        for name in leaf_dtypes
        if str(got[name].dtype) != leaf_dtypes[name]
    ]
    problems += [f"{name} has non-finite values" for name, value in got.items() if not torch.isfinite(value).all()]
    return dict(errors=errors, problems=problems)


def _interpreter_main(base_seed, case_ids):
    from lbmamba.ops import triton_scan

    defaults = dict(chunk=triton_scan.CHUNK_LEN, ckpt_every=triton_scan.CHECKPOINT_EVERY)
    results = {}
    for case in (c for c in CASES if c["id"] in case_ids):
        seed = _case_seed(base_seed, case["id"])
        try:
            results[case["id"]] = dict(seed=seed, **_run_case(case, seed, defaults))
        except Exception as exc:  # reported by the case's test, with the others still run
            import traceback

            results[case["id"]] = dict(seed=seed, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    print(json.dumps(results))


def _case_seed(base_seed, case_id):
    return (base_seed + zlib.crc32(case_id.encode())) % 2**31


def _subprocess_env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), str(TESTS), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreter_results(request):
    """The cases of this session's selected tests, run in one interpreter subprocess."""
    base_seed = BASE_SEED
    selected = [item.callspec.params["case"]["id"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    proc = subprocess.run(
        [sys.executable, __file__, "--interpreter-cases", str(base_seed), ",".join(selected)],
        env=_subprocess_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"the interpreter subprocess failed (LBMAMBA_TEST_SEED={base_seed}):\n{proc.stderr[-6000:]}")
    return base_seed, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"], marks=pytest.mark.slow if c["slow"] else ())
                                  for c in CASES])
def test_interpreted_kernels_match_float64_reference(interpreter_results, case):
    base_seed, results = interpreter_results
    res = results[case["id"]]
    replay = f"seed {res['seed']}; replay with LBMAMBA_TEST_SEED={base_seed}"
    assert "error" not in res, f"{replay}\n{res.get('error')}"
    assert not res["problems"], f"{replay}: {res['problems']}"
    tol = TOLERANCE[case["dtype"]]
    given = {"D": case["D"], "z": case["z"], "delta_bias": case["bias"], "prev_state": case["prev"]}
    expected = {"out", "last_state"} | {"d" + k for k in ORDER + ("prev_state",) if given.get(k, True)}
    if case["window"] == 1 and not case["prev"]:
        expected.add("out vs vanilla Mamba")
    assert set(res["errors"]) == expected
    bad = {k: v for k, v in res["errors"].items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad} ({replay})"


# Interface ------------------------------------------------------------------------------------

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def test_supports_and_is_available():
    from lbmamba.ops import triton_scan

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert triton_scan.supports(torch.device("cuda"), dtype)
        assert triton_scan.supports(torch.device("cpu"), dtype) == _INTERPRETING
    assert not triton_scan.supports(torch.device("cuda"), torch.float64)
    assert not triton_scan.supports(torch.device("cpu"), torch.float64)
    reason = triton_scan.is_available()
    if _INTERPRETING or torch.cuda.is_available():
        assert reason is None
    else:
        assert isinstance(reason, str) and "TRITON_INTERPRET" in reason


def test_explicit_triton_backend_refuses_float64():
    from lbmamba.ops import selective_scan_fn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    u = torch.randn(1, 2, 5, dtype=torch.float64, device=device)
    A = -torch.ones(2, 3, dtype=torch.float64, device=device)
    B = torch.randn(1, 3, 5, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="triton"):
        selective_scan_fn(u, u.abs(), A, B, B, backend="triton")


@pytest.mark.parametrize(
    "seqlen, window, chunk_len",
    [(196, 8, 16), (1024, 16, 16), (37, 3, 15), (37, 1, 16), (100, 40, 16), (5, 100, 15), (40, 20, 16)],
)
@pytest.mark.parametrize("every", [1, 8])
def test_chunks_hold_whole_windows_and_one_checkpoint_per_run(seqlen, window, chunk_len, every, monkeypatch):
    from lbmamba.ops import triton_scan

    monkeypatch.setattr(triton_scan, "CHUNK_LEN", 16)
    monkeypatch.setattr(triton_scan, "CHECKPOINT_EVERY", every)
    assert triton_scan._chunking(seqlen, window)[0] == chunk_len
    n_chunks = -(-seqlen // chunk_len)
    assert triton_scan.num_checkpoints(seqlen, window) == -(-n_chunks // every)
    assert triton_scan.num_checkpoints(seqlen, window, 16) == -(-n_chunks // every)


@pytest.mark.parametrize("dstate, tile", [(1, 8), (4, 8), (8, 8), (9, 16), (16, 16), (17, 8), (200, 8)])
def test_tile_length_follows_d_state(dstate, tile, monkeypatch):
    """T = CHUNK_LEN only at BLOCK_N 16; elsewhere half of it (chunks, checkpoints and straddling follow)."""
    from lbmamba.ops import triton_scan

    monkeypatch.setattr(triton_scan, "CHUNK_LEN", 16)
    assert triton_scan.tile_len(dstate) == tile
    u, A = torch.empty(2, 64, 100), torch.empty(64, dstate)
    cfg = triton_scan._Launch(u, A, A, A, 12)
    assert (cfg.tile, cfg.blocks()["T"]) == (tile, tile)
    assert (cfg.chunk_len, cfg.straddle) == ((8, True) if tile == 8 else (12, False))
    n_chunks = -(-100 // cfg.chunk_len)
    assert cfg.n_ckpt == triton_scan.num_checkpoints(100, 12, dstate) == -(-n_chunks // triton_scan.CHECKPOINT_EVERY)
    assert triton_scan.checkpoint_shape(2, 64, 100, dstate, 12) == (2, 64, cfg.n_ckpt, dstate)


def test_launch_blocks():
    """The LBVim layer's blocks (d_state 16) are the measured ones; elsewhere the rule's (see `_block_rule`):
    no more pairs per thread than the full block's, at most 8 warps."""
    from lbmamba.ops import triton_scan

    def blocks(dim, dstate, backward, groups=1):
        u, A = torch.empty(1, dim, 1), torch.empty(dim, dstate)
        cfg = triton_scan._Launch(u, A, torch.empty(1, groups, dstate, 1), A, 8, backward=backward)
        return cfg.block_n, cfg.block_d, cfg.num_warps, cfg.tile

    assert blocks(384, 16, False) == (16, 16, 4, 16) and blocks(384, 16, True) == (16, 8, 4, 16)
    assert blocks(384, 1, False) == (1, 128, 4, 8) and blocks(384, 1, True) == (1, 16, 1, 8)
    assert blocks(384, 3, True) == (4, 32, 4, 8) and blocks(384, 40, True) == (64, 2, 4, 8)
    assert blocks(384, 200, False) == (256, 1, 4, 8) and blocks(384, 200, True) == (256, 1, 8, 8)
    assert blocks(384, 16, True, groups=96) == (16, 4, 4, 16)  # a smaller block: half a pair per thread
    assert blocks(384, 16, False, groups=96) == (16, 4, 2, 16)  # one pair per thread
    for dstate in range(1, 257):
        for dim in (1, 2, 6, 40, 384):
            for backward in (False, True):
                bn, bd, nw, _ = blocks(dim, dstate, backward)
                assert 1 <= nw <= 8 and bn * bd <= 32 * nw * 2, (dim, dstate, backward, bn, bd, nw)


# Compilation for the GPU ----------------------------------------------------------------------

_ACTIVATIONS = ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
_COMPILE_VARIANTS = [
    # (kernel, dtype, pairs per thread of the full block (informational: the blocks come from `_Launch`), N, constexprs)
    ("_fwd_kernel", "bf16", 2, 16, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, B_CONST=False,
                                        C_CONST=False, WINDOW=8, STRADDLE=False, HAS_PREV=False)),  # fmt: skip
    ("_bwd_kernel", "bf16", 1, 16, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, B_CONST=False,
                                        C_CONST=False, WINDOW=8, STRADDLE=False, HAS_PREV=False)),  # fmt: skip
    ("_fwd_kernel", "fp32", 2, 64, dict(HAS_D=True, HAS_Z=False, HAS_BIAS=True, SOFTPLUS=False, B_CONST=True,
                                        C_CONST=False, WINDOW=24, STRADDLE=True, HAS_PREV=True)),  # fmt: skip
    ("_bwd_kernel", "fp32", 1, 64, dict(HAS_D=True, HAS_Z=False, HAS_BIAS=True, SOFTPLUS=False, B_CONST=True,
                                        C_CONST=False, WINDOW=24, STRADDLE=True, HAS_PREV=True)),  # fmt: skip
    # a state carried in (prev_state) at the LBVim layer's flags (slow: the N64 pair above compiles HAS_PREV)
    ("_fwd_kernel", "bf16", 2, 16, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, B_CONST=False,
                                        C_CONST=False, WINDOW=8, STRADDLE=False, HAS_PREV=True)),  # fmt: skip
    ("_bwd_kernel", "bf16", 1, 16, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, B_CONST=False,
                                        C_CONST=False, WINDOW=8, STRADDLE=False, HAS_PREV=True)),  # fmt: skip
    ("_fwd_right_carry_kernel", "fp32", 2, 4, dict(HAS_BIAS=True, SOFTPLUS=True, B_CONST=False, WINDOW=24)),
    ("_bwd_left_carry_kernel", "fp32", 1, 4, dict(HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, C_CONST=True, WINDOW=24)),
]


@pytest.mark.skipif(_INTERPRETING, reason="under TRITON_INTERPRET=1 the kernels are interpreted, not compiled")
@pytest.mark.parametrize(
    "kernel, dtype, pairs, dstate, constexprs",
    [pytest.param(*v, marks=[pytest.mark.slow] if v[4].get("HAS_PREV") and v[3] == 16 else [],
                  id=f"{v[0]}-{v[1]}-N{v[3]}{'-prev' if v[4].get('HAS_PREV') else ''}") for v in _COMPILE_VARIANTS],
)
def test_kernels_compile_for_sm90(kernel, dtype, pairs, dstate, constexprs):
    """The interpreter accepts programs the compiler rejects (e.g. branches returning different
    shapes); compiling for an H100 target needs no GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lbmamba.ops import triton_scan

    fn = getattr(triton_scan, kernel)
    u, A = torch.empty(1, 1024, 1), torch.empty(1024, dstate)
    cfg = triton_scan._Launch(u, A, A, A, 1, backward=kernel.startswith("_bwd"))
    chunk = cfg.tile
    constexprs = dict(constexprs, CHUNK=chunk, T=chunk, BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n)
    if kernel in ("_fwd_kernel", "_bwd_kernel"):
        constexprs["CKPT_EVERY"] = triton_scan.CHECKPOINT_EVERY
    half_bc = {"B_ptr": not constexprs.get("B_CONST", True), "C_ptr": not constexprs.get("C_CONST", True)}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (dtype if name in _ACTIVATIONS or half_bc.get(name) else "fp32")
        else:
            signature[name] = "i32"
    assert set(constexprs) <= set(fn.arg_names)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    try:
        options = {k: v for k, v in cfg.blocks().items() if k in ("num_warps", "maxnreg")}
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as exc:  # a toolchain problem (e.g. ptxas missing), not a program error
        if "ptxas" in str(exc).lower():
            pytest.skip(f"no usable ptxas: {exc}")
        raise
    assert compiled.asm["cubin"]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--interpreter-cases":
        _interpreter_main(int(sys.argv[2]), set(sys.argv[3].split(",")))
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --interpreter-cases SEED ID[,ID...]")
