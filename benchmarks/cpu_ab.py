"""The cpu backend of this checkout against another checkout's, in one process (prev_state None on both).

    PYTHONPATH=src python benchmarks/cpu_ab.py OTHER_SRC [--threads 1,2] [--rounds 40]

OTHER_SRC is the other checkout's src/ folder (e.g. main's); its `lbmamba/ops/cpu` package is loaded under
another name beside this one's, and in each round every (version, call) pair runs once, in a fresh random
order, so that the machine's drift and other jobs hit both versions alike (separate processes could not
resolve 2 % on a shared machine). Calls: the training forward (`forward`, checkpoints kept), the inference
forward (a `forward_plan` without checkpoints, as selective_scan_fn's direct path) and the backward, at the
LBVim-T layer shape (8, 384, 196, 16) and at (1, 1024, L, 16) for L = 1, 7, 64. Prints, per call, the median
of the per-round ratios this / other.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lbmamba.ops import cpu as this_cpu

SHAPES = {"layer": (8, 384, 196, 16), "L1": (1, 1024, 1, 16), "L7": (1, 1024, 7, 16), "L64": (1, 1024, 64, 16)}


def load_other(src: str):
    path = Path(src) / "lbmamba" / "ops" / "cpu" / "__init__.py"
    spec = importlib.util.spec_from_file_location("other_cpu", path, submodule_search_locations=[str(path.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["other_cpu"] = module
    spec.loader.exec_module(module)
    return module


def inputs(batch, dim, seqlen, dstate, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g)
    return (u, torch.randn(batch, dim, seqlen, generator=g) * 0.3 + 0.3, -torch.rand(dim, dstate, generator=g) - 0.5,
            torch.randn(batch, 1, dstate, seqlen, generator=g), torch.randn(batch, 1, dstate, seqlen, generator=g),
            torch.randn(dim, generator=g), torch.randn(batch, dim, seqlen, generator=g),
            torch.randn(dim, generator=g) * 0.2)


def calls(module, x, window):
    fwd = lambda: module.forward(*x, True, window)
    plan = module.forward_plan(*x, window, keep_last_state=False, keep_checkpoints=False)
    _, _, ckpt = module.forward(*x, True, window)
    dout = torch.randn_like(x[0])
    bwd = lambda: module.backward(dout, None, *x, True, window, ckpt)
    return {"fwd": fwd, "fwd_direct": lambda: plan(*x, True), "bwd": bwd}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other_src")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args()
    other = load_other(args.other_src)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        jobs = {}
        for shape_name in args.shapes.split(","):
            x = inputs(*SHAPES[shape_name])
            window = 16 if x[0].shape[-1] > 256 else 8 if x[0].shape[-1] > 128 else 4
            for version, module in (("this", this_cpu), ("other", other)):
                for kind, fn in calls(module, x, window).items():
                    if shape_name != "layer" and kind == "bwd":
                        continue
                    jobs[(shape_name, kind, version)] = fn
        times = {k: [] for k in jobs}
        order = list(jobs)
        rng = random.Random(0)
        for r in range(args.rounds + 2):
            rng.shuffle(order)
            for k in order:
                reps = 20 if k[0] != "layer" else 1
                start = time.perf_counter()
                for _ in range(reps):
                    jobs[k]()
                if r >= 2:
                    times[k].append((time.perf_counter() - start) / reps)
        print(f"\n{threads} thread(s), {args.rounds} rounds: this / other (median of per-round ratios), this ms")
        for shape_name, kind, version in jobs:
            if version != "this":
                continue
            ratio = statistics.median(a / b for a, b in zip(times[(shape_name, kind, "this")],
                                                          times[(shape_name, kind, "other")]))
            ms = 1e3 * statistics.median(times[(shape_name, kind, "this")])
            print(f"  {shape_name:6s} {kind:10s} {ratio:.3f}   {ms:.3f}")


if __name__ == "__main__":
    main()
