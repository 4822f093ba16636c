"""torch.func.vmap over selective_scan_fn against a Python loop over the samples, per backend.

    PYTHONPATH=src python benchmarks/func_vmap.py [--samples 8] [--shape 1,192,196,16] [--rounds 7] [--threads 1]

Two tasks: the forward of V independent inputs (vmap(f)(u) against [f(u[v]) for v]), and per-sample
gradients of u and A (vmap(grad(loss)) against a loop of torch.func.grad). In each round every (task, way)
pair runs once; prints the median time of each and the median per-round ratio loop / vmap.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import grad, vmap

from lbmamba.ops import selective_scan_fn
from lbmamba.ops.scan import available_backends


def measure(backend, V, rounds, u, delta, A, B, C, D, z, bias):
    def f(u, delta, B, C, z, A=A):
        return selective_scan_fn(u, delta, A, B, C, D, z, bias, True, backend=backend)

    def loss(A, u, delta, B, C, z):
        return f(u, delta, B, C, z, A=A).square().sum()

    per_sample_grad = grad(loss, argnums=(0, 1))
    tasks = {
        "forward": (lambda: vmap(f)(u, delta, B, C, z),
                    lambda: [f(u[v], delta[v], B[v], C[v], z[v]) for v in range(V)]),
        "per-sample grad": (lambda: vmap(per_sample_grad, in_dims=(None, 0, 0, 0, 0, 0))(A, u, delta, B, C, z),
                            lambda: [per_sample_grad(A, u[v], delta[v], B[v], C[v], z[v]) for v in range(V)]),
    }
    for name, (with_vmap, loop) in tasks.items():
        with_vmap(), loop()  # warm up (kernel compilation, plans)
        times = {"vmap": [], "loop": []}
        for _ in range(rounds):
            for way, fn in (("vmap", with_vmap), ("loop", loop)):
                start = time.perf_counter()
                fn()
                times[way].append(time.perf_counter() - start)
        ratio = statistics.median(lo / vm for lo, vm in zip(times["loop"], times["vmap"]))
        print(f"{backend:6s} {name:16s} vmap {statistics.median(times['vmap']) * 1e3:8.2f} ms   "
              f"loop {statistics.median(times['loop']) * 1e3:8.2f} ms   loop / vmap {ratio:5.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--shape", default="1,192,196,16", help="batch,dim,L,N of one sample")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, dim, L, N = (int(x) for x in args.shape.split(","))
    V = args.samples
    u = torch.randn(V, batch, dim, L)
    delta = torch.rand(V, batch, dim, L) * 0.1
    B, C = torch.randn(V, batch, N, L), torch.randn(V, batch, N, L)
    A, D, z, bias = -torch.rand(dim, N) - 0.1, torch.randn(dim), torch.randn(V, batch, dim, L), torch.rand(dim)
    print(f"{V} samples of (batch, dim, L, N) = {(batch, dim, L, N)}, float32, {args.threads} thread(s)")

    for backend in [b for b in ("torch", "cpu") if b in available_backends("cpu")]:
        measure(backend, V, args.rounds, u, delta, A, B, C, D, z, bias)


if __name__ == "__main__":
    main()
