"""CPU benchmark of the LB scan: lbmamba's backends against the alternatives a CPU user has.

    python benchmarks/scan_cpu.py [--sections big,small,busy] [--threads 2] [--rounds 15]
                                  [--slow-rounds 3] [--json out.json]

Sections:
  big    the LBVim-T layer shape and a long sequence (--shapes): every variant below, fwd and fwd+bwd,
         and the peak memory of each fwd+bwd
  small  the cpu backend at (1, 1024, L, 16) for L in 1, 7, 16, 49, 64 (short bags, the digits demo,
         VMamba's last stage), 1 and 2 threads: time per element (batch x dim x L) against the
         LBVim-T layer shape's, and LB / window 1
  busy   the same calls idle and beside one other CPU-bound process (started and stopped here): a scan
         call at (1, 1024, 7, 16) and at the LBVim-T layer shape, a PyTorch MLP of similar cost, and a
         training step of LBVim-T against a same-cost PyTorch-only model (a 24-layer ViT-Ti), 1 and 2
         threads; reports busy / idle per item

In one process and at each shape, every variant runs once per round, in a fresh random order each
round, so that noise from a shared machine (and the state one variant leaves for the next) hits all
of them alike; the table reports medians over rounds, and each ratio is the median of the per-round
ratios. The slow pure-PyTorch variants run only in the first --slow-rounds rounds. Variants:
  lb        lbmamba "cpu" backend, window "auto"
  w1        lbmamba "cpu" backend, window 1 (vanilla Mamba-1 scan)
  torch     lbmamba "torch" backend (the portable one, for devices without a fused backend), "auto"
  torch_w1  lbmamba "torch" backend, window 1
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
import random
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from lbmamba.ops import selective_scan_fn
from machine import busy, cpu_name, interleaved, reset_peak_rss, rss_bytes, timed

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


def lbmamba_scan(window, backend="cpu"):
    def run(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, window=window, backend=backend)

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
             "torch": lbmamba_scan("auto", "torch"), "torch_w1": lbmamba_scan(1, "torch"),
             "seq_ref": mamba_ssm_sequential_ref}
    if have_mambapy():
        found["mambapy"] = mambapy_scan
    return found


def bench_shape(shape, rounds, slow_rounds, skip=()):
    fwd_inputs = make_inputs(*shape)
    grad_inputs = make_inputs(*shape, requires_grad=True)
    big = torch.randn(shape[0], shape[1], shape[2], shape[3])
    jobs = {"exp": {"fwd": lambda: torch.exp(big)} if "exp.fwd" not in skip else {}}
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


def memory_child(variant, shape_name):
    shape = SHAPES[shape_name]
    fn = variants()[variant]
    small = make_inputs(2, 8, 40, shape[3], requires_grad=True)
    fn(**small).sum().backward()  # compile / load kernels outside the measurement
    inputs = make_inputs(*shape, requires_grad=True)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs.values())
    before = reset_peak_rss()
    out = fn(**inputs)
    out.backward(torch.ones_like(out))
    extra = rss_bytes("VmHWM") - before
    print(json.dumps({"variant": variant, "shape": shape_name, "input_bytes": input_bytes, "extra_peak_bytes": extra}))


def per_round_ratio(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


SMALL_LENGTHS = (1, 7, 16, 49, 64)


def small_section(threads_list, rounds):
    """The cpu backend at short lengths: cost per element against the LBVim-T layer shape's."""
    out = {}
    big = make_inputs(*SHAPES["lbvim_t_layer"])
    big_elements = SHAPES["lbvim_t_layer"][0] * SHAPES["lbvim_t_layer"][1] * SHAPES["lbvim_t_layer"][2]
    for threads in threads_list:
        torch.set_num_threads(threads)
        jobs = {"big": lambda: lbmamba_scan("auto")(**big)}
        for seqlen in SMALL_LENGTHS:
            small = make_inputs(1, 1024, seqlen, 16, seed=seqlen)
            for window in ("auto", 1):
                # each job times a batch of calls: one short call is below the timer's resolution for medians
                jobs[f"{seqlen}/{window}"] = lambda small=small, window=window: [
                    lbmamba_scan(window)(**small) for _ in range(20)]
        with torch.no_grad():
            times = interleaved(jobs, rounds)
        per_big = statistics.median(times["big"]) / big_elements
        rows = {}
        for seqlen in SMALL_LENGTHS:
            per_call = statistics.median(times[f"{seqlen}/auto"]) / 20
            rows[seqlen] = {
                "lb_us": per_call * 1e6,
                "w1_us": statistics.median(times[f"{seqlen}/1"]) / 20 * 1e6,
                "per_element_vs_lbvim_t": per_call / (1024 * seqlen) / per_big,
                "lb/w1": per_round_ratio(times, f"{seqlen}/auto", f"{seqlen}/1"),
            }
        out[threads] = {"lbvim_t_layer_ms": statistics.median(times["big"]) * 1e3, "lengths": rows}
        print(f"\n## Short sequences, cpu backend, (1, 1024, L, 16), {threads} thread(s)\n")
        print(f"LBVim-T layer shape: {out[threads]['lbvim_t_layer_ms']:.2f} ms per call\n")
        print("| L | LB us | window 1 us | time per element / LBVim-T layer's | LB / window 1 |")
        print("|---|---|---|---|---|")
        for seqlen, row in rows.items():
            print(f"| {seqlen} | {row['lb_us']:.1f} | {row['w1_us']:.1f} | {row['per_element_vs_lbvim_t']:.2f} | "
                  f"{row['lb/w1']:.2f} |")
    return out


