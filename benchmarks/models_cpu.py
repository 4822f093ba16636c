"""LBVim-T vs uVim-T vs Vim-T on the CPU: parameters, FLOPs, inference and training-step throughput.

    python benchmarks/models_cpu.py            # the full run (224 px, inference at batch 8 and 32,
                                               # training step at batch 8, 5 repeats, medians)
    python benchmarks/models_cpu.py --quick    # a fast check that everything runs (batch 8, 2 repeats)

All models are measured in ONE process, interleaved repeat by repeat (so that drift in machine load
hits every model alike); each number is the median over the repeats. Prints a markdown table and the
target ratios (LBVim-T inference >= 1.5x Vim-T and >= 0.9x uVim-T; LBVim-T training step >= 1.4x Vim-T).

FLOPs: torch.utils.flop_counter.FlopCounterMode counts the matmuls and convolutions (2 FLOPs per
multiply-add) but not the scan, which is a custom op (and not elementwise work either). The scan is
added analytically: 9·B·D·L·N per plain selective scan (discretisation exp(ΔA) and ΔBu, the recurrence,
the C·h read-out) and 4·B·D·L·N more for the LB scan's window-local backward recurrence and its
combination h = h^L + h^R - x; D = d_inner, N = d_state. Vim's bidirectional mixer runs two plain scans.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import timm
from torch.utils.flop_counter import FlopCounterMode

import lbmamba  # noqa: F401  (registers the models)
from lbmamba.ops import available_backends, choose_backend, resolve_window

MODELS = {
    "LBVim-T": "lbvim_tiny_patch16_224",
    "uVim-T": "uvim_tiny_patch16_224",
    "Vim-T": "vim_tiny_patch16_224",
}
PLAIN_SCAN_FLOPS = 9  # per batch * d_inner * L * d_state
LB_EXTRA_FLOPS = 4


def scan_flops(model, batch: int, img_size: int) -> int:
    """Analytic FLOPs of every scan in one forward of `model` on `batch` images."""
    grid = img_size // model.patch_embed.patch_size[0]
    seqlen = grid * grid + model.num_prefix_tokens
    total = 0
    for layer in model.layers:
        mixer = layer.mixer
        per_scan = PLAIN_SCAN_FLOPS * batch * mixer.d_inner * seqlen * mixer.d_state
        if mixer.scan == "bi":
            total += 2 * per_scan
        elif resolve_window(mixer.window, seqlen) > 1:
            total += per_scan + LB_EXTRA_FLOPS * batch * mixer.d_inner * seqlen * mixer.d_state
        else:
            total += per_scan
    return total


def matmul_flops(model, img_size: int) -> int:
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def time_inference(model, x) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def time_train_step(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _against(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x (target >= {target}x) {'OK' if ratio >= target else 'MISSED'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 2 warm-ups, batch 8 only: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up runs (default 3: the first calls may compile kernels; 2 with --quick)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--result", default=None,
                        help="also write the numbers to this result file (for benchmarks/report.py)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if args.quick and args.infer_batches == [8, 32]:
        args.infer_batches = [8]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    probe = torch.empty(1)
    print(f"# Model throughput on CPU ({time.strftime('%Y-%m-%d %H:%M')})")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), timm {timm.__version__}, "
        f"Python {platform.python_version()}"
    )
    backend = choose_backend("auto", probe)
    print(f"scan backend for float32 CPU tensors: {backend!r} (available: {available_backends()})")
    print(
        f"img {args.img_size} px, fp32, inference batches {args.infer_batches} (inference_mode), training step at "
        f"batch {args.train_batch} (forward + cross-entropy + backward + AdamW step), {warmup} warm-up, "
        f"{repeats} repeats interleaved across models, medians\n"
    )

    models, optimizers, rows = {}, {}, {}
    for label in args.models:
        model = timm.create_model(MODELS[label], img_size=args.img_size)
        params = sum(p.numel() for p in model.parameters())
        model.eval()
        mm = matmul_flops(model, args.img_size)
        sc = scan_flops(model, 1, args.img_size)
        models[label] = model
        optimizers[label] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rows[label] = dict(params=params, mm_flops=mm, scan_flops=sc, infer={}, train=None)

    # inference
    for batch in args.infer_batches:
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                time_inference(model, x)
        times = {label: [] for label in models}
        for _ in range(repeats):
            for label, model in models.items():
                times[label].append(time_inference(model, x))
        for label in models:
            rows[label]["infer"][batch] = batch / statistics.median(times[label])
        speeds = ", ".join(f"{k} {rows[k]['infer'][batch]:.1f} img/s" for k in models)
        print(f"inference batch {batch}: {speeds}", flush=True)

    # training step
    batch = args.train_batch
    x = torch.randn(batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (batch,))
    for label, model in models.items():
        model.train()
        for _ in range(warmup):
            time_train_step(model, optimizers[label], x, y)
    times = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            times[label].append(time_train_step(model, optimizers[label], x, y))
    for label in models:
        rows[label]["train"] = batch / statistics.median(times[label])
    speeds = ", ".join(f"{k} {rows[k]['train']:.1f} img/s" for k in models)
    print(f"training batch {batch}: {speeds}\n", flush=True)

    # table
    header = ["model", "params (M)", "GFLOPs/img (matmul+conv)", "+ scan (analytic)", "GFLOPs/img total"]
    header += [f"infer b{b} (img/s)" for b in args.infer_batches] + [f"train b{args.train_batch} (img/s)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for label, r in rows.items():
        cells = [
            f"{label} (`{MODELS[label]}`)",
            f"{r['params'] / 1e6:.2f}",
            f"{r['mm_flops'] / 1e9:.3f}",
            f"{r['scan_flops'] / 1e9:.3f}",
            f"{(r['mm_flops'] + r['scan_flops']) / 1e9:.3f}",
        ]
        cells += [f"{r['infer'][b]:.1f}" for b in args.infer_batches] + [f"{r['train']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nFLOPs: FlopCounterMode counts matmuls / convolutions only; the scan (a custom op) is added analytically as "
        f"{PLAIN_SCAN_FLOPS}·B·D·L·N per plain scan (+{LB_EXTRA_FLOPS}·B·D·L·N for the LB window recurrence)."
    )

    # targets
    if {"LBVim-T", "Vim-T"} <= rows.keys():
        print()
        lb, vim = rows["LBVim-T"], rows["Vim-T"]
        for b in args.infer_batches:
            ratio = lb["infer"][b] / vim["infer"][b]
            print(f"LBVim-T / Vim-T inference, batch {b}: {_against(ratio, 1.5)}")
        if "uVim-T" in rows:
            for b in args.infer_batches:
                ratio = lb["infer"][b] / rows["uVim-T"]["infer"][b]
                print(f"LBVim-T / uVim-T inference, batch {b}: {_against(ratio, 0.9)}")
        ratio = lb["train"] / vim["train"]
        print(f"LBVim-T / Vim-T training step, batch {args.train_batch}: {_against(ratio, 1.4)}")
    if args.result:
        from machine import write_result

        write_result(args.result, "benchmarks/models_cpu.py", sys.argv[1:] if argv is None else argv,
                     {"img_size": args.img_size, "threads": torch.get_num_threads(), "repeats": repeats,
                      "train_batch": args.train_batch, "rows": rows})
        print(f"result file: {args.result}")


if __name__ == "__main__":
    main()
