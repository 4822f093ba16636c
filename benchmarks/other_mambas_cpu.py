"""VMamba, LocalVim, PlainMamba and Adventurer on the CPU, original vs LB: params, GFLOPs, images/s.

Each family's tiny original against its LB version: parameters, GFLOPs, images/s for inference and for a
training step, and the LB / original time ratio per family.

    python benchmarks/other_mambas_cpu.py                       # 224 px, batch 8, 3 timed rounds
    python benchmarks/other_mambas_cpu.py --models vmamba plainmamba --rounds 5
    python benchmarks/other_mambas_cpu.py --quick               # 64 px, batch 2, 1 round, 1 thread: checks
                                                                # that it runs (about 30 s)
    python benchmarks/other_mambas_cpu.py --json out.json       # also write every number

Families (the tiny model of each; the original runs the vanilla scan, window 1, the LB version the LB
scan, window "auto", with the same parameters): vmamba (`vmamba_tiny_s1l8`, SS2D's four routes),
localvim (`localvim_tiny`, LocalMamba's per-layer directions), plainmamba (`plainmamba_l1`, four zigzag
scans in one call), adventurer (`adventurer_tiny_patch16_224`, Mamba-2 heads run as an N = 64 scan).

Every selected model is built in one process with the same seed; each round runs every job (inference
and training step of every model) once, in a fresh order (after one untimed warm-up round), so that drift
in the machine's speed hits all of them alike; images/s are medians over the rounds. Inference runs in
eval mode under torch.inference_mode; a training step is forward, cross-entropy on random labels,
backward and an AdamW step, in train mode. The LB / original ratio of a family is the median over rounds
of the per-round ratio of the two models' times (the two ran in the same round); the target is that LB
costs at most TARGET (1.15) times its original, for inference and for the training step.

FLOPs: torch.utils.flop_counter.FlopCounterMode counts matmuls and convolutions (2 per multiply-add) on a
one-image forward; it does not count the scan (a custom kernel, which a plain inference call even runs
without going through torch's dispatcher). The scan is added by formula, as in benchmarks/models_cpu.py:
9·B·D·L·N per plain scan (discretisation, state update, read-out) and 4·B·D·L·N more when the window is
above 1 (the LB scan's window recurrence); B, D = channels, L = length actually scanned (padding
included), N = d_state. Norms, activations and index shuffles are not counted.

How the scans are found, for any model: every model module calls the one public op,
`lbmamba.ops.selective_scan_fn`, through the name its own module bound at import (`from ..ops import
selective_scan_fn`). While FLOPs are counted, `counting_scans` rebinds that name, in every loaded module
whose global `selective_scan_fn` is the op, to a wrapper that records (batch, channels, length, d_state,
resolved window) from the arguments (u is (B, D, L), A is (D, N); the window resolves as the op resolves
it) and calls the op unchanged; it puts the original back afterwards. This needs no knowledge of a
model's layout (routes, directions, stacked batches, padding, head layout all show up in the shapes the
op actually receives). A TorchDispatchMode would not do: plain inference calls reach the fused kernel
without dispatch. A model that reached the scan some other way (a reference stored before the wrap)
would show no scans: the benchmark refuses to report such a model rather than under-count it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
from typing import Iterator, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
# machine.py and models_cpu.py sit next to this file (on the path already when it runs as a script)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import timm
from torch.utils.flop_counter import FlopCounterMode

import lbmamba  # noqa: F401  (registers the models)
from lbmamba.ops import choose_backend, resolve_window
from lbmamba.ops import selective_scan_fn as _SCAN_OP  # another name: counting_scans must not rebind it
from machine import describe, interleaved
from models_cpu import LB_EXTRA_FLOPS, PLAIN_SCAN_FLOPS

#: family -> (display name of the original, timm name of the original, timm name of the LB version)
FAMILIES = {
    "vmamba": ("VMamba-T", "vmamba_tiny_s1l8", "lb_vmamba_tiny_s1l8"),
    "localvim": ("LocalVim-T", "localvim_tiny", "lb_localvim_tiny"),
    "plainmamba": ("PlainMamba-L1", "plainmamba_l1", "lb_plainmamba_l1"),
    "adventurer": ("Adventurer-T", "adventurer_tiny_patch16_224", "lb_adventurer_tiny_patch16_224"),
}
#: the target: an LB model's time (inference, training step) at most this many times its original's
TARGET = 1.15


@contextlib.contextmanager
def counting_scans() -> Iterator[List[tuple]]:
    """Record every `selective_scan_fn` call made inside the block as (batch, dim, seqlen, dstate, window);
    the window is the resolved int. See the module docstring for how."""
    calls: List[tuple] = []
    original = _SCAN_OP

    def counted(u, delta, A, B, C, *args, window="auto", **kwargs):
        batch, dim, seqlen = u.shape
        calls.append((batch, dim, seqlen, A.shape[-1], resolve_window(window, seqlen)))
        return original(u, delta, A, B, C, *args, window=window, **kwargs)

    patched = [m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get("selective_scan_fn") is original]
    for module in patched:
        module.selective_scan_fn = counted
    try:
        yield calls
    finally:
        for module in patched:
            module.selective_scan_fn = original


def scan_call_flops(call: tuple) -> int:
    batch, dim, seqlen, dstate, window = call
    per = batch * dim * seqlen * dstate
    return PLAIN_SCAN_FLOPS * per + (LB_EXTRA_FLOPS * per if window > 1 else 0)


def count_flops(model, img_size: int) -> dict:
    """GFLOPs of a one-image forward: FlopCounterMode's count, the scans by formula, and the scans seen."""
    x = torch.randn(1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, counting_scans() as calls:
        model(x)
    if not calls:
        raise RuntimeError(f"{type(model).__name__}: no selective_scan_fn call was seen, so its scan FLOPs cannot be "
                           "counted (does it reach the op through a reference bound before counting_scans?)")
    counted = counter.get_total_flops()
    scans = sum(scan_call_flops(c) for c in calls)
    shapes = collections.Counter(calls)
    return {
        "gflops_counted": counted / 1e9,
        "gflops_scan": scans / 1e9,
        "gflops": (counted + scans) / 1e9,
        "scan_calls": len(calls),
        "scans": [dict(zip(("batch", "dim", "seqlen", "dstate", "window"), shape), calls=n)
                  for shape, n in shapes.items()],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES), metavar="FAMILY",
                   help=f"families to run (default all: {' '.join(FAMILIES)})")
    p.add_argument("--batch", type=int, default=None, help="images per inference call and training step "
                                                           "(default 8; 2 with --quick)")
    p.add_argument("--img-size", type=int, default=None, help="square input side (default 224; 64 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="64 px, batch 2, one round, one thread: checks that it runs (in well under a minute)")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    img = args.img_size or (64 if args.quick else 224)
    batch = args.batch or (2 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    families = list(dict.fromkeys(args.models))
    threads = args.threads or (1 if args.quick else None)
    if threads:
        # --quick takes one thread: on a shared 2-core machine with another job running, two threads were
        # 10-30x slower than one at these tiny sizes (threads waiting on a preempted peer)
        torch.set_num_threads(threads)

    models, optimizers, report = {}, {}, {}
    for family in families:
        display, original, lb = FAMILIES[family]
        for variant, label, name in (("original", display, original), ("lb", f"LB-{display}", lb)):
            torch.manual_seed(0)
            model = timm.create_model(name, img_size=img)
            models[label] = model
            optimizers[label] = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
            report[label] = {"family": family, "variant": variant, "timm_name": name,
                             "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
                             **count_flops(model, img)}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=gen)
    num_classes = min(m.num_classes for m in models.values())
    y = torch.randint(0, num_classes, (batch,), generator=gen)

    def infer(model):
        model.eval()
        with torch.inference_mode():
            model(x)

    def train_step(model, optimizer):
        model.train()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # so that eight models do not hold gradients at once

    jobs = {}
    for label, model in models.items():
        jobs[f"{label} infer"] = lambda m=model: infer(m)
        jobs[f"{label} train"] = lambda m=model, o=optimizers[label]: train_step(m, o)
    times = interleaved(jobs, rounds)
    for label in models:
        for kind in ("infer", "train"):
            series = times[f"{label} {kind}"]
            report[label][f"{kind}_img_s"] = batch / statistics.median(series)
            report[label][f"{kind}_times_s"] = series

    ratios = {}
    for family in families:
        display = FAMILIES[family][0]
        orig, lb = f"{display}", f"LB-{display}"
        row = {"original": orig, "lb": lb, "gflops_ratio": report[lb]["gflops"] / report[orig]["gflops"]}
        for kind in ("infer", "train"):
            per_round = [t_lb / t_orig for t_lb, t_orig in zip(times[f"{lb} {kind}"], times[f"{orig} {kind}"])]
            row[f"{kind}_time_ratio"] = statistics.median(per_round)
            row[f"{kind}_time_ratios"] = per_round
            row[f"{kind}_met"] = row[f"{kind}_time_ratio"] <= TARGET
        ratios[family] = row

    machine = describe(torch.get_num_threads())
    backend = choose_backend("auto", torch.zeros(1))
    print(f"# Other vision Mambas on the CPU, original vs LB: {img} x {img}, batch {batch}, {rounds} round(s), "
          "medians")
    print(f"{machine}; torch {torch.__version__}; timm {timm.__version__}; scan backend {backend!r}\n")
    header = ["model", "params (M)", "GFLOPs counted", "+ scan", "GFLOPs", "scan calls", "infer (img/s)",
              "train step (img/s)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for label, r in report.items():
        cells = [f"{label} (`{r['timm_name']}`)", f"{r['params_m']:.2f}", f"{r['gflops_counted']:.2f}",
                 f"{r['gflops_scan']:.3f}", f"{r['gflops']:.2f}", str(r["scan_calls"]), f"{r['infer_img_s']:.2f}",
                 f"{r['train_img_s']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nGFLOPs per image: FlopCounterMode (matmuls, convolutions) + the scans by formula, "
          f"{PLAIN_SCAN_FLOPS}·B·D·L·N per plain scan (+{LB_EXTRA_FLOPS}·B·D·L·N for the LB window recurrence); "
          "scan calls: selective_scan_fn calls in one forward.\n")

    header = ["family", "GFLOPs LB / original", f"infer time LB / original (<= {TARGET})",
              f"train step time LB / original (<= {TARGET})"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for family, row in ratios.items():
        cells = [family, f"{row['gflops_ratio']:.3f}"]
        cells += [f"{row[f'{k}_time_ratio']:.3f} {'met' if row[f'{k}_met'] else 'not met'}" for k in ("infer", "train")]
        print("| " + " | ".join(cells) + " |")
    print("\nTime ratios: medians over rounds of the per-round ratio (both models timed in the same round).")
    if args.json:
        out = {"machine": machine, "torch": torch.__version__, "timm": timm.__version__, "backend": backend,
               "threads": torch.get_num_threads(), "img_size": img, "batch": batch, "rounds": rounds,
               "quick": args.quick, "target": TARGET, "families": ratios, "models": report}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
