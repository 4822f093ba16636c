"""ONNX export on the CPU: LBVim-T and Vim-T (224 px) against DeiT-Tiny (224 and 512 px), random weights.

For each model: export time (PyTorch's dynamo exporter + the verification in onnxruntime), file size, node
count, the largest relative difference to PyTorch; then the latency of batch 1 and batch 8 through PyTorch eager
(our CPU scan kernels), onnxruntime fp32 and onnxruntime int8 (dynamic quantisation of the MatMuls), and
PyTorch's own dynamic int8 (torch.ao quantize_dynamic of the Linear layers), interleaved rounds, medians.
Then the accuracy cost of int8 on the shipped default: `lbmamba train` with its defaults (a small LBVim on the
digits) trained here, exported, and scored on its held-out split (360 images) in PyTorch, onnxruntime fp32
and int8.

    python benchmarks/export.py                          # everything (tens of minutes on 2 cores)
    python benchmarks/export.py --models deit_tiny_patch16_224 --sizes 224 --rounds 1
    python benchmarks/export.py --skip-digits --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lbmamba  # noqa: F401  (registers the models)
from lbmamba.export import OnnxModel, export_onnx, quantize_dynamic
from machine import describe, interleaved

JOBS = [("lbvim_tiny_patch16_224", 224), ("deit_tiny_patch16_224", 224), ("vim_tiny_patch16_224", 224),
        ("deit_tiny_patch16_224", 512)]


def bench_model(name, size, batches, rounds, folder, threads):
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": size} if size != 224 else {}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    path = os.path.join(folder, f"{name}_{size}.onnx")
    start = time.perf_counter()
    figures = export_onnx(model, path, img_size=(size, size), in_chans=3, metadata={"model": name}, threads=threads)
    export_s = time.perf_counter() - start
    qpath = os.path.join(folder, f"{name}_{size}_int8.onnx")
    print(json.dumps({"model": name, "img_size": size, "export_s": round(export_s, 1), "nodes": figures["nodes"],
                      "mb": round(figures["bytes"] / 2**20, 2), "rel_error": figures["max_rel_error"]}), flush=True)
    q = quantize_dynamic(path, qpath)
    fp32, int8 = OnnxModel(path, threads), OnnxModel(qpath, threads)
    # PyTorch's dynamic int8 swaps nn.Linear modules; the Mamba mixer reads x_proj / dt_proj weights directly
    # (F.linear(x, x_proj.weight)), which a quantised Linear does not have: those two stay fp32
    spec = {n: torch.ao.quantization.default_dynamic_qconfig for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.split(".")[-1].startswith(("x_proj", "dt_proj"))}
    tq = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    row = {"model": name, "img_size": size, "export_s": round(export_s, 1), "nodes": figures["nodes"],
           "mb": round(figures["bytes"] / 2**20, 2), "int8_mb": round(q["bytes"] / 2**20, 2),
           "rel_error": figures["max_rel_error"]}
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        xn = x.numpy()
        with torch.no_grad():
            want = model(x).numpy()
            row[f"torch_int8_rel_error_b{batch}"] = float(np.abs(tq(x).numpy() - want).max() / np.abs(want).max())
        row[f"ort_int8_rel_error_b{batch}"] = float(np.abs(int8(xn) - want).max() / np.abs(want).max())

        def eager(m=model, x=x):
            with torch.no_grad():
                m(x)

        def torch_int8(m=tq, x=x):
            with torch.no_grad():
                m(x)

        times = interleaved({"eager": eager, "ort_fp32": lambda xn=xn: fp32(xn), "ort_int8": lambda xn=xn: int8(xn),
                             "torch_int8": torch_int8}, rounds)
        for job, ts in times.items():
            row[f"{job}_ms_b{batch}"] = round(1000 * statistics.median(ts), 1)
    print(json.dumps(row), flush=True)
    return row


def digits_accuracy(folder, epochs, threads):
    """top-1 of the trained default on its held-out split: PyTorch, onnxruntime fp32 and int8."""
    from lbmamba.data import load_digits_split
    from lbmamba.engine import export_model, train

    run = os.path.join(folder, "digits")
    overrides = {"output": run, "progress": False, "device": "cpu"}
    if epochs:
        overrides["epochs"] = epochs
    start = time.perf_counter()
    trained = train(overrides)
    train_s = time.perf_counter() - start
    ckpt = os.path.join(run, "best.pth")
    export_model({"checkpoint": ckpt, "output": os.path.join(folder, "digits.onnx")})
    export_model({"checkpoint": ckpt, "output": os.path.join(folder, "digits_int8.onnx"), "quantize": "dynamic"})
    _, val = load_digits_split(img_size=32, val_fraction=0.2, shift=0, in_chans=1)
    images = torch.stack([val[i][0] for i in range(len(val))]).numpy()
    targets = np.asarray([val[i][1] for i in range(len(val))])
    row = {"train_epochs": epochs or 15, "train_s": round(train_s, 1), "val_top1_train": trained.get("val_top1"),
           "images": len(targets)}
    for label, file in (("ort_fp32", "digits.onnx"), ("ort_int8", "digits_int8.onnx")):
        logits = OnnxModel(os.path.join(folder, file), threads)(images)
        row[f"top1_{label}"] = round(100.0 * float((logits.argmax(1) == targets).mean()), 2)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated timm names (default: the four jobs)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes for --models")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--digits-epochs", type=int, default=0, help="epochs of the default run (0: its 15)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    jobs = JOBS
    if args.models:
        sizes = [int(s) for s in (args.sizes or "224").split(",")]
        jobs = [(m, s) for m in args.models.split(",") for s in sizes]
    batches = [int(b) for b in args.batches.split(",")]
    print(describe(args.threads), flush=True)
    out = {"machine": describe(args.threads), "models": [], "digits": None}
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_digits:
            out["digits"] = digits_accuracy(folder, args.digits_epochs, args.threads)
        if not args.skip_models:
            for name, size in jobs:
                out["models"].append(bench_model(name, size, batches, args.rounds, folder, args.threads))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
