"""ONNX export on the CPU: LBVim-T and Vim-T (224 px) against DeiT-Tiny (224 and 512 px), random weights.

For each model: export time, wall and CPU (time.process_time), by phase (torch.export's trace, the translation to
ONNX, the optimiser, the verification in onnxruntime), file size, node count, the largest relative difference to
PyTorch; then the latency of batch 1 and batch 8 through PyTorch eager (our CPU scan kernels), onnxruntime fp32
and onnxruntime int8 (dynamic quantisation of the MatMuls), and PyTorch's own dynamic int8 (torch.ao
quantize_dynamic of the Linear layers), interleaved rounds in one process, medians, with the ratios of the
medians of per-round ratios; and where onnxruntime's fp32 time goes (one profiled batch-1 run: the share of
MatMul / Gemm / Conv against everything else, which bounds what int8 MatMuls can gain). The load average is
recorded with every row (other jobs on the machine slow everything, PyTorch's threads most).
Then the accuracy cost of int8 on the shipped default: `lbmamba train` with its defaults (a small LBVim on the
digits) trained here, exported, and scored on its held-out split (360 images) in PyTorch, onnxruntime fp32
and int8.

    python benchmarks/export.py                          # everything: all four models, batch 1 and 8, digits
    python benchmarks/export.py --models deit_tiny_patch16_224 --sizes 224 --rounds 1
    python benchmarks/export.py --skip-digits --json out.json
    python benchmarks/export.py --models lbvim_tiny_patch16_224 --skip-digits --variants   # + other int8 forms,
                                                                    # onnxruntime's basic optimisation level
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
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


def load() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def op_shares(path, batch, size, threads):
    """Where onnxruntime's time goes on one batch: per op type, share of the kernel time (profiled run)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    session.run(None, {"images": x})  # warm-up, then the profiled run
    session.run(None, {"images": x})
    with open(session.end_profiling()) as handle:
        events = json.load(handle)
    # the profile holds both runs: keep the kernels of the second
    last_run = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    if len(runs) > 1:
        last_run = [e for e in last_run if e["ts"] >= runs[-1]]
    by = collections.Counter()
    for e in last_run:
        by[e["args"]["op_name"]] += e["dur"]
    total = sum(by.values()) or 1
    dense = sum(v for op, v in by.items() if op.endswith(("MatMul", "Gemm", "MatMulInteger")) or op.startswith("Conv"))
    return {"kernel_ms": round(total / 1000, 1), "dense_share": round(dense / total, 3),
            "top": {op: round(v / total, 3) for op, v in by.most_common(8)}}


def bench_model(name, size, batches, rounds, folder, threads, variants=False):
    import timm
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    torch.manual_seed(0)
    kwargs = {"img_size": size} if size != 224 else {}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    path = os.path.join(folder, f"{name}_{size}.onnx")
    load_before = load()
    figures = export_onnx(model, path, img_size=(size, size), in_chans=3, metadata={"model": name}, threads=threads)
    qpath = os.path.join(folder, f"{name}_{size}_int8.onnx")
    row = {"model": name, "img_size": size, "export_s": figures["export_seconds"],
           "export_cpu_s": figures["export_cpu_seconds"],
           "export_phases": {k: [v["wall_s"], v["cpu_s"]] for k, v in figures["phases"].items()},
           "load_at_export": load_before, "nodes": figures["nodes"], "mb": round(figures["bytes"] / 2**20, 2),
           "rel_error": figures["max_rel_error"]}
    print(json.dumps(row), flush=True)
    start = time.process_time()
    q = quantize_dynamic(path, qpath)
    row["quantize_cpu_s"] = round(time.process_time() - start, 1)
    row["int8_mb"] = round(q["bytes"] / 2**20, 2)
    runners = {"ort_fp32": OnnxModel(path, threads), "ort_int8": OnnxModel(qpath, threads)}
    if variants:  # other int8 forms, and onnxruntime's basic graph optimisation level (default: all)
        for label, extra in (("ort_int8_per_channel", {"per_channel": True}),
                             ("ort_uint8_matmul_conv", {"weight_type": QuantType.QUInt8,
                                                        "op_types_to_quantize": ["MatMul", "Conv"]})):
            vpath = os.path.join(folder, f"{name}_{size}_{label}.onnx")
            options = dict({"weight_type": QuantType.QInt8, "op_types_to_quantize": ["MatMul"]}, **extra)
            ort_quantize_dynamic(path, vpath, **options)
            runners[label] = OnnxModel(vpath, threads)
        runners["ort_fp32_basic"] = OnnxModel(path, threads, level="basic")
    # PyTorch's dynamic int8 swaps nn.Linear modules; the Mamba mixer reads x_proj / dt_proj weights directly
    # (F.linear(x, x_proj.weight)), which a quantised Linear does not have: those two stay fp32
    spec = {n: torch.ao.quantization.default_dynamic_qconfig for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.split(".")[-1].startswith(("x_proj", "dt_proj"))}
    tq = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    row["ort_fp32_profile_b1"] = op_shares(path, 1, size, threads)
    row["ort_int8_profile_b1"] = op_shares(qpath, 1, size, threads)
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        xn = x.numpy()
        with torch.no_grad():
            want = model(x).numpy()
            row[f"torch_int8_rel_error_b{batch}"] = float(np.abs(tq(x).numpy() - want).max() / np.abs(want).max())
        for label, runner in runners.items():
            if label != "ort_fp32":
                row[f"{label}_rel_error_b{batch}"] = float(np.abs(runner(xn) - want).max() / np.abs(want).max())

        def eager(m=model, x=x):
            with torch.no_grad():
                m(x)

        def torch_int8(m=tq, x=x):
            with torch.no_grad():
                m(x)

        jobs = {"eager": eager, "torch_int8": torch_int8}
        jobs.update({label: (lambda r=runner, xn=xn: r(xn)) for label, runner in runners.items()})
        row[f"load_b{batch}"] = load()
        times = interleaved(jobs, rounds)
        for job, ts in times.items():
            row[f"{job}_ms_b{batch}"] = round(1000 * statistics.median(ts), 1)
        for job in ("eager", "ort_int8"):  # the ratios inside one run: median of per-round ratios
            row[f"ort_fp32_over_{job}_b{batch}"] = round(statistics.median(
                [a / b for a, b in zip(times["ort_fp32"], times[job])]), 3)
    print(json.dumps(row), flush=True)
    return row