def _mlp_like_a_scan():
    """A PyTorch-only op of about the scan's cost at the LBVim-T layer shape (8 x 196 tokens, 384 -> 1536 -> 384)."""
    mlp = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
    x = torch.randn(8 * 196, 384)
    return lambda: mlp(x)


def _train_step(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def busy_section(threads_list, rounds, step_batch):
    """Each item idle and beside one CPU-bound process: busy / idle."""
    import timm

    import lbmamba  # noqa: F401  (registers the models)

    small = make_inputs(1, 1024, 7, 16)
    layer = make_inputs(*SHAPES["lbvim_t_layer"])
    torch.manual_seed(0)
    lbvim = timm.create_model("lbvim_tiny_patch16_224").train()
    vit = timm.create_model("vit_tiny_patch16_224", depth=24).train()  # PyTorch only, about LBVim-T's cost
    out = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        calls = {"scan (1, 1024, 7, 16)": lambda: [lbmamba_scan("auto")(**small) for _ in range(20)],
                 "scan LBVim-T layer": lambda: lbmamba_scan("auto")(**layer),
                 "torch MLP of similar cost": _mlp_like_a_scan()}
        steps = {"LBVim-T train step": _train_step(lbvim, step_batch),
                 "ViT-Ti depth 24 train step": _train_step(vit, step_batch)}
        times = {}
        for condition in ("idle", "busy"):
            with busy(condition == "busy"):
                with torch.no_grad():
                    got = interleaved(calls, rounds * 10)
                got.update(interleaved(steps, rounds))
            for name, values in got.items():
                scale = 20 if name.startswith("scan (1,") else 1
                times[(condition, name)] = statistics.median(values) / scale
        rows = {name: {"idle_ms": times[("idle", name)] * 1e3, "busy_ms": times[("busy", name)] * 1e3,
                       "busy/idle": times[("busy", name)] / times[("idle", name)]} for name in {**calls, **steps}}
        out[threads] = rows
        print(f"\n## Beside one CPU-bound process, {threads} thread(s)\n")
        print("| item | idle ms | busy ms | busy / idle |")
        print("|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['idle_ms']:.2f} | {row['busy_ms']:.2f} | {row['busy/idle']:.2f} |")
    return out


def big_section(args, report):
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
            "seq_ref/torch fwd": ratio(times, "seq_ref", "torch", "fwd"),
            "seq_ref/torch fwd+bwd": ratio(times, "seq_ref", "torch", "fwd_bwd"),
        }
        if have_mambapy():
            for kind, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
                ratios[f"mambapy/lb {label}"] = ratio(times, "mambapy", "lb", kind)
                ratios[f"mambapy/torch {label}"] = ratio(times, "mambapy", "torch", kind)
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
            fwd, fb = ("-" if t is None else f"{t:.2f}" for t in (med.get(f"{name}.{k}") for k in ("fwd", "fwd_bwd")))
            print(f"| {name} | {fwd} | {fb} | {mem_s} |")
        print()
        for k, v in ratios.items():
            print(f"- {k}: {'skipped' if v is None else f'{v:.2f}'}")


def skipped_jobs(given, parser):
    """--skip values (each one name or a comma list) as VARIANT.KIND names: a bare variant skips both kinds; an
    unknown name is an error."""
    kinds = {"exp": ("fwd",), **dict.fromkeys(variants(), ("fwd", "fwd_bwd"))}
    jobs = set()
    for item in (part.strip() for value in given for part in value.split(",") if part.strip()):
        name, _, kind = item.partition(".")
        if name not in kinds or (kind and kind not in kinds[name]):
            known = ", ".join(f"{n}.{k}" for n, ks in kinds.items() for k in ks)
            parser.error(f"--skip {item}: not a variant of this machine's run (known: {known})")
        jobs.update(f"{name}.{k}" for k in ((kind,) if kind else kinds[name]))
    return jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="big,small,busy")
    parser.add_argument("--threads", type=int, default=2, help="threads of the big section")
    parser.add_argument("--small-threads", default="1,2", help="thread counts of the small and busy sections")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--busy-rounds", type=int, default=5, help="training steps per model and condition")
    parser.add_argument("--step-batch", type=int, default=8, help="images per training step (busy section)")
    parser.add_argument("--slow-rounds", type=int, default=3, help="rounds of seq_ref and mambapy (the first ones)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--result", default=None, help="also write them to this result file (benchmarks/report.py)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--skip", action="append", default=[], metavar="VARIANT[.KIND]",
        help="leave out e.g. seq_ref.fwd_bwd (at L = 4096 one call takes over 10 minutes), or a whole variant "
             "(mambapy); repeatable or a comma list; skipped rows print '-'",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.skip = skipped_jobs(args.skip, parser)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    sections = [s.strip() for s in args.sections.split(",")]
    thread_counts = [int(t) for t in args.small_threads.split(",")]
    report = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "shapes": {}}
    print(f"# {report['cpu']}, {os.cpu_count()} cores, torch {torch.__version__}, mambapy: {have_mambapy()}")
    if "big" in sections:
        print(f"\n# Big shapes, {args.threads} threads")
        big_section(args, report)
    if "small" in sections:
        report["small"] = small_section(thread_counts, args.rounds)
    if "busy" in sections:
        report["busy"] = busy_section(thread_counts, args.busy_rounds, args.step_batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.result:
        from machine import write_result

        write_result(args.result, "benchmarks/scan_cpu.py", sys.argv[1:], report)


if __name__ == "__main__":
    main()
