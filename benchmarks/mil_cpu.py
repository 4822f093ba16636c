"""MambaMIL mixers on the CPU: forward + backward of one whole-slide bag (20,000 x 1024 by default).

    python benchmarks/mil_cpu.py [--instances 20000] [--feat-dim 1024] [--rounds 3] [--threads N]

Builds MambaMIL (2 layers, width 512, d_state 16, as the paper) with each mixer, then times one
training step's forward + backward (no optimizer step) per mixer in interleaved rounds (lb, mamba,
bimamba, srmamba, lb-srmamba, lb, mamba, ...), so that machine load drifts hit every mixer alike, and
reports medians. Uses the fused numba "cpu" scan backend when `lbmamba.ops.available_backends()` lists
it (else the torch backend; the table says which). Prints a markdown table and the target ratios:
lb <= 1.2x mamba and lb <= 0.7x bimamba.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from lbmamba.models.mil import create_mil_model
from lbmamba.ops import available_backends, choose_backend

MIXERS = ("lb", "mamba", "bimamba", "srmamba", "lb-srmamba")


def _step(model, bag, label):
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(bag), label)
    loss.backward()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=20000)
    p.add_argument("--feat-dim", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rate", type=int, default=5)
    p.add_argument("--mixers", default=",".join(MIXERS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]

    torch.manual_seed(0)
    bag = torch.randn(1, args.instances, args.feat_dim)
    label = torch.tensor([1])
    backend = choose_backend("auto", bag)
    models = {}
    for name in mixers:
        torch.manual_seed(0)
        model = create_mil_model(name, in_dim=args.feat_dim, num_classes=2, rate=args.rate, drop_rate=0.0)
        models[name] = model.train()

    times = {name: [] for name in mixers}
    for r in range(args.rounds + 1):  # round 0: warm-up (numba compilation, allocator)
        this_round = {name: _step(models[name], bag, label) for name in mixers}
        if r > 0:
            for name, dt in this_round.items():
                times[name].append(dt)
        timings = ", ".join(f"{n} {dt:.2f}s" for n, dt in this_round.items())
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: {timings}", file=sys.stderr, flush=True)

    med = {n: statistics.median(v) for n, v in times.items()}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    cpu = platform.processor() or platform.machine()
    print()
    print(f"MambaMIL forward+backward, one bag of {args.instances:,} x {args.feat_dim} (2 layers, width 512, "
          f"d_state 16, SRMamba rate {args.rate}), CPU: {cpu}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, scan backend {backend!r} (available: {', '.join(available_backends())}), "
          f"median of {args.rounds} interleaved rounds")
    print()
    print("| mixer | params | fwd+bwd (s) | vs mamba | vs bimamba |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in mixers:
        vs_m = f"{med[n] / med['mamba']:.2f}x" if "mamba" in med else "-"
        vs_b = f"{med[n] / med['bimamba']:.2f}x" if "bimamba" in med else "-"
        print(f"| {n} | {params[n] / 1e6:.2f} M | {med[n]:.2f} | {vs_m} | {vs_b} |")
    print()
    if {"lb", "mamba", "bimamba"} <= set(med):
        r_m, r_b = med["lb"] / med["mamba"], med["lb"] / med["bimamba"]
        print(f"targets: lb / mamba = {r_m:.2f} (target <= 1.2: {'met' if r_m <= 1.2 else 'NOT met'}); "
              f"lb / bimamba = {r_b:.2f} (target <= 0.7: {'met' if r_b <= 0.7 else 'NOT met'})")
    if {"lb-srmamba", "srmamba"} <= set(med):
        print(f"lb-srmamba / srmamba = {med['lb-srmamba'] / med['srmamba']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