def table(rows, batches):
    """The rows as a markdown table (ms per batch; ratios within the run)."""
    head = "eager / ort fp32 / ort int8 / torch int8 ms | fp32/eager | fp32/int8"
    lines = ["| model (px) | export wall / CPU s | nodes | MB fp32 / int8 | rel. error | "
             + " | ".join(f"b{b}: {head}" for b in batches)
             + " | MatMul share (ort fp32, b1) | load |",
             "|---" * (6 + 3 * len(batches)) + "|---|"]
    for r in rows:
        cells = [f"{r['model']} ({r['img_size']})", f"{r['export_s']:.0f} / {r['export_cpu_s']:.0f}", str(r["nodes"]),
                 f"{r['mb']} / {r['int8_mb']}", f"{r['rel_error']:.1e}"]
        for b in batches:
            jobs = ("eager", "ort_fp32", "ort_int8", "torch_int8")
            cells.append(" / ".join(f"{r[f'{j}_ms_b{b}']:.0f}" for j in jobs))
            cells.append(f"{r[f'ort_fp32_over_eager_b{b}']:.2f}")
            cells.append(f"{r[f'ort_fp32_over_ort_int8_b{b}']:.2f}")
        cells.append(f"{100 * r['ort_fp32_profile_b1']['dense_share']:.0f} %")
        cells.append(str(r["load_at_export"][0]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization advises pre-processing on every call
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated timm names (default: the four jobs)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes for --models")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--digits-epochs", type=int, default=0, help="epochs of the default run (0: its 15)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--variants", action="store_true",
                        help="also time per-channel int8, uint8 MatMul + Conv, and onnxruntime's basic level")
    parser.add_argument("--json", default=None)
    parser.add_argument("--result", default=None,
                        help="also write everything to this result file (for benchmarks/report.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    jobs = JOBS
    if args.models:
        sizes = [int(s) for s in (args.sizes or "224").split(",")]
        jobs = [(m, s) for m in args.models.split(",") for s in sizes]
    batches = [int(b) for b in args.batches.split(",")]
    print(describe(args.threads), flush=True)
    out = {"machine": describe(args.threads), "load_at_start": load(), "models": [], "digits": None}
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_digits:
            out["digits"] = digits_accuracy(folder, args.digits_epochs, args.threads)
        if not args.skip_models:
            for name, size in jobs:
                out["models"].append(bench_model(name, size, batches, args.rounds, folder, args.threads,
                                                 args.variants))
    if out["models"]:
        print(table(out["models"], batches), flush=True)
    out["load_at_end"] = load()
    print(json.dumps({"load_at_start": out["load_at_start"], "load_at_end": out["load_at_end"]}), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)
    if args.result:
        from machine import write_result

        write_result(args.result, "benchmarks/export.py", sys.argv[1:] if argv is None else argv, out)


if __name__ == "__main__":
    main()
