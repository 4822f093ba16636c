"""Static evidence for the Triton scan kernels from the compiler alone (no GPU needed): registers,
spills, shared memory and occupancy of every configuration the backend can launch, compiled for sm_80
(A100) and sm_90 (H100), and a roofline estimate per kernel for an H100 SXM.

    PYTHONPATH=src python benchmarks/triton_static.py [--quick] [--arch 90 80] [--json out.json]
                                                      [--jobs N] [--tiers T ...] [--resume rows.jsonl]
    PYTHONPATH=src python benchmarks/triton_static.py --report out.json [--gpu-check gpu_check.json]
    PYTHONPATH=src python benchmarks/triton_static.py --roofline-only [--gpu-check gpu_check.json]

--report prints the tables of an earlier run again; --gpu-check puts the timings of
benchmarks/gpu_check.py (run on a real GPU) next to the roofline bounds.

What a configuration is. `triton_scan.forward` / `backward` launch four kernels, and every distinct
set of compile-time values (`tl.constexpr` arguments, num_warps, pointer dtypes) is a separate
compiled binary. The configurations are not listed by hand: `launches()` runs the backend's own
wrappers on meta tensors (no data, no device) with the kernels swapped for recorders, so the
constexprs, num_warps, BLOCK_D / BLOCK_N and pointer dtypes are exactly those `_Launch` and the
wrappers produce for those inputs. `configurations()` feeds them a grid of inputs (see TIERS there).

The full product is too large to compile (per kernel: 45 (BLOCK_N, BLOCK_D) pairs x 3 dtypes x 2^6
flag combinations x 19+ window classes ~ 150,000 binaries), so it is covered in tiers:
  blocks    every (BLOCK_N, BLOCK_D, num_warps) `_Launch` can produce for d_state 1..256 and any dim
            and group count, each dtype, with the flags of a Mamba layer (D, z, delta_bias, softplus,
            variable B and C) at the LB window 8 (non-straddling h^R)
  carry-blocks  the same for the two carry kernels (launched for windows longer than a chunk), at
            window 24
  envelope  for every (BLOCK_N, num_warps) (the largest BLOCK_D giving it), fp32 and bf16 (fp16
            compiles to the same code as bf16 but for the conversion instructions), four more flag
            sets: the Mamba layer at window 1 and at window 24 (straddling: both carry kernels), all
            options with constant B and C at window 24, and no options at window 1
  flags     the full product of HAS_D x HAS_Z x HAS_BIAS x SOFTPLUS x B constant/variable x C
            constant/variable (64) x windows {8, 24} (h^R within chunks / straddling) at d_state 16
            (BLOCK_N 16, the default blocks), bf16: shows how far the flags move registers, so that
            the tiers above, which fix them, can be judged (window 1, which drops h^R, is in the
            envelope)
  windows   every non-straddling window class (WINDOW 1..16, each with its own CHUNK) and straddling
            windows 17, 32, 197, at d_state 16, bf16, Mamba-layer flags
  ckpt1     CHECKPOINT_EVERY = 1 (what benchmarks/gpu_check.py's "triton_lb_ckpt1" launches), d_state
            16, fp32 and bf16, windows 8 and 24
  launches  exactly what a launch compiles at the LBVim-T layer shape (128, 384, 197, 16) and the long
            shape (1, 768, 4096, 16), fp32 / bf16, windows "auto" and 1, and at gpu_check.py's timing
            shapes: here the integer arguments are specialised as Triton's JIT does (== 1 becomes a
            constant, multiples of 16 get a divisibility hint)
In every other tier the integer arguments (dim, L, N, n_chunks, ...) are compiled generic (no
specialisation); pointers carry the 16-byte alignment hint the JIT gives any torch allocation.
Grouped B/C (G > 1) change only BLOCK_D and an integer argument, so they are covered by the blocks.

Measured per binary: registers per thread, spill stores / loads and stack frame (from ptxas -v,
which Triton runs with every compile: `compiled.n_regs` / `n_spills` are filled only when the binary
is loaded on a GPU), shared memory (`compiled.metadata.shared`, the dynamic shared memory of the
launch), and occupancy (resident warps / 64) with the rules of NVIDIA's occupancy calculator
(cuda_occupancy.h): registers allocated per warp in units of 256, per SM sub-partition (4), 1 KB of
shared memory reserved per block, at most 32 blocks and 64 warps per SM. Plus the instruction mix of
the kernel's main loop from the SASS (cuobjdump), which the roofline uses.

The triton cache is a fresh directory under /tmp, removed at exit; nothing is written elsewhere.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from lbmamba.engine.files import write_json
from lbmamba.ops import triton_scan

KERNELS = ("_fwd_kernel", "_fwd_right_carry_kernel", "_bwd_kernel", "_bwd_left_carry_kernel")
SHORT = {"_fwd_kernel": "fwd", "_fwd_right_carry_kernel": "fwd_rcarry", "_bwd_kernel": "bwd",
         "_bwd_left_carry_kernel": "bwd_lcarry"}  # fmt: skip
#: the kernels' JIT functions, kept here: `launches()` swaps the module's for recorders while it runs
JIT = {name: getattr(triton_scan, name) for name in KERNELS}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DSTATE_RANGE = range(1, triton_scan.MAX_DSTATE + 1)  # every d_state the backend runs

#: Per-SM limits (CUDA programming guide, compute capability tables) and occupancy-calculator rules.
ARCHS = {
    80: dict(gpu="A100 (sm_80)", regs=65536, smem=164 * 1024, smem_block=163 * 1024, warps=64, blocks=32),
    90: dict(gpu="H100 (sm_90)", regs=65536, smem=228 * 1024, smem_block=227 * 1024, warps=64, blocks=32),
}
REG_UNIT = 256  # registers are allocated per warp in units of 256
SUB_PARTITIONS = 4  # ... out of each of the SM's 4 register files (a quarter of the 65536 each)
SMEM_RESERVED = 1024  # shared memory the driver reserves per block (sm_80 and later)
SMEM_UNIT = 128  # shared memory allocation granularity
MAX_REGS = 255

#: H100 SXM5, for the roofline (NVIDIA's datasheet / CUDA guide throughput tables).
H100 = dict(hbm_bytes_s=3.35e12, fp32_flops_s=67e12, sms=132, clock_hz=1.83e9, mufu_per_clk_sm=16, issue_per_clk_sm=4)
SHAPES = {"LBVim-T layer": (128, 384, 197, 16), "long": (1, 768, 4096, 16)}

# The triton cache and home go to a private directory under /tmp, created on first use.
_TMP = {}


def _tmpdir():
    if "dir" not in _TMP:
        _TMP["dir"] = tempfile.mkdtemp(prefix="lbmamba-triton-static-", dir="/tmp")
        atexit.register(shutil.rmtree, _TMP["dir"], ignore_errors=True)
    return _TMP["dir"]


# ----------------------------------------------------------------------------------------------
# Configurations: what the wrappers launch
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One compiled binary: kernel, num_warps, constexprs and pointer dtypes (in argument order), and
    the integer arguments when they are specialised as at a real launch (empty: generic)."""

    kernel: str
    num_warps: int
    constexprs: tuple  # ((name, value), ...)
    pointers: tuple  # ((name, "*bf16"), ...)
    ints: tuple = ()  # ((name, value), ...)
    tier: str = field(default="", compare=False)
    maxnreg: int | None = None  # ptxas's register limit, when the launch sets one

    def options(self) -> dict:
        """The compile options of the launch (num_warps, and maxnreg when set)."""
        return dict(num_warps=self.num_warps, **({"maxnreg": self.maxnreg} if self.maxnreg else {}))

    def get(self, name, default=None):
        return dict(self.constexprs).get(name, default)

    @property
    def dtype(self) -> str:
        ptrs = dict(self.pointers)
        return (ptrs.get("u_ptr") or ptrs["dout_ptr"]).lstrip("*")

    @property
    def block_n(self) -> int:
        return self.get("BLOCK_N")

    @property
    def block_d(self) -> int:
        return self.get("BLOCK_D")

    def flags(self) -> str:
        """The boolean constexprs that are set, and the window, as a short string."""
        names = [k for k, v in self.constexprs if isinstance(v, bool) and v]
        window = f"W{self.get('WINDOW')}/C{self.get('CHUNK')}"
        ckpt = f" K{self.get('CKPT_EVERY')}" if self.get("CKPT_EVERY", 8) != 8 else ""
        return f"{window}{ckpt} " + ",".join(n.replace("HAS_", "") for n in names)

    def label(self) -> str:
        spec = " exact-ints" if self.ints else ""
        regs = f" r{self.maxnreg}" if self.maxnreg else ""
        return (f"{SHORT[self.kernel]} {self.dtype} N{self.block_n} D{self.block_d} w{self.num_warps}{regs} "
                f"{self.flags()}{spec}")  # fmt: skip


