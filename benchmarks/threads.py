"""The thread rule, measured: each command with 1 thread, 2 threads and the default (`threads: null`),
on an idle machine and beside one other CPU-bound process.

    python benchmarks/threads.py [--repeats 3] [--json out.json]

Commands (each run is its own process, as users start them; the figures are the commands' own):
  train  the digits demo, 2 epochs: wall seconds
  eval   the digits demo's checkpoint: images/s
  mil    `lbmamba mil train`, one fold of the digit-bags demo, 4 epochs: wall seconds
  bench  `lbmamba bench` on LBVim-T, 224 px, batch 8: training images/s
Runs alternate between the thread settings; medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from machine import busy, describe

SETTINGS = ("1", "2", "default")


def lbmamba(*args: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lbmamba", *args, "--no-progress"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"lbmamba {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.setdefault("wall_s", time.perf_counter() - start)
    return result


def commands(work: str, checkpoint: str, tag: str):
    return {
        "train s": lambda t: lbmamba("train", "--epochs", "2", "--output", os.path.join(work, f"train-{tag}"), *t)[
            "wall_s"],
        "eval images/s": lambda t: lbmamba("eval", "--checkpoint", checkpoint, *t)["images_per_s"],
        "mil s": lambda t: lbmamba("mil", "train", "--fold-indices", "0", "--epochs", "4", "--stop-epoch", "4",
                                   "--output", os.path.join(work, f"mil-{tag}"), *t)["wall_s"],
        "bench train images/s": lambda t: lbmamba(
            "bench", "--models", "lbvim_tiny_patch16_224", "--iters", "3", "--warmup", "1",
            "--output", os.path.join(work, f"bench-{tag}"), *t)["results"][0]["train_img_per_s"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="lbmamba-threads-")
    checkpoint = lbmamba("train", "--epochs", "2", "--output", os.path.join(work, "digits"))["checkpoint"]
    results = {}
    for condition in ("idle", "busy"):
        with busy(condition == "busy"):
            for r in range(args.repeats):
                for setting in SETTINGS:
                    flags = () if setting == "default" else ("--threads", setting)
                    for name, run in commands(work, checkpoint, f"{condition}-{r}-{setting}").items():
                        results.setdefault(f"{condition}|{name}|{setting}", []).append(run(flags))
                        print(condition, r, setting, name, results[f"{condition}|{name}|{setting}"][-1],
                              file=sys.stderr, flush=True)
    print(f"\n{describe(2)}; medians of {args.repeats}\n")
    print("| machine | command | " + " | ".join(f"threads {s}" for s in SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    for condition in ("idle", "busy"):
        for name in commands(work, checkpoint, "x"):
            cells = [statistics.median(results[f"{condition}|{name}|{s}"]) for s in SETTINGS]
            print(f"| {condition} | {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
