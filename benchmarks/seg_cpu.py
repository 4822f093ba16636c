"""UperNet segmentors on the CPU: LBVim-T vs Vim-T backbones under the same head (LBMamba's: no neck,
UPerHead 512 channels, FCN auxiliary head 256): parameters, GFLOPs, images/s for inference and for a
training step, and for inference of the backbone alone (its four maps), which shows how much of the time
the heads take.

    python benchmarks/seg_cpu.py                    # 512 x 512, batch 2, 5 timed rounds
    python benchmarks/seg_cpu.py --quick            # 64 x 64, 1 round: checks that it runs (< 30 s)
    python benchmarks/seg_cpu.py --json out.json    # also write every number

Both segmentors are built in one process with the same seed; each round runs the six jobs (inference,
training step and backbone inference of each model) once, in a fresh order (after one untimed warm-up round), so that
drift in the machine's speed hits all of them alike; the table reports medians. Inference runs under
torch.inference_mode in eval mode; a training step is forward, mmseg's two cross-entropy losses,
backward and an AdamW step, in train mode.

FLOPs: torch.utils.flop_counter.FlopCounterMode counts matmuls and convolutions (2 per multiply-add) but
not the scan, a custom op; the scan is added by formula, as in benchmarks/models_cpu.py: 9·B·D·L·N per
plain scan (discretisation, state update, read-out) and 4·B·D·L·N more for the LB scan's window
recurrence (D = d_inner, N = d_state, L = tokens); Vim's bidirectional mixer runs two plain scans.
Interpolations, norms and activations are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from lbmamba.models import build_segmentor
from lbmamba.ops import choose_backend
from machine import describe, interleaved
from models_cpu import LB_EXTRA_FLOPS, PLAIN_SCAN_FLOPS, scan_flops

BACKBONES = {"LBVim-T": "lbvim_tiny_patch16_224", "Vim-T": "vim_tiny_patch16_224"}
#: the target: LBVim-T's segmentor at least this many times Vim-T's inference throughput
INFERENCE_TARGET = 1.4


def count_flops(model, img_size: int) -> dict:
    x = torch.randn(1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counted = counter.get_total_flops()
    scans = scan_flops(model.backbone.model, 1, img_size)
    return {"gflops_counted": counted / 1e9, "gflops_scan": scans / 1e9, "gflops": (counted + scans) / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=None, help="square input side (default 512; 64 with --quick)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small images, one round: checks that it runs")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    img = args.img_size or (64 if args.quick else 512)
    rounds = args.rounds or (1 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    models, optimizers, report = {}, {}, {}
    for label, name in BACKBONES.items():
        torch.manual_seed(0)
        model = build_segmentor(name, args.num_classes, img_size=img, neck="none", head_channels=512)
        models[label] = model
        optimizers[label] = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
        report[label] = {"backbone": name, "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
                         **count_flops(model, img)}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, img, img, generator=gen)
    masks = torch.randint(0, args.num_classes, (args.batch, img, img), generator=gen)

    def infer(model):
        model.eval()
        with torch.inference_mode():
            model(x)

    def backbone_only(model):  # where the time goes: the four maps without the heads
        model.eval()
        with torch.inference_mode():
            model.backbone(x)

    def train_step(model, optimizer):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model.losses(x, masks)["loss"].backward()
        optimizer.step()

    jobs = {}
    for label, model in models.items():
        jobs[f"{label} infer"] = lambda m=model: infer(m)
        jobs[f"{label} train"] = lambda m=model, o=optimizers[label]: train_step(m, o)
        jobs[f"{label} backbone"] = lambda m=model: backbone_only(m)
    times = interleaved(jobs, rounds)
    for label in models:
        for kind in ("infer", "train", "backbone"):
            series = times[f"{label} {kind}"]
            report[label][f"{kind}_img_s"] = args.batch / statistics.median(series)
            report[label][f"{kind}_times_s"] = series

    machine = describe(torch.get_num_threads())
    backend = choose_backend("auto", torch.zeros(1))
    print(f"# UperNet segmentors on the CPU, {img} x {img}, batch {args.batch}, {rounds} round(s), medians")
    print(f"{machine}; torch {torch.__version__}; scan backend {backend!r}\n")
    header = ["backbone", "params (M)", "GFLOPs counted", "+ scan", "GFLOPs", "infer (img/s)", "train step (img/s)",
              "backbone alone, infer (img/s)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for label, r in report.items():
        cells = [f"{label} (`{r['backbone']}`)", f"{r['params_m']:.2f}", f"{r['gflops_counted']:.2f}",
                 f"{r['gflops_scan']:.2f}", f"{r['gflops']:.2f}", f"{r['infer_img_s']:.2f}", f"{r['train_img_s']:.2f}",
                 f"{r['backbone_img_s']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nFLOPs per image: FlopCounterMode (matmuls, convolutions) + the scan by formula, "
          f"{PLAIN_SCAN_FLOPS}·B·D·L·N per plain scan (+{LB_EXTRA_FLOPS}·B·D·L·N for the LB window recurrence).")
    lb, vim = report["LBVim-T"], report["Vim-T"]
    ratios = {kind: lb[f"{kind}_img_s"] / vim[f"{kind}_img_s"] for kind in ("infer", "train", "backbone")}
    verdict = "OK" if ratios["infer"] >= INFERENCE_TARGET else "MISSED"
    print(f"LBVim-T / Vim-T inference: {ratios['infer']:.2f}x (target >= {INFERENCE_TARGET}x) {verdict}")
    print(f"LBVim-T / Vim-T training step: {ratios['train']:.2f}x")
    print(f"LBVim-T / Vim-T backbone alone, inference: {ratios['backbone']:.2f}x")
    if args.json:
        out = {"machine": machine, "torch": torch.__version__, "backend": backend, "img_size": img,
               "batch": args.batch, "rounds": rounds, "quick": args.quick, "models": report, "ratios": ratios,
               "inference_target": INFERENCE_TARGET}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
