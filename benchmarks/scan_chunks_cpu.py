"""A sequence scanned in chunks with the state carried (prev_state) against one call, on the CPU.

    python benchmarks/scan_chunks_cpu.py [--sections scan,mil] [--rounds 5] [--threads 2] [--json out.json]

Sections:
  scan  selective_scan_fn ("cpu" backend, window "auto" resolved for the whole sequence, variable B / C, D, z,
        delta_bias, softplus) at the LBVim-T layer shape (8, 384, 196, 16) in chunks of 64 positions, and at
        (1, 768, 65536, 16) in chunks of 8192: forward without autograd and forward+backward, one call
        against the chunks (each from the previous chunk's last state); medians over interleaved rounds; the
        extra peak memory of each (peak RSS above the RSS with the inputs allocated, in a fresh subprocess);
        the largest difference between the outputs.
  mil   a bag of 100,000 x 1,024 features through LB-MambaMIL (MambaMIL's configuration: 2 layers, width 512,
        d_state 16, window "auto"), inference (eval, no autograd): whole bag against scan_chunk 8192 and
        2048; the extra peak memory of each (fresh subprocess), time, and the logits' largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from lbmamba.models.mil import create_mil_model
from lbmamba.ops import resolve_window, selective_scan_fn
from machine import cpu_name, interleaved, reset_peak_rss, rss_bytes

SCAN_SHAPES = {"lbvim_t_layer": ((8, 384, 196, 16), 64), "long": ((1, 768, 65536, 16), 8192)}
MIL_CHUNKS = (None, 8192, 2048)
MIL_BAG = (100_000, 1024)


def scan_inputs(batch, dim, seqlen, dstate, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "u": torch.randn(batch, dim, seqlen, generator=g),
        "delta": torch.randn(batch, dim, seqlen, generator=g) * 0.3 + 0.3,
        "A": -torch.exp(torch.randn(dim, dstate, generator=g) * 0.5),
        "B": torch.randn(batch, dstate, seqlen, generator=g),
        "C": torch.randn(batch, dstate, seqlen, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, seqlen, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.2,
    }
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def one_call(inputs, window):
    return selective_scan_fn(**inputs, delta_softplus=True, window=window)


def in_chunks(inputs, window, chunk):
    seqlen = inputs["u"].shape[-1]
    outs, state = [], None
    for s in range(0, seqlen, chunk):
        part = {k: v[..., s:s + chunk] if k in ("u", "delta", "z", "B", "C") else v for k, v in inputs.items()}
        out, state = selective_scan_fn(**part, delta_softplus=True, return_last_state=True, prev_state=state,
                                       window=window)
        outs.append(out)
    return torch.cat(outs, dim=-1)


def scan_variant(name, shape_name):
    (batch, dim, seqlen, dstate), chunk = SCAN_SHAPES[shape_name]
    window = resolve_window("auto", seqlen)
    return (lambda x: one_call(x, window)) if name == "one" else (lambda x: in_chunks(x, window, chunk))


def scan_section(rounds):
    report = {}
    for shape_name, (shape, chunk) in SCAN_SHAPES.items():
        x = scan_inputs(*shape)
        xg = scan_inputs(*shape, requires_grad=True)
        fns = {name: scan_variant(name, shape_name) for name in ("one", "chunks")}
        with torch.no_grad():
            diff = (fns["one"](x) - fns["chunks"](x)).abs().max().item()

        def fwd(fn, x=x):
            with torch.no_grad():
                fn(x)

        def fwd_bwd(fn, xg=xg):
            fn(xg).sum().backward()

        jobs = {f"{n}.fwd": (lambda fn=fn: fwd(fn)) for n, fn in fns.items()}
        jobs.update({f"{n}.fwd_bwd": (lambda fn=fn: fwd_bwd(fn)) for n, fn in fns.items()})
        n_rounds = rounds if shape[2] < 10_000 else max(1, rounds // 2)
        times = interleaved(jobs, n_rounds)
        memory = {f"{n}.{kind}": peak_memory("scan", shape_name, n, kind) for n in fns for kind in ("fwd", "fwd_bwd")}
        entry = {"shape": shape, "chunk": chunk, "window": resolve_window("auto", shape[2]), "max_abs_diff": diff,
                 "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
                 "chunks_over_one": {kind: statistics.median(c / o for c, o in zip(times[f"chunks.{kind}"],
                                                                                   times[f"one.{kind}"]))
                                     for kind in ("fwd", "fwd_bwd")},
                 "extra_peak_mib": {k: v["extra_peak_bytes"] / 2**20 for k, v in memory.items()}}
        report[shape_name] = entry
        print(f"\n## scan {shape}, window {entry['window']}, chunks of {chunk}: max |one - chunks| = {diff:.2e}")
        print("| variant | ms | chunks / one | extra peak MiB |")
        print("| --- | --- | --- | --- |")
        for kind in ("fwd", "fwd_bwd"):
            for n in ("one", "chunks"):
                key = f"{n}.{kind}"
                r = f"{entry['chunks_over_one'][kind]:.3f}" if n == "chunks" else "1"
                print(f"| {key} | {entry['ms'][key]:.1f} | {r} | {entry['extra_peak_mib'][key]:.0f} |")
    return report


def mil_model():
    torch.manual_seed(0)
    return create_mil_model("lb", in_dim=MIL_BAG[1], num_classes=2, depth=2, embed_dim=512, d_state=16).eval()


def mil_bag():
    return torch.randn(*MIL_BAG, generator=torch.Generator().manual_seed(1))


def mil_section():
    report = {}
    runs = {str(chunk): peak_memory("mil", "bag", str(chunk), "fwd") for chunk in MIL_CHUNKS}
    logits = {k: torch.tensor(v["logits"]) for k, v in runs.items()}
    print(f"\n## LB-MambaMIL, a bag of {MIL_BAG[0]:,} x {MIL_BAG[1]:,} features, inference")
    print("| scan_chunk | extra peak MiB | s | max |logits - whole-bag logits| |")
    print("| --- | --- | --- | --- |")
    for k, v in runs.items():
        diff = (logits[k] - logits["None"]).abs().max().item()
        report[k] = dict(extra_peak_mib=v["extra_peak_bytes"] / 2**20, seconds=v["seconds"], logits=v["logits"],
                         max_abs_logit_diff=diff)
        print(f"| {k} | {report[k]['extra_peak_mib']:.0f} | {v['seconds']:.1f} | {diff:.2e} |")
    return report


def peak_memory(section, shape_name, variant, kind):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--memory-child", section, shape_name, variant, kind,
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(section, shape_name, variant, kind):
    import time

    if section == "scan":
        fn = scan_variant(variant, shape_name)
        small = scan_inputs(2, 8, 40, 16, requires_grad=True)
        in_chunks(small, 4, 16).sum().backward()  # compile / load the kernels outside the measurement
        with torch.no_grad():
            in_chunks(small, 4, 16)
        inputs = scan_inputs(*SCAN_SHAPES[shape_name][0], requires_grad=kind == "fwd_bwd")
        before = reset_peak_rss()
        if kind == "fwd":
            with torch.no_grad():
                fn(inputs)
        else:
            fn(inputs).sum().backward()
        print(json.dumps({"extra_peak_bytes": rss_bytes("VmHWM") - before}))
        return
    model, bag = mil_model(), mil_bag()
    chunk = None if variant == "None" else int(variant)
    model.set_scan_chunk(chunk)
    with torch.no_grad():
        model(bag[:300])  # compile / load the kernels outside the measurement
        before = reset_peak_rss()
        start = time.perf_counter()
        logits = model(bag)
        seconds = time.perf_counter() - start
    print(json.dumps({"extra_peak_bytes": rss_bytes("VmHWM") - before, "seconds": seconds,
                      "logits": logits.tolist()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="scan,mil")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    sections = args.sections.split(",")
    report = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__}
    print(f"# {report['cpu']}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}")
    if "scan" in sections:
        report["scan"] = scan_section(args.rounds)
    if "mil" in sections:
        report["mil"] = mil_section()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
