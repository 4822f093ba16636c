"""benchmarks/triton_static.py: the Triton kernels compiled for sm_80 and sm_90 without a GPU.

* The quick subset compiles for both archs with no register spills, the full enumeration likewise
  (both slow, about 15 s per arch for the quick subset on a 2-core machine: `pytest -m slow`): a
  configuration that spills fails the test.
* The enumeration covers every (BLOCK_N, BLOCK_D, num_warps) `_Launch` produces for d_state 1..256,
  each kernel and dtype (checked against `_Launch` itself, on small CPU tensors).
* The occupancy rules and the roofline's byte counts, on known cases.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "triton_static.py"


@pytest.fixture(scope="module")
def static():
    """The benchmark script as a module (registered while the tests use it, as its dataclass needs;
    sys.path and sys.modules put back afterwards)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("triton_static", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_static"] = module
    try:
        spec.loader.exec_module(module)
        sys.path[:] = saved
        yield module
    finally:
        sys.modules.pop("triton_static", None)
        sys.path[:] = saved


@pytest.fixture(scope="module")
def toolchain(static):
    problem = static.toolchain_problem()
    if problem:
        pytest.skip(problem)


def _compile_all(static, configs, arch):
    rows, failures = [], []
    for config in configs:
        try:
            rows.append(static.compile_stats(config, arch, sass=False))
        except RuntimeError as exc:  # a toolchain problem (e.g. ptxas missing), not a program error
            if "ptxas" in str(exc).lower() and "spill" not in str(exc).lower():
                pytest.skip(f"no usable ptxas: {exc}")
            failures.append(f"{config.label()}: {exc}")
    assert not failures, "\n".join(failures)
    return rows


def _spills(rows):
    return [
        f"sm_{r['arch']} {r['config']} [{r['tier']}]: {r['regs']} registers, stack {r['stack_bytes']} B, "
        f"spill stores {r['spill_store_bytes']} B, spill loads {r['spill_load_bytes']} B"
        for r in rows
        if r["spills"]
    ]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="TRITON_INTERPRET=1: nothing is compiled")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.usefixtures("toolchain")
def test_quick_subset_compiles_without_spills(static, arch):
    configs = static.configurations(quick=True)
    kernels = {c.kernel for c in configs}
    assert kernels == set(static.KERNELS)
    assert {c.dtype for c in configs} == {"fp32", "fp16", "bf16"}
    start = time.perf_counter()
    rows = _compile_all(static, configs, arch)
    assert not _spills(rows), "register spills:\n" + "\n".join(_spills(rows))
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["occupancy"] > 0, r
    assert time.perf_counter() - start < 300  # about 15 s per arch on a 2-core machine


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="TRITON_INTERPRET=1: nothing is compiled")
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.usefixtures("toolchain")
def test_every_configuration_compiles_without_spills(static, arch):
    """About 1,200 compiles per arch (an hour or more on a 2-core machine). With `_Launch`'s per-BLOCK_N
    rule (T = 8 outside BLOCK_N 16, ptxas's register limit for one-warp and T = 8 backward launches) every
    tier but "flags" compiled without spills on both archs; "flags" (BLOCK_N 16, full blocks, unchanged
    binaries) had none before."""
    rows = _compile_all(static, static.configurations(), arch)
    assert not _spills(rows), f"{len(_spills(rows))} configurations spill registers:\n" + "\n".join(_spills(rows))


#: the enumeration reads the kernels' JIT parameters, which interpreted functions lack
_NEEDS_JIT = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") == "1", reason="TRITON_INTERPRET=1: the kernels are interpreted functions"
)


def _launch_blocks(triton_scan):
    """{kernel: {(BLOCK_N, BLOCK_D, num_warps)}} that `_Launch` gives for d_state 1..256 over dims
    and group counts (canonical B: constant (dim, N) or grouped (batch, G, N, L))."""
    kernels = ("_fwd_kernel", "_fwd_right_carry_kernel", "_bwd_kernel", "_bwd_left_carry_kernel")
    found = {name: set() for name in kernels}
    for dstate in range(1, 257):
        for dim, groups in [(1, 1), (3, 1), (5, 1), (12, 1), (12, 3), (40, 2), (96, 1), (96, 6), (384, 1), (384, 2),
                            (768, 1), (1000, 1), (1024, 1), (1536, 4)]:  # fmt: skip
            u, A = torch.empty(1, dim, 1), torch.empty(dim, dstate)  # A is also a constant B / C
            for B in (A, torch.empty(1, groups, dstate, 1)):
                for name in kernels:
                    cfg = triton_scan._Launch(u, A, B, A, 1, backward=name.startswith("_bwd"))
                    found[name].add((cfg.block_n, cfg.block_d, cfg.num_warps))
    return found