class _Recorder:
    def __init__(self, name, records):
        self.name, self.records = name, records

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.records.append((self.name, args, kwargs))


@contextlib.contextmanager
def _recording():
    """The module's kernels replaced by recorders, and its device check by a no-op (meta tensors)."""
    records = []
    saved = {name: getattr(triton_scan, name) for name in (*KERNELS, "_check_inputs")}
    try:
        for name in KERNELS:
            setattr(triton_scan, name, _Recorder(name, records))
        triton_scan._check_inputs = lambda u, A: None
        yield records
    finally:
        for name, value in saved.items():
            setattr(triton_scan, name, value)


def _config_from_record(name, args, kwargs, exact, tier):
    fn = JIT[name]
    num_warps = kwargs.pop("num_warps")
    maxnreg = kwargs.pop("maxnreg", None)
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    constexprs, pointers, ints = [], [], []
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr:
            constexprs.append((param.name, value))
        elif isinstance(value, torch.Tensor):
            pointers.append((param.name, native_specialize_impl(CUDABackend, value, False, True, True)[0]))
        elif isinstance(value, int):
            ints.append((param.name, value))
        else:
            raise TypeError(f"{name}: unexpected argument {param.name}={value!r}")
    return Config(name, num_warps, tuple(constexprs), tuple(pointers), tuple(ints) if exact else (), tier, maxnreg)


def launches(batch, dim, seqlen, dstate, dtype="fp32", window=8, B="variable", C="variable", groups=2, D=True,
             z=True, bias=True, softplus=True, ckpt_every=None, exact=False, tier=""):  # fmt: skip
    """The configurations `triton_scan.forward` + `backward` launch for these inputs (meta tensors).

    window: an int or "auto" (resolved as the public API does). exact: keep the integer arguments
    (the launch's JIT specialisation) instead of compiling them generic.
    """
    from lbmamba.ops import resolve_window

    window = resolve_window(window, seqlen)
    dt = DTYPES[dtype]
    meta = dict(device="meta")

    def bc(form):
        if form == "constant":
            return torch.empty(dim, dstate, dtype=torch.float32, **meta)
        # the backends receive B / C canonical (scan.py's as_grouped): variable = grouped with G = 1
        return torch.empty(batch, 1 if form == "variable" else groups, dstate, seqlen, dtype=dt, **meta)

    u = torch.empty(batch, dim, seqlen, dtype=dt, **meta)
    args = (
        u, torch.empty_like(u), torch.empty(dim, dstate, dtype=torch.float32, **meta), bc(B), bc(C),
        torch.empty(dim, **meta) if D else None, torch.empty_like(u) if z else None,
        torch.empty(dim, **meta) if bias else None,
    )  # fmt: skip
    default_every = triton_scan.CHECKPOINT_EVERY
    with _recording() as records:
        try:
            if ckpt_every is not None:
                triton_scan.CHECKPOINT_EVERY = ckpt_every
            out, last, ckpt = triton_scan.forward(*args, softplus, window)
            triton_scan.backward(torch.empty_like(out), torch.empty_like(last), *args, softplus, window, ckpt)
        finally:
            triton_scan.CHECKPOINT_EVERY = default_every
    return [_config_from_record(name, a, dict(k), exact, tier) for name, a, k in records]


def block_table():
    """{kernel: {(BLOCK_N, BLOCK_D, num_warps)}} over d_state 1..256, from `_Launch` on meta tensors.

    BLOCK_D = min(the full BLOCK_D of `_block_rule`, next_pow2(dim), the largest power of two dividing
    dim / G), and num_warps a function of (BLOCK_N, BLOCK_D): every power of two up to the first term
    is reachable (dim = that power, G = 1), and nothing else, so powers of two for dim suffice.
    """
    table = {name: set() for name in KERNELS}
    for n in DSTATE_RANGE:
        for log_dim in range(10):
            dim = 2**log_dim
            u = torch.empty(1, dim, 1, device="meta")
            A = torch.empty(dim, n, device="meta")
            B = torch.empty(1, 1, n, 1, device="meta")  # canonical variable B: one group
            for name in KERNELS:
                cfg = triton_scan._Launch(u, A, B, B, 1, backward=name.startswith("_bwd"))
                table[name].add((cfg.block_n, cfg.block_d, cfg.num_warps))
    return table


#: Flag sets of the tiers (see the module docstring).
LAYER = dict(D=True, z=True, bias=True, softplus=True, B="variable", C="variable")
CONST = dict(D=True, z=True, bias=True, softplus=True, B="constant", C="constant")
BARE = dict(D=False, z=False, bias=False, softplus=False, B="variable", C="variable")
ENVELOPE = [("layer", LAYER, 1), ("layer", LAYER, 24), ("const", CONST, 24), ("bare", BARE, 1)]
#: (batch, dim, L, N) the LBVim-T layer and the long shape, and gpu_check.py's timing shapes
LAUNCH_SHAPES = [(128, 384, 197, 16), (1, 768, 4096, 16), (8, 384, 196, 16), (128, 384, 196, 16), (8, 384, 1024, 16),
                 (2, 1536, 8192, 16)]  # fmt: skip


def _largest_block_d(table):
    """{kernel: {(BLOCK_N, num_warps): the largest BLOCK_D giving them}}."""
    best = {}
    for name, blocks in table.items():
        best[name] = {}
        for bn, bd, nw in blocks:
            best[name][(bn, nw)] = max(bd, best[name].get((bn, nw), 0))
    return best


