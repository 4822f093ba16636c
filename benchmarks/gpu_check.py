"""Check and benchmark the Triton scan backend on a CUDA GPU, in one process.

    PYTHONPATH=src python benchmarks/gpu_check.py [--out PATH]
    PYTHONPATH=src python benchmarks/gpu_check.py --dry-run    # CPU, Triton interpreter, tiny shapes

1. Checks the triton and torch backends against the float64 reference (run on the same device) at
   realistic shapes: outputs and every gradient, fp32 / bf16 / fp16, fresh random inputs, with the
   triton outputs allocated full of NaN so that an element the kernels forget to write shows.
2. Times forward and forward+backward (median of triton.testing.do_bench) of the triton LB scan
   (window "auto"), the triton window-1 scan (vanilla Mamba), a triton bidirectional scan (two
   window-1 scans, one on the flipped sequence), the torch backend where it fits in memory, and the
   sequential reference at the smallest shape; inputs as in a Mamba layer (variable B/C, D, z,
   delta_bias, softplus).
3. Measures the device-to-device copy bandwidth and reports each forward's achieved bandwidth
   (inputs read once + outputs written once) as a fraction of it.
4. Times lbvim / uvim / vim tiny (the paper's protocol: 224 px, batch 128; inference and training step,
   fp32 and bf16 autocast) with the peak memory of a training step, and the UperNet segmentors on
   LBVim-T and Vim-T (LBMamba's head, 512 px, batch 8; inference and training step, fp32 and bf16).
   The dry run builds the same code path at toy sizes on the CPU.
5. Prints a table and PASS / FAIL per target, and writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"
    parser.add_argument("--out", default=default_out, help=f"JSON results path (default: {default_out})")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every section on the CPU under TRITON_INTERPRET=1 with tiny shapes (finds bugs, measures nothing)",
    )
    parser.add_argument("--skip-models", action="store_true", help="skip the model timings (section 4)")
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.dry_run:
    # Must precede the first import of triton: kernels pick the interpreter when they are decorated.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from lbmamba.ops import (  # noqa: E402
    resolve_window,
    selective_scan_fn,
    selective_scan_ref,
    triton_scan,
)

DEVICE = "cpu" if ARGS.dry_run else "cuda"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

if ARGS.dry_run:
    # Tiny problems, a short chunk so that they still cross chunks.
    triton_scan.CHUNK_LEN = 8
    CHECKS = [
        dict(batch=1, dim=4, seqlen=21, dstate=4, dtype=torch.float32, window="auto", B="variable", C="variable"),
        dict(batch=1, dim=4, seqlen=13, dstate=4, dtype=torch.bfloat16, window=1, B="grouped", C="constant"),
        dict(batch=1, dim=2, seqlen=19, dstate=4, dtype=torch.float16, window=11, B="variable", C="grouped"),
    ]
    BENCH_SHAPES = [(1, 4, 19, 4)]
    REFERENCE_SHAPE = TORCH_RATIO_SHAPE = (1, 4, 19, 4)
    COPY_ELEMENTS = 1 << 16
    # the models' code path at toy sizes: (batch, image side, model kwargs) and the segmentors' likewise
    MODEL_SETUP = (2, 32, dict(depth=2))
    SEGMENTOR_SETUP = (2, 64, dict(head_channels=32, aux_channels=16, backbone_kwargs=dict(depth=4)))
else:
    CHECKS = [
        dict(batch=2, dim=64, seqlen=196, dstate=16, dtype=torch.float32, window="auto", B="variable", C="variable"),
        dict(batch=2, dim=128, seqlen=1024, dstate=16, dtype=torch.float32, window=1, B="grouped", C="constant"),
        dict(batch=2, dim=384, seqlen=2049, dstate=16, dtype=torch.float32, window="auto", B="variable", C="variable"),
        dict(batch=2, dim=64, seqlen=1024, dstate=16, dtype=torch.float32, window=40, B="variable", C="grouped"),
        dict(batch=2, dim=64, seqlen=196, dstate=64, dtype=torch.float32, window=3, B="constant", C="variable"),
        dict(batch=2, dim=192, seqlen=196, dstate=16, dtype=torch.bfloat16, window="auto", B="variable", C="variable"),
        dict(batch=2, dim=192, seqlen=1024, dstate=16, dtype=torch.float16, window=5, B="variable", C="variable"),
        dict(batch=2, dim=384, seqlen=2049, dstate=16, dtype=torch.bfloat16, window="auto", B="grouped", C="grouped"),
    ]
    BENCH_SHAPES = [(8, 384, 196, 16), (128, 384, 196, 16), (8, 384, 1024, 16), (2, 1536, 8192, 16)]
    REFERENCE_SHAPE = (8, 384, 196, 16)
    TORCH_RATIO_SHAPE = (128, 384, 196, 16)
    COPY_ELEMENTS = 1 << 28  # 1 GiB of fp32
    MODEL_SETUP = (128, 224, {})  # the paper's protocol
    SEGMENTOR_SETUP = (8, 512, {})  # LBMamba's UperNet (no neck, 512 channels), ADE20K's crop
LONG_SHAPE = BENCH_SHAPES[-1]
TARGETS = dict(lb_over_w1_max=1.10, long_forward_min_copy_fraction=0.50, fwd_bwd_speedup_over_torch_min=30.0,
               model_inference_speedup_over_vim_min=1.5, segmentor_inference_speedup_over_vim_min=1.4)
MODEL_NAMES = ("lbvim_tiny_patch16_224", "uvim_tiny_patch16_224", "vim_tiny_patch16_224")
#: LBVim-T, then Vim-T: the pair the speed targets compare (classifiers and segmentors)
TARGET_PAIR = ("lbvim_tiny_patch16_224", "vim_tiny_patch16_224")


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def mamba_inputs(batch, dim, seqlen, dstate, dtype, B="variable", C="variable", groups=2, seed=None):
    """Random scan inputs shaped and scaled as in a Mamba layer (A = -(1..N), D = 1, delta_bias
    initialised as Mamba's dt_proj bias: softplus(delta_bias) log-uniform in [1e-3, 0.1])."""
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=DEVICE) * scale

    def bc(form):
        if form == "constant":
            return randn(dim, dstate)
        if form == "variable":
            return randn(batch, dstate, seqlen).to(dtype)
        return randn(batch, groups, dstate, seqlen).to(dtype)

    dt = torch.exp(torch.rand(dim, generator=gen, device=DEVICE) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        u=randn(batch, dim, seqlen).to(dtype),
        delta=randn(batch, dim, seqlen, scale=0.5).to(dtype),
        A=-torch.arange(1, dstate + 1, device=DEVICE, dtype=torch.float32).repeat(dim, 1),
        B=bc(B),
        C=bc(C),
        D=torch.ones(dim, device=DEVICE),
        z=randn(batch, dim, seqlen).to(dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    )


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan(inputs, backend, window, **kwargs):
    args = [inputs[k] for k in ORDER]
    if backend == "reference":
        return selective_scan_ref(*args, delta_softplus=True, window=window, **kwargs)
    return selective_scan_fn(*args, delta_softplus=True, window=window, backend=backend, **kwargs)


def bidirectional(inputs, backend, window):
    """Vim's bidirectional scan: one scan on the sequence, one on the flipped sequence, flipped back."""
    along_sequence = {k for k, v in inputs.items() if k in ("u", "delta", "z") or (k in ("B", "C") and v.dim() > 2)}
    flipped = {k: v.flip(-1) if k in along_sequence else v for k, v in inputs.items()}
    return scan(inputs, backend, window) + scan(flipped, backend, window).flip(-1)


# ----------------------------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------------------------


def rel_error(value, expected):
    value, expected = value.double(), expected.double()
    return ((value - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check_case(case):
    seed = int.from_bytes(os.urandom(4), "little")
    dtype = case["dtype"]
    shape = (case["batch"], case["dim"], case["seqlen"], case["dstate"])
    inputs = mamba_inputs(*shape, dtype, case["B"], case["C"], seed=seed)
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(seed + 1)
    # Output gradients exactly representable in the input dtype, so all backends receive the same.
    g_out = torch.randn(inputs["u"].shape, generator=gen, device=DEVICE).to(dtype)
    g_last = torch.randn(case["batch"], case["dim"], case["dstate"], generator=gen, device=DEVICE)

    def run(backend, cast):
        leaves = {k: cast(v).detach().requires_grad_(True) for k, v in inputs.items()}
        out, last = scan(leaves, backend, case["window"], return_last_state=True)
        loss = (out.double() * g_out.double()).sum() + (last.double() * g_last.double()).sum()
        loss.backward()
        return {"out": out, "last_state": last, **{"d" + k: leaves[k].grad for k in ORDER}}

    expected = run("reference", lambda t: t.double())
    result = dict(case, dtype=str(dtype).replace("torch.", ""), seed=seed, backends={})
    triton_scan.POISON_OUTPUTS = True  # any element the kernels do not write stays NaN
    try:
        for backend in ("triton", "torch"):
            got = run(backend, lambda t: t)
            errors = {k: rel_error(got[k], expected[k]) for k in expected}
            finite = all(bool(torch.isfinite(got[k]).all()) for k in got)
            dtypes_ok = all(got["d" + k].dtype == inputs[k].dtype for k in ORDER)
            ok = finite and dtypes_ok and all(e < TOLERANCE[dtype] for e in errors.values())
            result["backends"][backend] = dict(
                ok=ok, finite=finite, grad_dtypes_ok=dtypes_ok, max_error=max(errors.values()), errors=errors
            )
    finally:
        triton_scan.POISON_OUTPUTS = False
    return result


def run_checks():
    results = []
    for case in CHECKS:
        try:
            res = check_case(case)
        except Exception as exc:  # report and go on: one broken case must not hide the others
            error = f"{type(exc).__name__}: {exc}"
            res = dict(case, dtype=str(case["dtype"]), error=error, traceback=traceback.format_exc())
            log(res["traceback"])
        results.append(res)
        shape = (case["batch"], case["dim"], case["seqlen"], case["dstate"])
        if "error" in res:
            log(f"check {shape} {res['dtype']} window={case['window']}: ERROR {res['error']}")
            continue
        for backend, r in res["backends"].items():
            log(
                f"check {backend:6s} {shape} {res['dtype']:8s} window={case['window']!s:4s} "
                f"B={case['B']:8s} C={case['C']:8s} "
                f"max rel err {r['max_error']:.2e} {'ok' if r['ok'] else 'FAILED'} (seed {res['seed']})"
            )
    return results


# ----------------------------------------------------------------------------------------------
# 2./3. Timing and bandwidth
# ----------------------------------------------------------------------------------------------


def bench(fn):
    """Median milliseconds of fn()."""
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    start = time.perf_counter()  # the interpreter: one run proves the code path; the time means nothing
    fn()
    return (time.perf_counter() - start) * 1e3


def forward_and_backward(make_out, inputs):
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    grad = torch.randn_like(inputs["u"])

    def forward():
        with torch.no_grad():
            make_out(inputs)

    def forward_backward():
        out = make_out(leaves)
        torch.autograd.grad(out, list(leaves.values()), grad)

    return forward, forward_backward


def torch_backend_fits(batch, dim, seqlen, dstate):
    """Whether the torch backend's (batch, dim, L, N) tensors (kept for its backward) fit in memory."""
    if DEVICE != "cuda":
        return True
    per_tensor = batch * dim * seqlen * dstate * 4
    needed = per_tensor * (8 + 6 * math.ceil(math.log2(seqlen)))  # scan levels saved for autograd
    return needed < 0.8 * torch.cuda.mem_get_info()[0]


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(COPY_ELEMENTS, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def forward_bytes(inputs, window):
    """Bytes a forward must move at least: each input read once, each output written once."""
    u = inputs["u"]
    batch, dim, seqlen = u.shape
    dstate = inputs["A"].shape[1]
    read = sum(t.numel() * t.element_size() for t in inputs.values())
    checkpoints = batch * dim * triton_scan.num_checkpoints(seqlen, window) * dstate * 4
    written = u.numel() * u.element_size() + batch * dim * dstate * 4 + checkpoints
    return read + written


@contextlib.contextmanager
def checkpoint_every(every):
    """Run the triton backend with CHECKPOINT_EVERY = every (forward and backward alike)."""
    default = triton_scan.CHECKPOINT_EVERY
    triton_scan.CHECKPOINT_EVERY = every
    try:
        yield
    finally:
        triton_scan.CHECKPOINT_EVERY = default


def run_timings(bandwidth):
    results = []
    for shape in BENCH_SHAPES:
        batch, dim, seqlen, dstate = shape
        inputs = mamba_inputs(*shape, torch.float32)
        variants = {
            "triton_lb": lambda t: scan(t, "triton", "auto"),
            # The same with a checkpoint per chunk (below): what recomputing between checkpoints costs.
            "triton_lb_ckpt1": lambda t: scan(t, "triton", "auto"),
            "triton_w1": lambda t: scan(t, "triton", 1),
            "triton_bi": lambda t: bidirectional(t, "triton", 1),
        }
        if torch_backend_fits(*shape):
            variants["torch_lb"] = lambda t: scan(t, "torch", "auto")
        if shape == REFERENCE_SHAPE:
            variants["reference_lb"] = lambda t: scan(t, "reference", "auto")
        row = dict(shape=list(shape), dtype="float32", ms={})
        for name, make_out in variants.items():
            fwd, fwd_bwd = forward_and_backward(make_out, inputs)
            every = 1 if name == "triton_lb_ckpt1" else triton_scan.CHECKPOINT_EVERY
            try:
                with checkpoint_every(every):
                    row["ms"][name] = dict(fwd=bench(fwd), fwd_bwd=bench(fwd_bwd))
            except torch.cuda.OutOfMemoryError:
                row["ms"][name] = dict(skipped="out of memory")
            except Exception as exc:  # recorded; the remaining variants and sections still run
                row["ms"][name] = dict(error=f"{type(exc).__name__}: {exc}")
                log(traceback.format_exc())
            finally:
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            log(f"time {shape} {name:15s} {row['ms'][name]}")
        row["forward_bandwidth"] = {}
        for name, window in (("triton_lb", "auto"), ("triton_w1", 1)):
            if "fwd" in row["ms"][name]:
                moved = forward_bytes(inputs, resolve_window(window, seqlen))
                achieved = moved / (row["ms"][name]["fwd"] * 1e-3)
                fraction = achieved / bandwidth
                row["forward_bandwidth"][name] = dict(bytes=moved, bytes_per_s=achieved, copy_fraction=fraction)
        results.append(row)
    return results


# ----------------------------------------------------------------------------------------------
# 4. Models
# ----------------------------------------------------------------------------------------------


def peak_memory_mb(fn):
    """Peak GPU memory allocated while fn() runs, in MiB (None on the CPU)."""
    if DEVICE != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def time_model(model, batch, forward_loss, images):
    """Inference and training-step timings of `model` in fp32 and under bf16 autocast: forward_loss(model)
    returns the training loss. Each precision's entry holds its error instead when it failed."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    results = {}
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")

        def forward(autocast=autocast):
            with torch.no_grad(), autocast:
                model(images)

        def train_step(autocast=autocast):
            with autocast:
                loss = forward_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        try:
            model.eval()
            fwd = bench(forward)
            model.train()
            step = bench(train_step)
            results[precision] = dict(
                forward_ms=fwd, train_step_ms=step, images_per_s_inference=batch / (fwd * 1e-3),
                images_per_s_train=batch / (step * 1e-3), peak_train_mb=peak_memory_mb(train_step))
        except Exception as exc:
            results[precision] = dict(skipped=f"{type(exc).__name__}: {exc}")
        log(f"  {precision}: {results[precision]}")
    return results


def run_models():
    """LBVim-T, uVim-T and Vim-T classifiers, then the UperNet segmentors on LBVim-T and Vim-T."""
    if ARGS.skip_models:
        log("models: skipped (--skip-models)")
        return {"skipped": "--skip-models"}
    try:
        import timm

        from lbmamba.models import build_segmentor
    except Exception as exc:
        log(f"models: skipped ({type(exc).__name__}: {exc})")
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    results = {"classifiers": {}, "segmentors": {}}
    batch, side, kwargs = MODEL_SETUP
    images = torch.randn(batch, 3, side, side, device=DEVICE)
    labels = torch.randint(0, 1000, (batch,), device=DEVICE)
    for name in MODEL_NAMES:
        log(f"model {name} ({batch} x {side} px)")
        model = timm.create_model(name, img_size=side, **kwargs).to(DEVICE)
        results["classifiers"][name] = time_model(
            model, batch, lambda m: torch.nn.functional.cross_entropy(m(images), labels), images)
        del model
        torch.cuda.empty_cache()  # a no-op without CUDA
    batch, side, kwargs = SEGMENTOR_SETUP
    images = torch.randn(batch, 3, side, side, device=DEVICE)
    masks = torch.randint(0, 150, (batch, side, side), device=DEVICE)
    for name in TARGET_PAIR:
        log(f"segmentor UperNet on {name} ({batch} x {side} px)")
        model = build_segmentor(name, 150, img_size=side, **kwargs).to(DEVICE)
        results["segmentors"][name] = time_model(model, batch, lambda m: m.losses(images, masks)["loss"], images)
        del model
        torch.cuda.empty_cache()  # a no-op without CUDA
    return results


# ----------------------------------------------------------------------------------------------
# 5. Targets, table, JSON
# ----------------------------------------------------------------------------------------------


def _ms(row, name, mode):
    return row["ms"].get(name, {}).get(mode)


def evaluate_targets(timings, models):
    """PASS / FAIL per target; a number that could not be measured fails its target."""

    def target(name, value, limit, ok):
        return dict(name=name, value=value, limit=limit, ok=value is not None and ok(value))

    targets = []
    bound = TARGETS["lb_over_w1_max"]
    for row in timings:
        for mode in ("fwd", "fwd_bwd"):
            lb, w1 = _ms(row, "triton_lb", mode), _ms(row, "triton_w1", mode)
            ratio = lb / w1 if lb is not None and w1 is not None else None
            name = f"LB / window-1 {mode} at {tuple(row['shape'])}"
            targets.append(target(name, ratio, f"<= {bound}", lambda v: v <= bound))
    long_row = next(r for r in timings if tuple(r["shape"]) == LONG_SHAPE)
    fraction = long_row["forward_bandwidth"].get("triton_lb", {}).get("copy_fraction")
    floor = TARGETS["long_forward_min_copy_fraction"]
    name = f"LB forward bandwidth / copy bandwidth at {LONG_SHAPE}"
    targets.append(target(name, fraction, f">= {floor}", lambda v: v >= floor))
    torch_row = next(r for r in timings if tuple(r["shape"]) == TORCH_RATIO_SHAPE)
    torch_ms, triton_ms = _ms(torch_row, "torch_lb", "fwd_bwd"), _ms(torch_row, "triton_lb", "fwd_bwd")
    speedup = torch_ms / triton_ms if torch_ms is not None and triton_ms is not None else None
    floor = TARGETS["fwd_bwd_speedup_over_torch_min"]
    name = f"LB fwd+bwd speed-up over the torch backend at {TORCH_RATIO_SHAPE}"
    targets.append(target(name, speedup, f">= {floor}", lambda v: v >= floor))
    if "skipped" in models:
        return targets
    for kind, floor in (("classifiers", TARGETS["model_inference_speedup_over_vim_min"]),
                        ("segmentors", TARGETS["segmentor_inference_speedup_over_vim_min"])):
        for precision in ("fp32", "bf16"):
            lb, vim = (models[kind].get(n, {}).get(precision, {}).get("forward_ms") for n in TARGET_PAIR)
            speedup = vim / lb if lb is not None and vim is not None else None
            name = f"LBVim-T / Vim-T {kind[:-1]} inference speed, {precision}"
            targets.append(target(name, speedup, f">= {floor}", lambda v, floor=floor: v >= floor))
    return targets


def print_table(checks, timings, bandwidth, models, targets):
    log("\n== correctness (max relative error over outputs and gradients) ==")
    for res in checks:
        shape = (res["batch"], res["dim"], res["seqlen"], res["dstate"])
        if "error" in res:
            log(f"  {shape} {res['dtype']}: ERROR {res['error']}")
            continue
        cells = "  ".join(f"{b} {r['max_error']:.1e} {'ok' if r['ok'] else 'FAIL'}" for b, r in res["backends"].items())
        log(f"  {str(shape):22s} {res['dtype']:8s} window={res['window']!s:4s} {cells}")
    log(f"\n== timings, ms (median; fp32; copy bandwidth {bandwidth / 1e9:.0f} GB/s) ==")
    names = ("triton_lb", "triton_lb_ckpt1", "triton_w1", "triton_bi", "torch_lb", "reference_lb")
    log(f"  {'shape':22s} {'mode':7s} " + " ".join(f"{n:>15s}" for n in names) + f" {'LB/W1':>6s} {'LB fwd BW':>9s}")
    for row in timings:
        for mode in ("fwd", "fwd_bwd"):
            cells = [f"{v:15.3f}" if v is not None else f"{'-':>15s}" for v in (_ms(row, n, mode) for n in names)]
            lb, w1 = _ms(row, "triton_lb", mode), _ms(row, "triton_w1", mode)
            ratio = f"{lb / w1:6.2f}" if lb is not None and w1 is not None else f"{'-':>6s}"
            fraction = row["forward_bandwidth"].get("triton_lb", {}).get("copy_fraction")
            bw = f"{fraction:9.0%}" if mode == "fwd" and fraction is not None else f"{'':9s}"
            log(f"  {str(tuple(row['shape'])):22s} {mode:7s} " + " ".join(cells) + f" {ratio} {bw}")
    if "skipped" not in models:
        for kind, (batch, side, _) in (("classifiers", MODEL_SETUP), ("segmentors", SEGMENTOR_SETUP)):
            log(f"\n== {kind} (batch {batch}, {side} px): ms, images/s, peak MiB of a training step ==")
            for name, per_precision in models[kind].items():
                for precision, r in per_precision.items():
                    if "skipped" in r:
                        log(f"  {name:26s} {precision}  skipped: {r['skipped']}")
                        continue
                    peak = "-" if r["peak_train_mb"] is None else f"{r['peak_train_mb']:.0f}"
                    log(f"  {name:26s} {precision}  inference {r['forward_ms']:8.1f} ms "
                        f"({r['images_per_s_inference']:7.1f}/s)  train step {r['train_step_ms']:8.1f} ms "
                        f"({r['images_per_s_train']:7.1f}/s)  peak {peak}")
    log("\n== targets ==")
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        log(f"  {'PASS' if t['ok'] else 'FAIL'}  {t['name']}: {value} (target {t['limit']})")


def main():
    started = time.time()
    env = dict(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter, dry run)",
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        chunk_len=triton_scan.CHUNK_LEN,
        dry_run=ARGS.dry_run,
    )
    log(f"gpu_check on {env['device']}")
    checks = run_checks()
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    timings = run_timings(bandwidth)
    models = run_models()
    targets = evaluate_targets(timings, models)
    print_table(checks, timings, bandwidth, models, targets)
    checks_ok = all("error" not in c and all(r["ok"] for r in c["backends"].values()) for c in checks)
    log(f"\ncorrectness checks: {'PASS' if checks_ok else 'FAIL'}; {time.time() - started:.0f} s")
    report = dict(
        environment=env,
        checks=checks,
        checks_ok=checks_ok,
        copy_bandwidth_bytes_per_s=bandwidth,
        timings=timings,
        models=models,
        targets=targets,
        seconds=time.time() - started,
    )
    os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
    with open(ARGS.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"wrote {ARGS.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