@_NEEDS_JIT
def test_enumeration_covers_every_launch_block(static):
    from lbmamba.ops import triton_scan

    launched = _launch_blocks(triton_scan)
    assert {bn for blocks in launched.values() for bn, _, _ in blocks} == {2**k for k in range(9)}
    configs = static.configurations()
    assert triton_scan._fwd_kernel is static.JIT["_fwd_kernel"]  # the recorders are gone again
    for kernel, blocks in launched.items():
        for dtype in ("fp32", "fp16", "bf16"):
            covered = {(c.block_n, c.block_d, c.num_warps) for c in configs if c.kernel == kernel and c.dtype == dtype}
            missing = sorted(blocks - covered)
            assert not missing, f"{kernel} {dtype}: (BLOCK_N, BLOCK_D, num_warps) not enumerated: {missing}"
    # the quick subset spans the kernels, dtypes and the extremes of BLOCK_N
    quick = static.configurations(quick=True)
    assert {c.block_n for c in quick} >= {1, 16, 64}


@_NEEDS_JIT
def test_launches_follow_the_wrappers(static):
    """The recorded launches carry the wrappers' flags: straddling windows add the carry kernels,
    constant B/C and absent inputs set the flags, and the backward gets fewer pairs per thread."""
    configs = static.launches(2, 384, 300, 16, "bf16", 24, B="constant", C="variable", z=False)
    kernels = [c.kernel for c in configs]
    assert kernels == ["_fwd_right_carry_kernel", "_fwd_kernel", "_bwd_left_carry_kernel", "_bwd_kernel"]
    fwd = configs[1]
    assert fwd.get("B_CONST") and not fwd.get("C_CONST") and fwd.get("STRADDLE") and not fwd.get("HAS_Z")
    assert (fwd.block_n, fwd.block_d, fwd.num_warps, fwd.dtype) == (16, 16, 4, "bf16")
    assert (configs[3].block_d, dict(configs[3].pointers)["B_ptr"]) == (8, "*fp32")
    w1 = static.launches(1, 64, 197, 16, "fp32", 1, exact=True)
    assert [c.kernel for c in w1] == ["_fwd_kernel", "_bwd_kernel"]
    assert w1[0].get("WINDOW") == 1 and dict(w1[0].ints)["L"] == 197


def test_occupancy_follows_the_calculator(static):
    # 248 registers: 7,936 per warp, two warps per 16,384-register sub-partition, 8 warps = 2 blocks of 4
    assert static.occupancy(248, 4, 1024, 90)["warps_per_sm"] == 8
    # 64 registers, 4 warps: 8 warps per sub-partition, 32 warps per SM (half of 64)
    occ = static.occupancy(64, 4, 1024, 90)
    assert (occ["blocks_per_sm"], occ["occupancy"]) == (8, 0.5)
    # 32 registers, 1 warp: 64 warps by registers, but 32 blocks at most
    assert static.occupancy(32, 1, 0, 80)["blocks_per_sm"] == 32
    # shared memory: 100 KB blocks fit twice on an H100 SM (228 KB), once on an A100 (164 KB)
    assert static.occupancy(32, 1, 100 * 1024, 90)["blocks_per_sm"] == 2
    assert static.occupancy(32, 1, 100 * 1024, 80)["limited_by"] == "shared memory"


@_NEEDS_JIT
def test_roofline_counts_the_compulsory_bytes(static):
    rows = static.roofline((128, 384, 197, 16), "fp32")
    fwd = next(r for r in rows if r["kernel"] == "fwd")
    # u, delta, z read and out written (16 B), B and C (2 * 16 * 4 / 384), checkpoints and last state
    expected = 16 + 2 * 16 * 4 / 384 + 2 * 16 * 4 / 197 + 16 * 4 / 197
    assert fwd["bytes_per_element"] == pytest.approx(expected, rel=1e-3)
    assert [r["kernel"] for r in rows] == ["fwd", "bwd"]  # window 8: no carry kernels
    long = static.roofline((1, 768, 4096, 16), "bf16", window=40)
    assert [r["kernel"] for r in long] == ["fwd_rcarry", "fwd", "bwd_lcarry", "bwd"]
    assert all(r["bound_us"] >= max(r["t_hbm_us"], r["t_mufu_us"], r["t_fp32_us"]) for r in rows + long)