def configurations(quick: bool = False) -> list:
    """Every configuration of the tiers (module docstring), each once (the first tier that has it
    names it); `quick`: a small representative subset."""
    found = {}

    def add(configs, keep=None):
        for c in configs:
            if keep is None or keep(c):
                found.setdefault(c, c)

    seqlen = 300  # longer than every window below, so WINDOW = window
    if quick:
        # The LBVim-T layer (bf16, N 16, window 8: fwd and bwd); the carry kernels of a straddling
        # window at N 16 (fp32); a straddling window with constant B/C at N 64 (fp32, all four
        # kernels); the smallest blocks (N 1, dim 1: one warp) with no options (fp16). All of them
        # compile without spills today; the full enumeration has the configurations that do not.
        add(launches(2, 384, seqlen, 16, "bf16", 8, **LAYER, tier="quick"))
        add(launches(2, 384, seqlen, 16, "fp32", 24, **LAYER, tier="quick"), keep=lambda c: "carry" in c.kernel)
        add(launches(2, 384, seqlen, 64, "fp32", 24, **CONST, tier="quick"))
        add(launches(2, 1, seqlen, 1, "fp16", 1, **BARE, tier="quick"))
        return list(found)

    table = block_table()
    best = _largest_block_d(table)
    dims = [2**k for k in range(10)]
    for dtype in DTYPES:  # blocks: every (BLOCK_N, BLOCK_D), Mamba-layer flags, window 8
        for log_n in range(9):
            for dim in dims:
                add(launches(2, dim, seqlen, 2**log_n, dtype, 8, **LAYER, tier="blocks"))
    for dtype in DTYPES:  # carry blocks: the two carry kernels at every (BLOCK_N, BLOCK_D), window 24
        for log_n in range(9):
            for dim in dims:
                add(launches(2, dim, seqlen, 2**log_n, dtype, 24, **LAYER, tier="carry-blocks"),
                    keep=lambda c: c.kernel in ("_fwd_right_carry_kernel", "_bwd_left_carry_kernel"))  # fmt: skip
    for window in (*range(1, 17), 17, 32, 197):  # windows
        add(launches(2, 384, max(seqlen, window), 16, "bf16", window, **LAYER, tier="windows"))
    for dtype in ("fp32", "bf16"):  # ckpt1
        for window in (8, 24):
            add(launches(2, 384, seqlen, 16, dtype, window, **LAYER, ckpt_every=1, tier="ckpt1"))
    for batch, dim, length, dstate in LAUNCH_SHAPES:  # launches: exact specialisation
        dtypes = ("fp32", "bf16") if (batch, dim, length, dstate) in SHAPES.values() else ("fp32",)
        for dtype in dtypes:
            for window in ("auto", 1):
                add(launches(batch, dim, length, dstate, dtype, window, **LAYER, exact=True, tier="launches"))
        add(launches(batch, dim, length, dstate, "fp32", "auto", **LAYER, ckpt_every=1, exact=True, tier="launches"))
    for dtype in ("fp32", "bf16"):  # envelope: the largest BLOCK_D per (BLOCK_N, num_warps), four more flag sets
        for log_n in range(9):
            for dim in dims:
                for _, flags, window in ENVELOPE:
                    add(launches(2, dim, seqlen, 2**log_n, dtype, window, **flags, tier="envelope"),
                        keep=lambda c: best[c.kernel].get((c.block_n, c.num_warps)) == c.block_d)  # fmt: skip
    for D in (False, True):  # flags: the full product at N 16, bf16
        for z in (False, True):
            for bias in (False, True):
                for softplus in (False, True):
                    for B in ("constant", "variable"):
                        for C in ("constant", "variable"):
                            for window in (8, 24):
                                add(launches(2, 384, seqlen, 16, "bf16", window, B=B, C=C, D=D, z=z, bias=bias,
                                             softplus=softplus, tier="flags"))  # fmt: skip
    return list(found)


# ----------------------------------------------------------------------------------------------
# Compiling and measuring
# ----------------------------------------------------------------------------------------------


def _signature(config):
    fn = JIT[config.kernel]
    constexprs = dict(config.constexprs)
    pointers = dict(config.pointers)
    ints = dict(config.ints)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = CUDABackend.parse_attr("D")  # torch allocations are 16-byte aligned
        elif name in ints:  # as the JIT specialises: 1 becomes a constant, multiples of 16 get a hint
            kind, key = native_specialize_impl(CUDABackend, ints[name], False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = ints[name]
            elif key:
                attrs[(i,)] = CUDABackend.parse_attr(key)
        else:
            signature[name] = "i32"
    return signature, constexprs, attrs


_PTXAS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S
)


def occupancy(regs: int, num_warps: int, smem: int, arch: int) -> dict:
    """Resident blocks and warps per SM and occupancy (warps / max warps), as cuda_occupancy.h computes
    them, and which limit binds."""
    lim = ARCHS[arch]
    regs_per_warp = math.ceil(regs * 32 / REG_UNIT) * REG_UNIT
    warps_per_part = (lim["regs"] // SUB_PARTITIONS) // regs_per_warp
    by_regs = (warps_per_part * SUB_PARTITIONS) // num_warps
    if regs_per_warp * num_warps > lim["regs"] or regs > MAX_REGS:
        by_regs = 0
    smem_block = math.ceil((smem + SMEM_RESERVED) / SMEM_UNIT) * SMEM_UNIT
    by_smem = lim["smem"] // smem_block if smem <= lim["smem_block"] else 0
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": lim["warps"] // num_warps,
              "blocks": lim["blocks"]}  # fmt: skip
    blocks = min(limits.values())
    binding = [k for k, v in limits.items() if v == blocks]
    warps = blocks * num_warps
    return dict(blocks_per_sm=blocks, warps_per_sm=warps, occupancy=warps / lim["warps"], limited_by=binding[0],
                limits=limits)  # fmt: skip


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
#: SASS opcode classes for the roofline
_CLASSES = {
    "fp32": ("FFMA", "FMUL", "FADD"),  # the FP32 pipe's arithmetic (FFMA counts once, as one instruction)
    "mufu": ("MUFU",),
    "shfl": ("SHFL",),
    "smem": ("LDS", "STS", "LDSM", "STSM"),
    "bar": ("BAR",),
    "gmem": ("LDG", "STG"),
    "atomic": ("RED", "ATOM", "ATOMG", "REDG"),
}


def sass_loops(sass: str) -> dict:
    """The instruction mix of the kernel's runtime loops, from the SASS of a one-kernel cubin.

    A backward branch closes a loop; the innermost loops are those with no other loop inside.
    "main" is the innermost loop with the most global stores (the chunk loop that writes outputs or
    carries), "recompute" (backward kernel only) the other innermost loop with global loads and
    without stores (the checkpoint replay). "total" counts the whole kernel, "outside" what is in no
    innermost loop (executed about once per program).
    """
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]
    loops = []
    for addr, op, operands in instrs:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < addr:
                loops.append((int(target.group(1), 16), addr))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]

    def mix(lo, hi):
        ops = [op for a, op, _ in instrs if lo <= a <= hi]
        counts = {"instructions": len(ops)}
        for cls, prefixes in _CLASSES.items():
            counts[cls] = sum(1 for op in ops if op.split(".")[0] in prefixes)
        counts["mufu_ops"] = dict(collections.Counter(op for op in ops if op.startswith("MUFU")))
        return counts

    mixes = [(lp, mix(*lp)) for lp in inner]
    out = {"total": mix(0, 1 << 62), "loops": len(loops)}
    if mixes:
        main = max(mixes, key=lambda m: (m[1]["gmem"] and _stores(instrs, *m[0]), m[1]["instructions"]))
        out["main"] = main[1]
        rest = [m for m in mixes if m is not main and m[1]["gmem"] and not _stores(instrs, *m[0])]
        if rest:
            out["recompute"] = max(rest, key=lambda m: m[1]["instructions"])[1]
        inside = sum(m[1]["instructions"] for m in mixes)
        out["outside"] = out["total"]["instructions"] - inside
    return out


