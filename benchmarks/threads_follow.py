"""The thread rule during a run: a training run started on an idle machine, a CPU-bound process started
mid-run and stopped later; step times before, during and after, with the rule that follows the machine
(`threads: null`) and with the count fixed at start (what `threads: null` did before: the idle cores at
start, i.e. all of them).

    python benchmarks/threads_follow.py [--steps 10,16,10] [--repeats 2] [--json out.json]

The steps are LBVim-T training steps (the LB scan on the cpu backend, AdamW) on random 224 px images, in this
process; after each step the rule looks at the machine as `lbmamba`'s training loop does (its own code:
`lbmamba.engine.device.ThreadFollower`). Reported per phase: the median step time and its ratio to the idle
phase's. Targets: busy / idle <= 2.2, after / idle <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import lbmamba  # noqa: F401  (registers the models)
from lbmamba.engine.device import ThreadFollower, usable_cores
from machine import busy, describe


def run(follow: bool, steps, batch: int, model_name: str):
    torch.manual_seed(0)
    cores = usable_cores()
    torch.set_num_threads(cores)  # the run starts on the idle machine: every core
    model = timm.create_model(model_name, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    rule = ThreadFollower(cores) if follow else None

    def step():
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rule is not None:
            rule.after_step()
        return time.perf_counter() - start

    step()  # warm-up: kernels, allocator
    phases = {}
    for name, count, loaded in zip(("idle", "busy", "after"), steps, (False, True, False)):
        with busy(loaded):
            times = [step() for _ in range(count)]
        phases[name] = {"steps_s": [round(t, 3) for t in times], "threads_end": torch.get_num_threads()}
    return phases, (rule.decisions if rule else [])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,16,10", help="steps idle, beside the other process, after it")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", default="lbvim_tiny_patch16_224")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    results = {"machine": describe(usable_cores()), "model": args.model, "batch": args.batch, "steps": steps,
               "runs": []}
    for r in range(args.repeats):
        for follow in ((True, False) if r % 2 == 0 else (False, True)):  # alternate which goes first
            phases, decisions = run(follow, steps, args.batch, args.model)
            results["runs"].append({"rule": "follows" if follow else "fixed at start", "phases": phases,
                                    "decisions": decisions})
    print(f"# {results['machine']}; {args.model}, batch {args.batch}, steps {steps}\n")
    print("| rule | idle s/step | busy s/step | after s/step | busy / idle | after / idle | threads at end of phases |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for rule in ("follows", "fixed at start"):
        runs = [x["phases"] for x in results["runs"] if x["rule"] == rule]
        # the rule reacts within a few steps: a phase's figure is the median of its second half
        med = {p: statistics.median(t for ph in runs for t in ph[p]["steps_s"][len(ph[p]["steps_s"]) // 2:])
               for p in ("idle", "busy", "after")}
        ratios = {"busy/idle": med["busy"] / med["idle"], "after/idle": med["after"] / med["idle"]}
        summary[rule] = {**{f"{p}_s": round(v, 3) for p, v in med.items()},
                         **{k: round(v, 2) for k, v in ratios.items()}}
        threads = "/".join(str(runs[0][p]["threads_end"]) for p in ("idle", "busy", "after"))
        print(f"| {rule} | {med['idle']:.3f} | {med['busy']:.3f} | {med['after']:.3f} | {ratios['busy/idle']:.2f} | "
              f"{ratios['after/idle']:.2f} | {threads} |")
    results["summary"] = summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
