"""MIL models on the CPU: one training step (forward, backward, optimizer step) per bag, at several bag
sizes, on an idle machine and beside another CPU-bound job.

    python benchmarks/mil_cpu.py [--sizes 8,1000,20000] [--mixers lb,mamba,bimamba,abmil]
                                 [--rounds 3] [--threads N] [--conditions idle,busy] [--json out.json]

Builds each model as MambaMIL's paper configuration (2 layers, width 512, d_state 16; attention MIL:
ABMIL with the same 512-wide projection), 1024-d instance features. For each condition and bag size the
models take turns, one step each, in a fresh order every round (after one warm-up round), so that drift
of the machine's speed hits all of them alike; the table reports medians. "busy" starts one process
spinning on a core for the duration (a second job on the machine) and stops it afterwards. Uses the
fused "cpu" scan backend when available (the output says which). Prints a markdown table and the
ratios lb / mamba (target <= 1.2 at every size) and lb / bimamba.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from lbmamba.models.mil import create_mil_model
from lbmamba.ops import choose_backend
from machine import busy, describe, interleaved

MIXERS = ("lb", "mamba", "bimamba", "abmil")


def train_step(model, optimizer, bag, label) -> None:
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(bag), label).backward()
    optimizer.step()


def bench_size(models, optimizers, instances, feat_dim, rounds, seed=0):
    bag = torch.randn(1, instances, feat_dim, generator=torch.Generator().manual_seed(seed))
    label = torch.tensor([1])
    steps = {name: (lambda name=name: train_step(models[name], optimizers[name], bag, label)) for name in models}
    return interleaved(steps, rounds, seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,1000,20000", help="instances per bag, comma-separated")
    p.add_argument("--feat-dim", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rate", type=int, default=5, help="SRMamba rate (srmamba mixers only)")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--conditions", default="idle,busy", help="idle, busy or both")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    conditions = [c.strip() for c in args.conditions.split(",")]

    models, optimizers = {}, {}
    for name in mixers:
        torch.manual_seed(0)
        models[name] = create_mil_model(name, in_dim=args.feat_dim, num_classes=2, rate=args.rate,
                                        drop_rate=0.0).train()
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=1e-5)
    backend = choose_backend("auto", torch.zeros(1))
    report = {"machine": describe(torch.get_num_threads()), "backend": backend, "feat_dim": args.feat_dim,
              "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}, "results": {}}
    for condition in conditions:
        with busy(condition == "busy"):
            for instances in sizes:
                times = bench_size(models, optimizers, instances, args.feat_dim, args.rounds)
                med = {n: statistics.median(v) for n, v in times.items()}
                report["results"][f"{condition}/{instances}"] = {"median_s": med, "times_s": times}
                print(f"{condition} {instances:>6} instances: "
                      + ", ".join(f"{n} {med[n] * 1e3:.1f} ms" for n in mixers), file=sys.stderr, flush=True)

    print(f"\nOne training step per bag (fwd + bwd + Adam), {report['machine']}, scan backend {backend!r}, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| condition | instances | " + " | ".join(f"{n} (ms)" for n in mixers) + " | lb / mamba | lb / bimamba |")
    print("|---|---:|" + "---:|" * (len(mixers) + 2))
    for key, entry in report["results"].items():
        condition, instances = key.split("/")
        med = entry["median_s"]
        ratios = [f"{med['lb'] / med[o]:.2f}" if {"lb", o} <= set(med) else "-" for o in ("mamba", "bimamba")]
        entry["lb/mamba"] = med["lb"] / med["mamba"] if {"lb", "mamba"} <= set(med) else None
        print(f"| {condition} | {int(instances):,} | " + " | ".join(f"{med[n] * 1e3:.1f}" for n in mixers)
              + f" | {ratios[0]} | {ratios[1]} |")
    worst = [e["lb/mamba"] for e in report["results"].values() if e["lb/mamba"] is not None]
    if worst:
        print(f"\nlb / mamba, worst over sizes and conditions: {max(worst):.2f} (target <= 1.2: "
              f"{'met' if max(worst) <= 1.2 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