def _stores(instrs, lo, hi):
    return sum(1 for a, op, _ in instrs if lo <= a <= hi and op.startswith(("STG", "RED", "ATOM")))


def compile_stats(config: Config, arch: int, sass: bool = True) -> dict:
    """Compile one configuration for sm_<arch> and measure it: registers, spills, stack, shared
    memory, occupancy, compile time, and (sass=True) the SASS instruction mix of its loops."""
    signature, constexprs, attrs = _signature(config)
    src = ASTSource(fn=JIT[config.kernel], signature=signature, constexprs=constexprs, attrs=attrs)
    tmp = _tmpdir()
    log = io.StringIO()
    with knobs.cache.scope(), knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.cache.home_dir = tmp
        knobs.cache.dir = os.path.join(tmp, "cache")
        knobs.compilation.always_compile = True  # ptxas must run (its log is the measurement)
        knobs.nvidia.dump_ptxas_log = True  # printed on stdout by the compiler
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=config.options())
        seconds = time.perf_counter() - start
    match = _PTXAS.search(log.getvalue())
    if match is None:
        raise RuntimeError(f"no ptxas report for {config.label()} on sm_{arch}:\n{log.getvalue()[-2000:]}")
    stack, spill_st, spill_ld, regs = map(int, match.groups())
    smem = int(compiled.metadata.shared)
    row = dict(
        config=config.label(), tier=config.tier, kernel=config.kernel, dtype=config.dtype, block_n=config.block_n,
        block_d=config.block_d, num_warps=config.num_warps, maxnreg=config.maxnreg, constexprs=dict(config.constexprs),
        pointers=dict(config.pointers), ints=dict(config.ints), arch=arch, regs=regs, spill_store_bytes=spill_st,
        spill_load_bytes=spill_ld, stack_bytes=stack, n_spills=stack // 4, smem_bytes=smem,
        compile_s=round(seconds, 3), **occupancy(regs, config.num_warps, smem, arch),
    )  # fmt: skip
    row["spills"] = spill_st > 0 or spill_ld > 0 or stack > 0
    if sass:
        cubin = os.path.join(tmp, f"k{os.getpid()}.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
        os.remove(cubin)
        row["sass"] = sass_loops(text)
    return row


def toolchain_problem():
    """None when triton can compile for a GPU here (ptxas present), else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the kernels are interpreted, not compiled"
    for name in ("ptxas", "cuobjdump"):
        try:  # any failure to find the tool means: cannot compile (or read the binary) here
            tool = getattr(knobs.nvidia, name)
        except Exception as exc:
            return f"no usable {name}: {exc}"
        if tool is None or not os.path.exists(tool.path):
            return f"no usable {name}"
    return None


# ----------------------------------------------------------------------------------------------
# Roofline
# ----------------------------------------------------------------------------------------------


def source_counts(kernel, dstate, window, has_z=True, softplus=True, has_d=True):
    """Operations per element (batch, channel, position) and per (element, state) pair, counted from
    the kernel source (Mamba-layer flags: variable B/C, D, z, delta_bias, softplus).

    How: every source-level arithmetic op on a (T, BLOCK_D) tile is per element, on a
    (T, BLOCK_N, BLOCK_D) tile per pair; a * b + c counts as one FMA (Triton contracts it), the
    row picks of `_recurrence` and the compile-time `_right_decay` select count nothing (they fold to
    register moves), reductions (tl.sum) count one add per summed value. exp: tl.exp / tl.exp2 (one
    MUFU.EX2 each); log: tl.log (libdevice logf: LOGF_FP32 FP32 instructions, no MUFU); div: a `/`
    (div.full.f32: one MUFU.RCP and a few FP32 ops). "fp" is the FP32 pipe: add, mul, FMA, max.
    The backward's checkpoint replay (a forward over (K-1)/K of the chunks) is counted separately
    under "replay" (per replayed chunk).
    """
    lb = window > 1
    sp_elem = dict(exp=1, log=1, div=1, fp=6) if softplus else dict(exp=0, log=0, div=0, fp=1)  # _delta(+bias)
    sig = dict(exp=1, div=2, fp=1)  # _sigmoid: exp(-|z|), 1 + e, 1 / (1 + e), e / (1 + e)
    if kernel == "fwd":
        elem = dict(
            exp=sp_elem["exp"] + sig["exp"] * has_z,
            log=sp_elem["log"],
            div=sp_elem["div"] + sig["div"] * has_z,
            fp=sp_elem["fp"] + 1 + has_d + (sig["fp"] + 2) * has_z,
        )  # dt*u; D*u + y; z*sig, y*=
        # dt*A2 (mul), exp2, x = dtu*B (mul), h^L (FMA), [h^R (FMA), hs += hr - x (2 add)], y += hs*C (FMA)
        pair = dict(exp=1, fp=2 + 1 + (3 if lb else 0) + 1)
        return dict(elem=elem, pair=pair)
    if kernel == "fwd_rcarry":
        elem = dict(exp=sp_elem["exp"], log=sp_elem["log"], div=sp_elem["div"], fp=sp_elem["fp"] + 1)
        return dict(elem=elem, pair=dict(exp=1, fp=3))  # dt*A2, exp2, x, h^R (FMA)
    if kernel == "bwd_lcarry":
        elem = dict(
            exp=sp_elem["exp"] + sig["exp"] * has_z,
            log=sp_elem["log"],
            div=sp_elem["div"] + sig["div"] * has_z,
            fp=sp_elem["fp"] + (sig["fp"] + 2) * has_z,
        )  # dy = g * z * sig
        return dict(elem=elem, pair=dict(exp=1, fp=4))  # dh = dy*C, dt*A2, exp2, dh^R (add + mul)
    if kernel == "bwd":
        # main pass, per element: _delta with its derivative (two more divisions), dt*u, sigmoid,
        # y = .. + D*u (FMA), dz = g*y*s*(1 + z*(1 - s)) (5), dy = g*z*s (2), ddelta = (.. + dx_b*u)*ddt
        # (FMA + mul), du = dx_b*dt + dy*D (mul + FMA), dD += dy*u (FMA), dbias += ddelta (add)
        elem = dict(exp=sp_elem["exp"] + sig["exp"] * has_z, log=sp_elem["log"],
                    div=sp_elem["div"] + (2 if softplus else 0) + sig["div"] * has_z,
                    fp=sp_elem["fp"] + 1 + (sig["fp"] + 1 + 5 + 2) * has_z + 2 + 2 + has_d + 1)  # fmt: skip
        # per pair: a (mul + exp2), x (mul), h^L (FMA), dh = dy*C (mul), dh^L (add + mul), da_a (add + mul),
        # dx_b += dx*B (FMA), ddelta += da_a*A (FMA), dA += da_a*dt (FMA), dB = dx*dtu (mul) + its sum (add),
        # dC = dy*hs (mul) + its sum (add), y += hs*C (FMA); LB adds h^R (FMA), hs (2 add), dh^R (add + mul),
        # dx (2 add), da_a += dh^R*(h^R - x) (add + FMA)
        pair = dict(exp=1, fp=1 + 1 + 1 + 1 + 2 + 2 + 1 + 1 + 1 + 2 + 2 + has_z + (1 + 2 + 2 + 2 + 2 if lb else 0))
        replay_elem = dict(exp=sp_elem["exp"], log=sp_elem["log"], div=sp_elem["div"], fp=sp_elem["fp"] + 1)
        replay_pair = dict(exp=1, fp=3)  # dt*A2, exp2, x, h^L
        return dict(elem=elem, pair=pair, replay_elem=replay_elem, replay_pair=replay_pair)
    raise ValueError(kernel)


def hbm_bytes(kernel, batch, dim, seqlen, dstate, elem_bytes, window):
    """Bytes a kernel must move to or from HBM at the least (each tensor once; re-reads of B/C by the
    dim / BLOCK_D programs of a batch element and of u/delta by the backward's replay are assumed to
    hit L2), Mamba-layer inputs (variable B/C with one group, D, z, delta_bias)."""
    chunk, straddle = triton_scan._chunking(seqlen, window)
    n_chunks = -(-seqlen // chunk)
    n_ckpt = triton_scan.num_checkpoints(seqlen, window)
    E = batch * dim * seqlen
    s = elem_bytes
    bc = batch * dstate * seqlen * s  # one variable B or C
    state = batch * dim * dstate * 4  # one fp32 (batch, dim, N) array
    params = dim * dstate * 4 + 2 * dim * 4  # A, D, delta_bias
    carries = batch * dim * n_chunks * dstate * 4
    ckpts = batch * dim * n_ckpt * dstate * 4
    if kernel == "fwd":  # u, delta, z, B, C -> out, last state, checkpoints (+ read the right carries)
        read = 3 * E * s + 2 * bc + params + (carries if straddle else 0)
        written = E * s + state + ckpts
    elif kernel == "fwd_rcarry":  # u, delta, B -> carries
        read, written = 2 * E * s + bc + params, carries
    elif kernel == "bwd_lcarry":  # dout, delta, z, C -> carries
        read, written = 3 * E * s + bc + params, carries
    elif kernel == "bwd":  # dout, u, delta, z, B, C, checkpoints, dlast (+ left carries) -> du, ddelta, dz,
        # dA/dD/dbias per batch element, dB/dC (fp32, atomically added; their zero fill is another kernel)
        read = 4 * E * s + 2 * bc + params + ckpts + state + (carries if straddle else 0)
        written = 3 * E * s + state + 2 * batch * dim * 4 + 2 * batch * dstate * seqlen * 4
    else:
        raise ValueError(kernel)
    return read, written


def _kernels_for(window, seqlen):
    _, straddle = triton_scan._chunking(seqlen, window)
    fwd = ["fwd_rcarry", "fwd"] if straddle else ["fwd"]
    bwd = ["bwd_lcarry", "bwd"] if straddle else ["bwd"]
    return fwd + bwd


def roofline(shape, dtype, window="auto", sass_mix=None):
    """Per kernel at one shape (Mamba-layer inputs): bytes and operation counts per element / pair
    and the time bounds they imply on an H100 SXM.

    Bounds (each a lower bound on the kernel's time; "bound_us" is the largest):
      t_hbm     compulsory HBM bytes / 3.35 TB/s
      t_mufu    MUFU operations (source counts) / (16 per clock per SM x the SMs the grid can use)
      t_fp32    FP32-pipe instructions (source counts) / (67 TFLOP/s / 2, scaled to the SMs used)
    and, when `sass_mix` has the kernel (its compiled sm_90 SASS at this launch):
      t_sass_mufu, t_sass_fp32  the same from the instructions the compiled loops execute
      t_issue   all executed warp-instructions / (one per clock per busy scheduler, 4 per SM)
      t_serial  one warp's instruction stream (a program runs its chunks in order) at one
                instruction per clock, times the waves of programs: what a grid too small to
                fill the GPU costs (the long shape, batch 1)
    The grid has cdiv(dim, BLOCK_D) x batch programs; "SMs used" is min(132, programs).

    sass_mix: {short kernel name: {"main": mix, "recompute": mix, "outside": n, "blocks_per_sm": b}}
    (see `sass_mixes`).
    """
    from lbmamba.ops import resolve_window

    batch, dim, seqlen, dstate = shape
    window = min(resolve_window(window, seqlen), seqlen)
    s = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    E = batch * dim * seqlen
    P = E * dstate
    chunk, _ = triton_scan._chunking(seqlen, window)
    n_chunks = -(-seqlen // chunk)
    n_ckpt = triton_scan.num_checkpoints(seqlen, window)
    replay = (n_chunks - n_ckpt) / n_chunks  # fraction of chunks the backward replays
    clock = H100["clock_hz"]
    blocks = {SHORT[c.kernel]: c for c in launches(batch, dim, seqlen, dstate, dtype, window, **LAYER)}
    rows = []
    for kernel in _kernels_for(window, seqlen):
        cfg = blocks[kernel]
        programs = -(-dim // cfg.block_d) * batch
        sms = min(H100["sms"], programs)
        mufu_rate = H100["mufu_per_clk_sm"] * sms * clock
        fp32_rate = H100["fp32_flops_s"] / 2 * sms / H100["sms"]  # instructions (lanes) per second; FMA = 2 flops
        read, written = hbm_bytes(kernel, batch, dim, seqlen, dstate, s, window)
        counts = source_counts(kernel, dstate, window)
        elem, pair = counts["elem"], counts["pair"]
        rho = replay if kernel == "bwd" else 0.0
        mufu = E * (elem["exp"] + elem["div"]) + P * pair["exp"]
        fp = E * (elem["fp"] + elem["log"] * LOGF_FP32) + P * pair["fp"]
        if rho:
            re_e, re_p = counts["replay_elem"], counts["replay_pair"]
            mufu += rho * (E * (re_e["exp"] + re_e["div"]) + P * re_p["exp"])
            fp += rho * (E * (re_e["fp"] + re_e["log"] * LOGF_FP32) + P * re_p["fp"])
        row = dict(
            shape=list(shape), dtype=dtype, window=window, kernel=kernel, elements=E, pairs=P,
            block_d=cfg.block_d, num_warps=cfg.num_warps, programs=programs, sms_used=sms,
            bytes_read=read, bytes_written=written, bytes_per_element=(read + written) / E,
            bytes_per_pair=(read + written) / P, mufu_per_element=mufu / E, mufu_per_pair=mufu / P,
            fp32_per_element=fp / E, fp32_per_pair=fp / P,
            exp_per_element=elem["exp"], exp_per_pair=pair["exp"], log_per_element=elem["log"],
            div_per_element=elem["div"], fp_per_element_src=elem["fp"], fp_per_pair_src=pair["fp"],
            replay_fraction=rho,
            t_hbm_us=(read + written) / H100["hbm_bytes_s"] * 1e6, t_mufu_us=mufu / mufu_rate * 1e6,
            t_fp32_us=fp / fp32_rate * 1e6,
        )  # fmt: skip
        mix = (sass_mix or {}).get(kernel)
        if mix:
            rec = mix.get("recompute") or {}
            replayed = n_chunks - n_ckpt if rho else 0
            per_warp = {  # instructions one warp (= each of its threads) executes over the program
                key: n_chunks * mix["main"][key] + replayed * rec.get(key, 0)
                for key in ("instructions", "mufu", "fp32")
            }
            per_warp["instructions"] += mix["outside"]
            warps = programs * cfg.num_warps
            threads = warps * 32
            resident = min(mix["blocks_per_sm"], -(-programs // sms))
            schedulers = min(H100["issue_per_clk_sm"], resident * cfg.num_warps)
            waves = -(-programs // (sms * mix["blocks_per_sm"]))
            row.update(
                sass_mufu_per_pair=threads * per_warp["mufu"] / P, sass_fp32_per_pair=threads * per_warp["fp32"] / P,
                sass_instr_per_pair=threads * per_warp["instructions"] / P,
                t_sass_mufu_us=threads * per_warp["mufu"] / mufu_rate * 1e6,
                t_sass_fp32_us=threads * per_warp["fp32"] / fp32_rate * 1e6,
                t_issue_us=warps * per_warp["instructions"] / (sms * schedulers * clock) * 1e6,
                t_serial_us=waves * per_warp["instructions"] / clock * 1e6,
            )  # fmt: skip
        bounds = {k: v for k, v in row.items() if k.startswith("t_")}
        row["bound_us"] = max(bounds.values())
        row["dominant"] = max(bounds, key=bounds.get)[2:-3]
        rows.append(row)
    return rows


#: FP32-pipe instructions of one libdevice logf, which tl.log compiles to (not MUFU.LG2): 12 FFMA +
#: 2 FMUL + 1 FADD in the SASS of a kernel that takes one log per thread (about 24 instructions in all
#: with the exponent / mantissa split and the special cases)
LOGF_FP32 = 15


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def _rng(values, fmt="{}"):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def summary_table(rows) -> str:
    """Markdown: one row per kernel x dtype x BLOCK_N x arch (ranges over the rest)."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(KERNELS.index(r["kernel"]), r["dtype"], r["block_n"], r["arch"])].append(r)
    lines = ["| kernel | dtype | BLOCK_N | arch | configs | BLOCK_D | warps | registers | spills (bytes st/ld) | "
             "smem (B) | occupancy |", "|---|---|---:|---|---:|---|---|---|---|---|---|"]  # fmt: skip
    for key in sorted(groups):
        g = groups[key]
        spilled = [r for r in g if r["spills"]]
        spill = "0" if not spilled else "**{} spill**: up to {}/{}".format(len(spilled), *_spill_maxima(spilled))
        lines.append(
            f"| {SHORT[g[0]['kernel']]} | {g[0]['dtype']} | {g[0]['block_n']} | sm_{g[0]['arch']} | {len(g)} | "
            f"{_rng([r['block_d'] for r in g])} | {_rng([r['num_warps'] for r in g])} | "
            f"{_rng([r['regs'] for r in g])} | {spill} | {_rng([r['smem_bytes'] for r in g])} | "
            f"{_rng([round(100 * r['occupancy']) for r in g], '{}%')} |"
        )
    return "\n".join(lines)


def _spill_maxima(spilled) -> tuple:
    """(largest spill stores, largest spill loads) in bytes over the rows `spilled`."""
    return max(r["spill_store_bytes"] for r in spilled), max(r["spill_load_bytes"] for r in spilled)


def compact_table(rows) -> str:
    """Markdown: one row per kernel x BLOCK_N; per arch the registers of each dtype (ranges over
    BLOCK_D, flags and windows), how many configurations spill, and the occupancy range."""
    archs = sorted({r["arch"] for r in rows}, reverse=True)
    head = "| kernel | BLOCK_N | BLOCK_D | warps | configs |"
    rule = "|---|---:|---|---|---:|"
    for arch in archs:
        head += f" sm_{arch} registers fp32 / fp16 / bf16 | sm_{arch} spilling | sm_{arch} occupancy |"
        rule += "---|---|---|"
    lines = [head, rule]
    for kernel in KERNELS:
        for bn in sorted({r["block_n"] for r in rows if r["kernel"] == kernel}):
            g = [r for r in rows if r["kernel"] == kernel and r["block_n"] == bn]
            line = (f"| {SHORT[kernel]} | {bn} | {_rng([r['block_d'] for r in g])} | "
                    f"{_rng([r['num_warps'] for r in g])} | {len({r['config'] for r in g})} |")  # fmt: skip
            for arch in archs:
                a = [r for r in g if r["arch"] == arch]
                if not a:
                    line += " - | - | - |"
                    continue
                regs = " / ".join(_rng([r["regs"] for r in a if r["dtype"] == d]) if any(r["dtype"] == d for r in a)
                                  else "-" for d in DTYPES)  # fmt: skip
                spilled = [r for r in a if r["spills"]]
                spill = "0" if not spilled else "**{}**/{} (up to {} B st, {} B ld)".format(
                    len(spilled), len(a), *_spill_maxima(spilled))
                line += f" {regs} | {spill} | {_rng([round(100 * r['occupancy']) for r in a], '{}%')} |"
            lines.append(line)
    return "\n".join(lines)


def spill_summary(rows) -> str:
    """Markdown: per kernel x arch x BLOCK_N with a spill, which BLOCK_D / dtypes / tiers spill."""
    spilled = [r for r in rows if r["spills"]]
    if not spilled:
        return "No configuration spills."
    lines = ["| kernel | arch | BLOCK_N | spilling / compiled | BLOCK_D spilling | dtypes | registers | "
             "stack (B) | spill stores / loads (B) |", "|---|---|---:|---:|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(KERNELS.index(r["kernel"]), -r["arch"], r["block_n"]) for r in spilled})
    for ki, neg_arch, bn in keys:
        kernel, arch = KERNELS[ki], -neg_arch
        allr = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch and r["block_n"] == bn]
        sp = [r for r in allr if r["spills"]]
        bds = sorted({r["block_d"] for r in sp})
        lines.append(
            f"| {SHORT[kernel]} | sm_{arch} | {bn} | {len(sp)} / {len(allr)} | {', '.join(map(str, bds))} | "
            f"{', '.join(sorted({r['dtype'] for r in sp}))} | {_rng([r['regs'] for r in sp])} | "
            f"{_rng([r['stack_bytes'] for r in sp])} | {_rng([r['spill_store_bytes'] for r in sp])} / "
            f"{_rng([r['spill_load_bytes'] for r in sp])} |"
        )
    return "\n".join(lines)


def kernel_table(rows) -> str:
    """Markdown: max registers, spills and occupancy range per kernel x arch."""
    lines = ["| kernel | arch | configs | registers | max at | spilling configs | occupancy |",
             "|---|---|---:|---|---|---:|---|"]  # fmt: skip
    for kernel in KERNELS:
        for arch in sorted({r["arch"] for r in rows}):
            g = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
            if not g:
                continue
            top = max(g, key=lambda r: r["regs"])
            lines.append(
                f"| {SHORT[kernel]} | sm_{arch} | {len(g)} | {_rng([r['regs'] for r in g])} | {top['config']} | "
                f"{sum(r['spills'] for r in g)} | {_rng([round(100 * r['occupancy']) for r in g], '{}%')} |"
            )
    return "\n".join(lines)


def spill_table(rows) -> str:
    spilled = sorted((r for r in rows if r["spills"]), key=lambda r: (r["arch"], r["config"]))
    if not spilled:
        return "No configuration spills."
    lines = ["| arch | configuration | tier | registers | stack (B) | spill stores (B) | spill loads (B) |",
             "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in spilled:
        lines.append(f"| sm_{r['arch']} | {r['config']} | {r['tier']} | {r['regs']} | {r['stack_bytes']} | "
                     f"{r['spill_store_bytes']} | {r['spill_load_bytes']} |")  # fmt: skip
    return "\n".join(lines)


def flags_table(rows) -> str:
    """Markdown: the register spread over the flags tier (fwd / bwd, per window class and arch)."""
    lines = ["| kernel | arch | window | configs | registers | fewest | most |", "|---|---|---|---:|---|---|---|"]
    for kernel in ("_fwd_kernel", "_bwd_kernel"):
        for arch in sorted({r["arch"] for r in rows}):
            for window in (1, 8, 24):
                g = [r for r in rows if r["tier"] == "flags" and r["kernel"] == kernel and r["arch"] == arch
                     and r["constexprs"]["WINDOW"] == window]  # fmt: skip
                if not g:
                    continue
                lo, hi = min(g, key=lambda r: r["regs"]), max(g, key=lambda r: r["regs"])
                lines.append(f"| {SHORT[kernel]} | sm_{arch} | {window} | {len(g)} | {_rng([r['regs'] for r in g])} | "
                             f"{lo['config'].split(' ', 5)[-1]} | {hi['config'].split(' ', 5)[-1]} |")  # fmt: skip
    return "\n".join(lines)


def roofline_table(rf_rows) -> str:
    """Markdown: one row per case x kernel; times in microseconds; "(..)" the SASS-based figure."""
    lines = [
        "| shape | dtype | W | kernel | programs (SMs) | bytes/elem | bytes/pair | MUFU/pair src (SASS) | "
        "FP32/pair src (SASS) | instr/pair (SASS) | HBM | MUFU src (SASS) | FP32 src (SASS) | issue | serial | "
        "bound | dominant | measured (x bound) |",
        "|---|---|---:|---|---|---:|---:|---|---|---:|---:|---|---|---:|---:|---:|---|---|",
    ]

    def sass(r, key, fmt):
        return f" ({fmt.format(r[key])})" if key in r else ""

    for r in rf_rows:
        name = next((k for k, v in SHAPES.items() if list(v) == r["shape"]), str(tuple(r["shape"])))
        cells = [
            name, r["dtype"], str(r["window"]), r["kernel"], f"{r['programs']} ({r['sms_used']})",
            f"{r['bytes_per_element']:.1f}", f"{r['bytes_per_pair']:.2f}",
            f"{r['mufu_per_pair']:.2f}" + sass(r, "sass_mufu_per_pair", "{:.2f}"),
            f"{r['fp32_per_pair']:.1f}" + sass(r, "sass_fp32_per_pair", "{:.1f}"),
            f"{r['sass_instr_per_pair']:.0f}" if "sass_instr_per_pair" in r else "-",
            f"{r['t_hbm_us']:.0f}", f"{r['t_mufu_us']:.0f}" + sass(r, "t_sass_mufu_us", "{:.0f}"),
            f"{r['t_fp32_us']:.0f}" + sass(r, "t_sass_fp32_us", "{:.0f}"),
            f"{r['t_issue_us']:.0f}" if "t_issue_us" in r else "-",
            f"{r['t_serial_us']:.0f}" if "t_serial_us" in r else "-",
            f"**{r['bound_us']:.0f}**", r["dominant"].replace("sass_", "SASS "),
            f"{r['measured_us']:.0f} ({r['measured_us'] / r['bound_us']:.1f}x)" if "measured_us" in r else "not yet",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sass_mixes(rows, arch=90):
    """{(shape, dtype, window): {short kernel: mix}} from the exact-launch rows (tier "launches")."""
    out = collections.defaultdict(dict)
    for r in rows:
        if r["tier"] != "launches" or r["arch"] != arch or "sass" not in r or "main" not in r["sass"]:
            continue
        ints = r["ints"]
        key = (ints.get("L"), r["dtype"], r["constexprs"]["WINDOW"], ints.get("dim"),
               r["constexprs"].get("CKPT_EVERY", 8))  # fmt: skip
        out[key][SHORT[r["kernel"]]] = dict(
            main=r["sass"]["main"], recompute=r["sass"].get("recompute"), outside=r["sass"]["outside"],
            blocks_per_sm=r["blocks_per_sm"],
        )  # fmt: skip
    return out


#: the roofline's cases: (shape, dtype, window); the issue's two shapes, gpu_check.py's timing shapes
#: (where its measurements will be), window 1 at the issue's shapes, and a straddling window (the two
#: carry kernels)
ROOFLINE_CASES = [
    *[(shape, dtype, "auto") for shape in SHAPES.values() for dtype in ("fp32", "bf16")],
    ((128, 384, 196, 16), "fp32", "auto"),
    ((2, 1536, 8192, 16), "fp32", "auto"),
    # window 1 (vanilla Mamba): what LB costs on top
    *[(shape, "fp32", 1) for shape in (*SHAPES.values(), (128, 384, 196, 16), (2, 1536, 8192, 16))],
    ((1, 768, 4096, 16), "bf16", 32),
]


def attach_measurements(rf_rows, gpu_check_path):
    """Put benchmarks/gpu_check.py's timings (its --out JSON) next to the bounds: the forward row gets
    the median forward time of "triton_lb" (window "auto") or "triton_w1" (window 1) at the same shape
    (fp32), the backward row forward+backward minus forward (which also holds autograd's overhead and
    the small torch kernels around the scan); the carry kernels' rows get nothing (they run inside those
    times)."""
    with open(gpu_check_path) as f:
        timings = json.load(f).get("timings", [])
    for r in rf_rows:
        variant = "triton_w1" if r["window"] == 1 else "triton_lb"
        for t in timings:
            ms = t.get("ms", {}).get(variant, {})
            if t.get("shape") != r["shape"] or t.get("dtype") != "float32" or r["dtype"] != "fp32" or "fwd" not in ms:
                continue
            if r["kernel"] == "fwd":
                r["measured_us"] = ms["fwd"] * 1e3
            elif r["kernel"] == "bwd":
                r["measured_us"] = (ms["fwd_bwd"] - ms["fwd"]) * 1e3
    return rf_rows


def roofline_rows(rows=None):
    """The roofline of ROOFLINE_CASES, with the SASS mix of the exact launches in `rows` (sm_90)."""
    from lbmamba.ops import resolve_window

    mixes = sass_mixes(rows or [])
    out = []
    for shape, dtype, window in ROOFLINE_CASES:
        w = min(resolve_window(window, shape[2]), shape[2])
        key = (shape[2], dtype, w, shape[1], triton_scan.CHECKPOINT_EVERY)
        out += roofline(shape, dtype, window, mixes.get(key))
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small representative subset")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    p.add_argument("--tiers", nargs="+", default=None, help="compile only these tiers")
    p.add_argument("--roofline-only", action="store_true", help="print the roofline (source counts) and exit")
    p.add_argument("--resume", default=None, help="reuse the rows of an earlier run's .rows.jsonl")
    p.add_argument("--gpu-check", default=None, help="gpu_check.py's JSON: its timings go next to the roofline")
    p.add_argument("--report", default=None, help="print the tables of an earlier --json run (or its .rows.jsonl)")
    return p.parse_args(argv)


def _identity(label: str, ints) -> tuple:
    """What makes a compiled row the same configuration across runs: its label and integer specialisation."""
    return label, json.dumps(dict(ints), sort_keys=True)


def _work(task):
    config, arch = task
    try:
        return compile_stats(config, arch)
    except Exception as exc:  # reported, and the run goes on
        return dict(config=config.label(), tier=config.tier, kernel=config.kernel, arch=arch,
                    error=f"{type(exc).__name__}: {exc}"[:2000])  # fmt: skip


def report(rows, env, rf) -> str:
    """Every table, as markdown."""
    out = [f"{env['machine']}; triton {env['triton']}, ptxas {env['ptxas']}; {env['configurations']} configurations, "
           f"{env['compiles']} compiles in {env['total_s']:.0f} s ({env['compile_s']:.0f} s compiling)\n",
           "### Per kernel\n\n" + kernel_table(rows) + "\n",
           "### Per kernel x BLOCK_N (ranges over dtypes, BLOCK_D, flags, windows)\n\n" + compact_table(rows) + "\n",
           "### Per kernel x dtype x BLOCK_N x arch\n\n" + summary_table(rows) + "\n"]  # fmt: skip
    if any(r["tier"] == "flags" for r in rows):
        out.append("### Flags tier (N 16, bf16): the register spread over the 64 flag combinations\n\n"
                   + flags_table(rows) + "\n")  # fmt: skip
    out.append("### Spills per kernel x BLOCK_N\n\n" + spill_summary(rows) + "\n")
    out.append("### Spilling configurations (every one)\n\n" + spill_table(rows) + "\n")
    out.append("### Roofline, H100 SXM\n\n" + roofline_table(rf) + "\n")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    if args.roofline_only:
        rf = roofline_rows()
        print(roofline_table(attach_measurements(rf, args.gpu_check) if args.gpu_check else rf))
        return 0
    if args.report:  # the tables again, from a --json file (or its .rows.jsonl while a run is going)
        with open(args.report) as f:
            if args.report.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
                env = dict(machine="(partial run)", triton=triton.__version__, ptxas=knobs.nvidia.ptxas.version,
                           configurations=len({r["config"] for r in rows}), compiles=len(rows), total_s=0,
                           compile_s=sum(r.get("compile_s", 0) for r in rows))  # fmt: skip
            else:
                data = json.load(f)
                rows, env = data["rows"], data["environment"]
        good = [r for r in rows if "error" not in r]
        rf = roofline_rows(good)
        print(report(good, env, attach_measurements(rf, args.gpu_check) if args.gpu_check else rf))
        return 0
    problem = toolchain_problem()
    if problem:
        print(f"cannot compile here: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    configs = configurations(args.quick)
    if args.tiers:
        configs = [c for c in configs if c.tier in args.tiers]
    tasks = [(c, arch) for c in configs for arch in args.arch]
    print(f"{len(configs)} configurations x {len(args.arch)} archs = {len(tasks)} compiles "
          f"(enumerated in {time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    rows = []
    if args.resume:  # rows of an earlier run of the same enumeration: not compiled again
        tier = {_identity(c.label(), c.ints): c.tier for c in configs}
        with open(args.resume) as f:
            for row in map(json.loads, filter(str.strip, f)):
                key = _identity(row["config"], row.get("ints", {}))
                if "error" not in row and key in tier and row["arch"] in args.arch:
                    rows.append(dict(row, tier=tier[key]))
        done = {(*_identity(r["config"], r["ints"]), r["arch"]) for r in rows}
        tasks = [(c, a) for c, a in tasks if (*_identity(c.label(), c.ints), a) not in done]
        print(f"resumed {len(rows)} rows; {len(tasks)} compiles to go", file=sys.stderr, flush=True)
    # With --json, each row is also appended to <json>.rows.jsonl as it comes (a long run that dies
    # keeps what it measured).
    partial = open(args.json + ".rows.jsonl", "w") if args.json else None
    for row in rows if partial else ():
        partial.write(json.dumps(row) + "\n")
    if args.jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(args.jobs)
        results = pool.imap_unordered(_work, tasks, chunksize=1)
    else:
        pool, results = None, map(_work, tasks)
    for i, row in enumerate(results):
        rows.append(row)
        _progress(i, len(tasks), row, start)
        if partial:
            partial.write(json.dumps(row) + "\n")
            partial.flush()
    if pool:
        pool.close()
    if partial:
        partial.close()
    total = time.perf_counter() - start
    errors = [r for r in rows if "error" in r]
    good = [r for r in rows if "error" not in r]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py
    from machine import cpu_name

    env = dict(machine=f"{platform.node()} / {cpu_name()} ({os.cpu_count()} CPUs), compile only, no GPU",
               triton=triton.__version__, torch=torch.__version__, ptxas=knobs.nvidia.ptxas.version,
               python=platform.python_version(), quick=args.quick, archs=args.arch, jobs=args.jobs,
               configurations=len(configs), compiles=len(rows), errors=len(errors), total_s=round(total, 1),
               resumed=args.resume,
               compile_s=round(sum(r.get("compile_s", 0) for r in good), 1),
               constants=dict(NUM_WARPS=triton_scan.NUM_WARPS, CHUNK_LEN=triton_scan.CHUNK_LEN,
                              CHECKPOINT_EVERY=triton_scan.CHECKPOINT_EVERY,
                              FWD_PAIRS_PER_THREAD=triton_scan.FWD_PAIRS_PER_THREAD,
                              BWD_PAIRS_PER_THREAD=triton_scan.BWD_PAIRS_PER_THREAD))  # fmt: skip
    rf = roofline_rows(good)
    if args.gpu_check:
        attach_measurements(rf, args.gpu_check)
    print(report(good, env, rf))
    for r in errors:
        print(f"ERROR sm_{r['arch']} {r['config']}: {r['error']}")
    if args.json:
        write_json(args.json, dict(environment=env, rows=rows, roofline=rf, h100=H100, archs=ARCHS))
    return 1 if errors else 0


def _progress(i, n, row, start):
    if "error" in row:
        print(f"[{i + 1}/{n}] ERROR {row['config']} sm_{row['arch']}: {row['error'][:300]}", file=sys.stderr,
              flush=True)  # fmt: skip
    elif row["spills"] or (i + 1) % 25 == 0 or i + 1 == n:
        spill = f" SPILLS {row['spill_store_bytes']}/{row['spill_load_bytes']} B" if row["spills"] else ""
        print(f"[{i + 1}/{n} {time.perf_counter() - start:.0f}s] sm_{row['arch']} {row['config']}: "
              f"{row['regs']} regs{spill}", file=sys.stderr, flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
