"""CPU benchmark of the LB scan: lbmamba's fused backend against the alternatives a CPU user has.

    python benchmarks/scan_cpu.py [--threads 2] [--rounds 15] [--slow-rounds 3] [--json out.json]

In one process and at each shape, every variant runs once per round, in a fresh random order each
round, so that noise from a shared machine (and the state one variant leaves for the next) hits all
of them alike; the table reports medians over rounds, and each ratio is the median of the per-round
ratios. The slow pure-PyTorch variants run only in the first --slow-rounds rounds. Variants:
  lb        lbmamba "cpu" backend, window "auto"
  w1        lbmamba "cpu" backend, window 1 (vanilla Mamba-1 scan)
  bi        two window-1 scans, the second on the flipped sequence (Vim's bidirectional cost)
  seq_ref   the sequential PyTorch loop of mamba_ssm's selective_scan_ref (what mamba_ssm users
            have on a CPU), re-implemented here
  mambapy   mambapy's parallel scan (pip install mambapy), when installed
  exp       one torch.exp over batch x dim x L x N fp32 values (the floor every implementation pays)
Peak memory of a forward+backward is measured in a fresh subprocess per variant (peak RSS above the
RSS with the inputs allocated, glibc made to return large blocks to the system).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lbmamba.ops import selective_scan_fn

SHAPES = {"lbvim_t_layer": (8, 384, 196, 16), "long": (1, 768, 4096, 16)}


def make_inputs(batch, dim, seqlen, dstate, requires_grad=False, seed=0):
    """Inputs as a Mamba layer passes them: variable B/C, D, z, delta_bias, softplus."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        u=torch.randn(batch, dim, seqlen, generator=g),
        delta=torch.randn(batch, dim, seqlen, generator=g) * 0.5 - 1.0,
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, dstate, seqlen, generator=g),
        C=torch.randn(batch, dstate, seqlen, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, seqlen, generator=g),
        delta_bias=torch.rand(dim, generator=g) * 0.1,
    )
    for t in inputs.values():
        t.requires_grad_(requires_grad)
    return inputs


def mamba_ssm_sequential_ref(u, delta, A, B, C, D, z, delta_bias):
    """The algorithm of mamba_ssm's selective_scan_ref (variable B/C, softplus): a loop over L."""
    delta = F.softplus(delta + delta_bias[:, None])
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2) + u * D[:, None]
    return y * F.silu(z)


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """mambapy's parallel scan, driven the way its MambaBlock.selective_scan drives it."""
    from mambapy.pscan import pscan

    delta = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (B, L, D)
    x = u.transpose(1, 2)
    delta_a = torch.exp(delta.unsqueeze(-1) * A)
    bx = delta.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(delta_a, bx)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return (y * F.silu(z.transpose(1, 2))).transpose(1, 2)


def lbmamba_scan(window):
    def run(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, window=window, backend="cpu")

    return run


def bidirectional_scan(u, delta, A, B, C, D, z, delta_bias):
    fwd = lbmamba_scan(1)(u, delta, A, B, C, D, z, delta_bias)
    flip = [t.flip(-1) for t in (u, delta, B, C, z)]
    bwd = lbmamba_scan(1)(flip[0], flip[1], A, flip[2], flip[3], D, flip[4], delta_bias).flip(-1)
    return fwd + bwd


def have_mambapy():
    try:
        import mambapy.pscan  # noqa: F401
    except ImportError:
        return False
    return True


def variants():
    found = {"lb": lbmamba_scan("auto"), "w1": lbmamba_scan(1), "bi": bidirectional_scan,
             "seq_ref": mamba_ssm_sequential_ref}
    if have_mambapy():
        found["mambapy"] = mambapy_scan
    return found


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_shape(shape, rounds, slow_rounds, skip=()):
    fwd_inputs = make_inputs(*shape)
    grad_inputs = make_inputs(*shape, requires_grad=True)
    big = torch.randn(shape[0], shape[1], shape[2], shape[3])
    jobs = {"exp": {"fwd": lambda: torch.exp(big)}}
    for name, fn in variants().items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(**fwd_inputs)

        def fwd_bwd(fn=fn):
            out = fn(**grad_inputs)
            out.backward(torch.ones_like(out))

        jobs[name] = {kind: fn for kind, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)) if f"{name}.{kind}" not in skip}
    slow = {"seq_ref", "mambapy"}  # pure-PyTorch loops: no warm-up needed, fewer rounds
    times = {(name, kind): [] for name, kinds in jobs.items() for kind in kinds}
    for name, kinds in jobs.items():  # warm-up: compilation, allocator
        if name not in slow:
            for fn in kinds.values():
                fn()
    order = [(name, kind) for name, kinds in jobs.items() for kind in kinds]
    shuffle = random.Random(0).shuffle
    for r in range(rounds):
        shuffle(order)  # no variant always runs right after the same neighbour
        for name, kind in order:
            if name in slow and r >= slow_rounds:
                continue
            times[(name, kind)].append(timed(jobs[name][kind]))
    return times


