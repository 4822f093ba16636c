"""Cascade Mask R-CNN detectors on the CPU: LBVim-T vs Vim-T backbones under LBMamba's detection heads
(ViTDet simple feature pyramid 256 channels, RPN with 2 convs, three box stages of 4 convs + 1 fc, a mask head
per stage, 80 classes): parameters, GFLOPs and inference images/s, split into the backbone, the pyramid and
the rest (RPN, RoI heads, post-processing), which shows where the time goes.

    python benchmarks/det_cpu.py                       # 512 x 512 and 1024 x 1024, batch 1, 3 timed rounds
    python benchmarks/det_cpu.py --sizes 512           # one size
    python benchmarks/det_cpu.py --quick               # 128 x 128, 1 round, small heads: checks that it runs
    python benchmarks/det_cpu.py --json out.json       # also write every number

Both detectors are built in one process with the same seed (random weights: the RPN still keeps its 1,000
proposals per image at test time, so the box heads do their full work; the mask heads run on the detections
that pass the 0.05 score threshold, few with random weights, the same for both backbones). Each round runs
the jobs (whole detector, backbone alone, backbone + pyramid, for each model) once in a fresh order after one
untimed warm-up round; the table reports medians. Inference runs under torch.inference_mode in eval mode.

FLOPs: torch.utils.flop_counter.FlopCounterMode counts matmuls and convolutions (2 per multiply-add) but not the
scan, a custom op, nor RoIAlign / NMS; the scan is added by formula as in benchmarks/models_cpu.py.
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

from lbmamba.models import build_detector
from lbmamba.ops import choose_backend
from machine import describe, interleaved
from models_cpu import scan_flops

BACKBONES = {"LBVim-T": "lbvim_tiny_patch16_224", "Vim-T": "vim_tiny_patch16_224"}
PARTS = ("whole", "backbone", "pyramid")


def _flops(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated square sides (default 512,1024; 128 with --quick)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small images and heads, one round: checks that it runs")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("128" if args.quick else "512,1024")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = dict(out_channels=32, head_conv_channels=32, head_fc_channels=64, rpn_pre_nms_top_n_test=100,
                 rpn_post_nms_top_n_test=50) if args.quick else {}

    machine = describe(torch.get_num_threads())
    backend = choose_backend("auto", torch.zeros(1))
    results = {}
    for img in sizes:
        gen = torch.Generator().manual_seed(0)
        images = [torch.rand(3, img, img, generator=gen) for _ in range(args.batch)]
        report, jobs = {}, {}
        for label, name in BACKBONES.items():
            torch.manual_seed(0)
            model = build_detector(name, args.num_classes, img_size=img, **heads).eval()
            with torch.inference_mode():
                batch = model.transform(images)[0].tensors  # normalised and padded as the detector sees it

            def whole(m=model, images=images):
                with torch.inference_mode():
                    m(images)

            def backbone(m=model, x=batch):
                with torch.inference_mode():
                    m.backbone.body(x)

            def pyramid(m=model, x=batch):
                with torch.inference_mode():
                    m.backbone(x)

            counted = {part: _flops(fn) / args.batch for part, fn in
                       (("whole", whole), ("backbone", backbone), ("pyramid", pyramid))}
            scans = scan_flops(model.backbone.body.model, 1, img)
            report[label] = {"backbone": name, "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
                             "backbone_params_m": sum(q.numel() for q in model.backbone.body.parameters()) / 1e6,
                             "gflops": (counted["whole"] + scans) / 1e9,
                             "gflops_backbone": (counted["backbone"] + scans) / 1e9,
                             "gflops_pyramid": (counted["pyramid"] - counted["backbone"]) / 1e9,
                             "gflops_heads": (counted["whole"] - counted["pyramid"]) / 1e9,
                             "gflops_scan": scans / 1e9}
            jobs.update({f"{label} {part}": fn for part, fn in (("whole", whole), ("backbone", backbone),
                                                                 ("pyramid", pyramid))})
        times = interleaved(jobs, rounds)
        for label, r in report.items():
            med = {part: statistics.median(times[f"{label} {part}"]) for part in PARTS}
            r.update(infer_img_s=args.batch / med["whole"], backbone_img_s=args.batch / med["backbone"],
                     seconds=med, share_backbone=med["backbone"] / med["whole"],
                     share_pyramid=(med["pyramid"] - med["backbone"]) / med["whole"],
                     share_heads=(med["whole"] - med["pyramid"]) / med["whole"],
                     times_s={part: times[f"{label} {part}"] for part in PARTS})
        results[img] = report

        print(f"\n# Cascade Mask R-CNN on the CPU, {img} x {img}, batch {args.batch}, {rounds} round(s), medians")
        print(f"{machine}; torch {torch.__version__}; scan backend {backend!r}\n")
        header = ["backbone", "params (M)", "of which backbone", "GFLOPs", "backbone / pyramid / heads GFLOPs",
                  "infer (img/s)", "backbone alone (img/s)", "time: backbone / pyramid / heads"]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for label, r in report.items():
            cells = [f"{label} (`{r['backbone']}`)", f"{r['params_m']:.2f}", f"{r['backbone_params_m']:.2f}",
                     f"{r['gflops']:.1f}", f"{r['gflops_backbone']:.1f} / {r['gflops_pyramid']:.1f} / "
                     f"{r['gflops_heads']:.1f}", f"{r['infer_img_s']:.3f}", f"{r['backbone_img_s']:.3f}",
                     f"{100 * r['share_backbone']:.0f} % / {100 * r['share_pyramid']:.0f} % / "
                     f"{100 * r['share_heads']:.0f} %"]
            print("| " + " | ".join(cells) + " |")
        lb, vim = report["LBVim-T"], report["Vim-T"]
        print(f"\nLBVim-T / Vim-T whole detector, inference: {lb['infer_img_s'] / vim['infer_img_s']:.2f}x; "
              f"backbone alone: {lb['backbone_img_s'] / vim['backbone_img_s']:.2f}x")
    if args.json:
        out = {"machine": machine, "torch": torch.__version__, "backend": backend, "batch": args.batch,
               "rounds": rounds, "quick": args.quick, "sizes": {str(k): v for k, v in results.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