def ratio(times, a, b, kind):
    """Median of per-round ratios a / b (rounds where both ran); None when one was skipped."""
    pairs = list(zip(times.get((a, kind), []), times.get((b, kind), [])))
    return statistics.median(x / y for x, y in pairs) if pairs else None


def peak_memory(variant, shape_name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--memory-child", variant, shape_name, "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant, shape_name):
    shape = SHAPES[shape_name]
    fn = variants()[variant]
    small = make_inputs(2, 8, 40, shape[3], requires_grad=True)
    fn(**small).sum().backward()  # compile / load kernels outside the measurement
    inputs = make_inputs(*shape, requires_grad=True)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs.values())
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter to the current RSS
        f.write("5")
    before = _rss_bytes("VmRSS")
    out = fn(**inputs)
    out.backward(torch.ones_like(out))
    extra = _rss_bytes("VmHWM") - before
    print(json.dumps({"variant": variant, "shape": shape_name, "input_bytes": input_bytes, "extra_peak_bytes": extra}))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--slow-rounds", type=int, default=3, help="rounds of seq_ref and mambapy (the first ones)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--skip", action="append", default=[], metavar="VARIANT.KIND",
        help="leave out e.g. seq_ref.fwd_bwd (at L = 4096 one call takes over 10 minutes); repeatable",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    report = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "shapes": {}}
    print(f"# {report['cpu']}, {args.threads} threads, torch {torch.__version__}, mambapy: {have_mambapy()}")
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        times = bench_shape(shape, args.rounds, args.slow_rounds, set(args.skip))
        med = {f"{n}.{k}": statistics.median(v) * 1e3 for (n, k), v in times.items() if v}
        ratios = {
            "lb/w1 fwd": ratio(times, "lb", "w1", "fwd"),
            "lb/w1 fwd+bwd": ratio(times, "lb", "w1", "fwd_bwd"),
            "seq_ref/lb fwd": ratio(times, "seq_ref", "lb", "fwd"),
            "seq_ref/lb fwd+bwd": ratio(times, "seq_ref", "lb", "fwd_bwd"),
            "lb/exp fwd": ratio(times, "lb", "exp", "fwd"),
            "bi/lb fwd": ratio(times, "bi", "lb", "fwd"),
            "bi/lb fwd+bwd": ratio(times, "bi", "lb", "fwd_bwd"),
        }
        if have_mambapy():
            ratios["mambapy/lb fwd"] = ratio(times, "mambapy", "lb", "fwd")
            ratios["mambapy/lb fwd+bwd"] = ratio(times, "mambapy", "lb", "fwd_bwd")
        entry = {"shape": shape, "median_ms": med, "ratios": ratios}
        if not args.no_memory:
            entry["memory"] = {v: peak_memory(v, shape_name) for v in variants() if f"{v}.fwd_bwd" not in args.skip}
        report["shapes"][shape_name] = entry
        print(f"\n## {shape_name} (batch, dim, L, N) = {shape}\n")
        print("| variant | fwd ms | fwd+bwd ms | extra peak mem fwd+bwd / inputs |")
        print("|---|---|---|---|")
        for name in ["exp"] + list(variants()):
            mem = entry.get("memory", {}).get(name)
            mem_s = f"{mem['extra_peak_bytes'] / mem['input_bytes']:.2f}x" if mem else "-"
            fb = med.get(f"{name}.fwd_bwd")
            print(f"| {name} | {med[name + '.fwd']:.2f} | {'-' if fb is None else f'{fb:.2f}'} | {mem_s} |")
        print()
        for k, v in ratios.items():
            print(f"- {k}: {'skipped' if v is None else f'{v:.2f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
