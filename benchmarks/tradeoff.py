"""Does LB help? Accuracy against CPU throughput for LBVim, uVim, Vim and LBVim's windows, on two
generated tasks that need context across the whole image, with mean ± std over seeds.

    python benchmarks/tradeoff.py                          # both tasks, 7 models, 3 seeds (see the estimate below)
    python benchmarks/tradeoff.py --models lbvim uvim vim --seeds 0 1 2 3 4
    python benchmarks/tradeoff.py --tasks pairs --epochs 8 --threads 2
    python benchmarks/tradeoff.py --quick                  # tiny setting: checks that it runs (< 1 min)
    python benchmarks/tradeoff.py --json out.json --figure fig.png --out runs/

Tasks (generated from a seed with numpy only, no downloads; train / val / test splits come from
disjoint seeds of one generator):

* ``pairs`` (digit pairs): a 32 x 64 canvas, two scikit-learn digits (8 x 8, upscaled to 16 x 16), one
  at a random offset in the left half and one in the right half; label 1 when the two digits are the same
  class, 0 otherwise (balanced by construction: half the images draw a matching pair). Why global
  context: either digit alone says nothing about the label (its marginal is 50/50 for every digit), so a
  model must carry what it saw in one half across at least half the image to the other. Same / different
  rather than the sum mod 10: binary with chance at 50 % and a balanced label by construction, and it
  tests the long-range comparison rather than ten-way recognition of two digits (which a small model on a
  few thousand images learns slowly).
* ``pathfinder`` (pathfinder-lite): a 32 x 32 image with two curvy dashed paths (random walks with
  momentum, reflected at the borders) and two marked endpoints (3 x 3 squares); label 1 when both marks
  sit on the two ends of the same path, 0 when they sit on ends of different paths (half each, by
  construction; the pixel statistics of the two classes are the same). Why global context: the marks lie
  far apart along a path that winds through the whole image, and whether they are joined is a property
  of the whole path, not of any patch near either mark. Paths may cross (as in Pathfinder): the label
  is "same path", as generated.

Models (matched width and depth: ``--embed-dim`` 64, ``--depth`` 4 by default; patches of 8 px on
pairs (4 x 8 = 32 tokens, 16 per half) and 4 px on pathfinder (8 x 8 = 64 tokens: a 1-px path needs
small patches), or ``--patch`` for both; one input channel, mean pooling for the LB / u models):
``lbvim`` (LB scan, window "auto", flips every layer), ``uvim`` (window 1: a plain forward scan,
flips), ``vim`` (bidirectional: two scans per layer, middle class token), ``lbvim_w2`` / ``lbvim_w4`` /
``lbvim_w8`` / ``lbvim_w16`` (LB scan, fixed window). Select with ``--models``.

Training per (task, model, seed): AdamW (lr 1e-3, weight decay 0.05), cosine schedule per step with a
linear warm-up over the first 5 % of the steps, batch 64, ``--epochs`` epochs, cross-entropy; the
seed sets the model's initialisation and the batch order (the data are the same for every seed).
Reported: test accuracy (and val accuracy) after the last epoch, parameters.

Resume: every finished (task, model, seed) run is saved at once in ``--out``/runs-<config hash>.json
(written to a temporary file, then os.replace); a rerun with the same settings loads finished runs
instead of training them again (the log says "loaded"). Another setting (epochs, sizes, width...) gets
another file.

Throughput: after training, every selected (task, model) is built once more and its inference (eval,
torch.inference_mode, batch 64) and training step (forward, cross-entropy, backward, AdamW step) are
timed in ONE interleaved run (benchmarks/machine.py's `interleaved`: a fresh order per round after an
untimed warm-up round); images/s are medians over ``--rounds`` rounds. Throughput is measured on every
run (not resumed): it is the machine's, now.

Output: a markdown table per task (model, params, accuracy mean ± std over seeds, train and infer
images/s), a figure ``--figure`` (accuracy with std error bars against inference images/s, one panel
per task, Pareto front drawn: models that no other model beats on both axes), and, as the last line on
stdout, one JSON line with every number (also written to ``--json`` when given).

Cost of the default run on a 2-core CPU: 2 tasks x 7 models x 3 seeds = 42 runs of 3 epochs over 2,000
images (6,000 training images per run). Measured on a shared 2-core EPYC: a pairs run of LBVim trained
at 27 images/s end to end under load (the timed training step alone: 20-240 images/s, depending on the
other jobs on the machine); pathfinder (64 tokens) is about 2x slower per image, Vim about 0.6x. So
roughly 1-4 minutes per pairs run and 2-8 per pathfinder run: some 2-5 hours in all. It is resumable,
so it can be run in pieces (``--tasks pairs`` first, or ``--models lbvim uvim vim`` first). Check that
the tasks are learnt at this budget before trusting a comparison: a model at chance (50 %) on a task
says nothing about LB; raise ``--n-train`` / ``--epochs`` until the best model is clearly above it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import timm

import lbmamba  # noqa: F401  (registers the models)
from machine import describe, interleaved

#: model name -> (timm name, extra kwargs)
MODELS = {
    "lbvim": ("lbvim_tiny_patch16_224", {"window": "auto"}),
    "uvim": ("uvim_tiny_patch16_224", {}),
    "vim": ("vim_tiny_patch16_224", {}),
    "lbvim_w2": ("lbvim_tiny_patch16_224", {"window": 2}),
    "lbvim_w4": ("lbvim_tiny_patch16_224", {"window": 4}),
    "lbvim_w8": ("lbvim_tiny_patch16_224", {"window": 8}),
    "lbvim_w16": ("lbvim_tiny_patch16_224", {"window": 16}),
}
TASKS = ("pairs", "pathfinder")
#: split -> offset added to the data seed (disjoint streams)
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_029}

_DIGITS = None


def _digits():
    """scikit-learn's 1,797 digits as (images (n, 16, 16) float32 in [0, 1], labels), upscaled x2."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        imgs = (x.reshape(-1, 8, 8) / 16.0).astype(np.float32)
        _DIGITS = (imgs.repeat(2, axis=1).repeat(2, axis=2), y.astype(np.int64))
    return _DIGITS


def make_pairs(n: int, seed: int):
    """(images (n, 1, 32, 64) float32, labels (n,) int64): two digits far apart, label = same class."""
    rng = np.random.default_rng([seed, 1])  # the task's own stream: labels differ from pathfinder's
    imgs, labels = _digits()
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    out = np.zeros((n, 1, 32, 64), np.float32)
    y = (rng.random(n) < 0.5).astype(np.int64)
    for i in range(n):
        a = int(rng.integers(10))
        b = a if y[i] else int((a + rng.integers(1, 10)) % 10)
        for cls, x0 in ((a, 0), (b, 32)):
            img = imgs[by_class[cls][rng.integers(len(by_class[cls]))]]
            dy, dx = rng.integers(0, 17, size=2)  # anywhere in its 32 x 32 half
            out[i, 0, dy:dy + 16, x0 + dx:x0 + dx + 16] = img
    return out, y


def _walk(rng, size: int, steps: int):
    """Integer pixels of a curvy random walk with momentum, reflected at the borders."""
    pos = rng.uniform(2, size - 3, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    pts = []
    for _ in range(steps):
        angle += rng.normal(0, 0.35)
        step = np.array([np.cos(angle), np.sin(angle)])
        nxt = pos + step
        for k in range(2):
            if not 1 <= nxt[k] <= size - 2:
                step[k] = -step[k]
                angle = math.atan2(step[1], step[0])
        pos = np.clip(pos + step, 1, size - 2)
        pts.append((int(round(pos[0])), int(round(pos[1]))))
    return pts


def make_pathfinder(n: int, seed: int, size: int = 32):
    """(images (n, 1, size, size) float32, labels (n,) int64): two dashed paths, two marked ends; label =
    the marks are the two ends of the same path."""
    rng = np.random.default_rng([seed, 2])
    out = np.zeros((n, 1, size, size), np.float32)
    y = (rng.random(n) < 0.5).astype(np.int64)
    steps = int(1.5 * size)
    for i in range(n):
        paths = [_walk(rng, size, steps) for _ in range(2)]
        for path in paths:
            for j, (r, c) in enumerate(path):
                if j % 4 != 3:  # dashed: every fourth step left out
                    out[i, 0, r, c] = 0.6
        ends = [paths[0][0], paths[0][-1]] if y[i] else [paths[0][0], paths[1][-1]]
        for r, c in ends:
            out[i, 0, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = 1.0
    return out, y


def make_task(task: str, n: int, seed: int):
    if task == "pairs":
        x, y = make_pairs(n, seed)
    elif task == "pathfinder":
        x, y = make_pathfinder(n, seed)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return torch.from_numpy((x - 0.5) / 0.5), torch.from_numpy(y)


def build_model(name: str, task: str, cfg: dict, seed: int) -> torch.nn.Module:
    timm_name, extra = MODELS[name]
    torch.manual_seed(seed)
    img = (32, 64) if task == "pairs" else (32, 32)
    return timm.create_model(timm_name, embed_dim=cfg["embed_dim"], depth=cfg["depth"], patch_size=cfg["patch"][task],
                             img_size=img, in_chans=1, num_classes=2, **extra)


def accuracy(model, x, y, batch: int) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


def train_one(task: str, name: str, seed: int, cfg: dict, data: dict) -> dict:
    model = build_model(name, task, cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.05)
    (xtr, ytr), batch = data["train"], cfg["batch"]
    per_epoch = math.ceil(len(ytr) / batch)
    total = per_epoch * cfg["epochs"]
    warm = max(1, int(0.05 * total))

    def lr_factor(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    for _ in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    train_s = time.perf_counter() - start
    return {"task": task, "model": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
            "val_acc": accuracy(model, *data["val"], batch), "test_acc": accuracy(model, *data["test"], batch),
            "final_loss": statistics.fmean(losses[-per_epoch:]), "train_s": train_s}


def save_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def pareto(points):
    """Indices of the points (throughput, accuracy) that no other point beats on both (>= both, > one)."""
    front = []
    for i, (t, a) in enumerate(points):
        if not any((t2 >= t and a2 >= a) and (t2 > t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(summary: dict, path: str, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(summary)
    fig = Figure(figsize=(5.5 * len(tasks), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        rows = summary[task]
        names = list(rows)
        pts = [(rows[m]["infer_img_s"], rows[m]["acc_mean"]) for m in names]
        for k, m in enumerate(names):
            ax.errorbar(pts[k][0], pts[k][1] * 100, yerr=rows[m]["acc_std"] * 100, fmt="o", capsize=3,
                        color=f"C{k % 10}", label=m)
            ax.annotate(m, (pts[k][0], pts[k][1] * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] * 100 for i in front], "k--", lw=1, alpha=0.6,
                label="Pareto front")
        ax.set_xlabel("CPU inference throughput (images/s)")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext or '.png'}"
    fig.savefig(tmp, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (0 1 with --quick)")
    p.add_argument("--n-train", type=int, default=None, help="default 2000 (64 with --quick)")
    p.add_argument("--n-val", type=int, default=None, help="default 500 (32 with --quick)")
    p.add_argument("--n-test", type=int, default=None, help="default 1000 (32 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="default 4 (1 with --quick)")
    p.add_argument("--embed-dim", type=int, default=None, help="default 64 (32 with --quick)")
    p.add_argument("--depth", type=int, default=None, help="default 4 (2 with --quick)")
    p.add_argument("--patch", type=int, default=None,
                   help="patch side for every task (default: 8 on pairs, 4 on pathfinder; 8 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (32 with --quick)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/tradeoff_runs", help="folder of the resumable runs file")
    p.add_argument("--figure", default="benchmarks/tradeoff.png")
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--quick", action="store_true", help="tiny setting: checks that it runs")
    args = p.parse_args(argv)
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)
    tasks = args.tasks or list(TASKS)
    models = args.models or (["lbvim", "uvim"] if q else list(MODELS))
    seeds = pick(args.seeds, [0, 1, 2], [0, 1])
    cfg = {"n_train": pick(args.n_train, 2000, 64), "n_val": pick(args.n_val, 500, 32),
           "n_test": pick(args.n_test, 1000, 32), "epochs": pick(args.epochs, 3, 1),
           "embed_dim": pick(args.embed_dim, 64, 32), "depth": pick(args.depth, 4, 2),
           "patch": {t: pick(args.patch, {"pairs": 8, "pathfinder": 4}[t], 8) for t in TASKS},
           "batch": pick(args.batch, 64, 32), "lr": args.lr, "data_seed": args.data_seed}
    rounds = pick(args.rounds, 5, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe(torch.get_num_threads())
    started = time.perf_counter()

    os.makedirs(args.out, exist_ok=True)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    runs_path = os.path.join(args.out, f"runs-{digest}.json")
    store = {"config": cfg, "runs": {}}
    if os.path.exists(runs_path):
        with open(runs_path) as f:
            store = json.load(f)
    runs = store["runs"]
    loaded = trained = 0

    print(f"# Accuracy vs CPU throughput: {', '.join(tasks)}; models {', '.join(models)}; seeds {seeds}")
    print(f"{machine}; torch {torch.__version__}; settings {json.dumps(cfg)}; runs file {runs_path}", flush=True)
    data = {}
    for task in tasks:
        n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}
        data[task] = {s: make_task(task, n[s], cfg["data_seed"] + off) for s, off in SPLIT_OFFSETS.items()}
        for name in models:
            for seed in seeds:
                key = f"{task}/{name}/{seed}"
                if key in runs:
                    loaded += 1
                    print(f"loaded {key}: test acc {runs[key]['test_acc']:.3f}", flush=True)
                    continue
                r = train_one(task, name, seed, cfg, data[task])
                runs[key] = r
                save_json(runs_path, store)
                trained += 1
                print(f"trained {key}: test acc {r['test_acc']:.3f} (val {r['val_acc']:.3f}, "
                      f"{r['train_s']:.1f} s)", flush=True)
    if loaded:
        print(f"resumed: {loaded} finished run(s) loaded from {runs_path}, {trained} trained now")

    # throughput: every (task, model) in one interleaved run
    jobs, batch = {}, cfg["batch"]
    gen = torch.Generator().manual_seed(0)
    for task in tasks:
        x = data[task]["train"][0][:batch]
        labels = torch.randint(0, 2, (len(x),), generator=gen)
        for name in models:
            model = build_model(name, task, cfg, 0)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])

            def infer(m=model, x=x):
                m.eval()
                with torch.inference_mode():
                    m(x)

            def step(m=model, o=opt, x=x, y=labels):
                m.train()
                o.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                o.step()

            jobs[f"{task}/{name}/infer"] = infer
            jobs[f"{task}/{name}/train"] = step
    times = interleaved(jobs, rounds)

    summary = {}
    for task in tasks:
        summary[task] = {}
        for name in models:
            accs = [runs[f"{task}/{name}/{s}"]["test_acc"] for s in seeds]
            vals = [runs[f"{task}/{name}/{s}"]["val_acc"] for s in seeds]
            summary[task][name] = {
                "timm_name": MODELS[name][0], **MODELS[name][1],
                "params": runs[f"{task}/{name}/{seeds[0]}"]["params"], "seeds": seeds, "test_accs": accs,
                "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "val_acc_mean": statistics.fmean(vals),
                "train_s_mean": statistics.fmean(runs[f"{task}/{name}/{s}"]["train_s"] for s in seeds),
                "infer_img_s": batch / statistics.median(times[f"{task}/{name}/infer"]),
                "train_img_s": batch / statistics.median(times[f"{task}/{name}/train"]),
                "infer_times_s": times[f"{task}/{name}/infer"], "train_times_s": times[f"{task}/{name}/train"]}
        pts = [(summary[task][m]["infer_img_s"], summary[task][m]["acc_mean"]) for m in models]
        front = {models[i] for i in pareto(pts)}
        for m in models:
            summary[task][m]["pareto"] = m in front

    for task in tasks:
        print(f"\n## {task}: test accuracy over {len(seeds)} seed(s), CPU images/s (batch {batch}, "
              f"median of {rounds} interleaved round(s))\n")
        header = ["model", "params", "test acc (%) mean ± std", "train (img/s)", "infer (img/s)", "Pareto"]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for m, r in summary[task].items():
            cells = [m, f"{r['params']:,}", f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}",
                     f"{r['train_img_s']:.1f}", f"{r['infer_img_s']:.1f}", "yes" if r["pareto"] else ""]
            print("| " + " | ".join(cells) + " |")

    figure = plot(summary, args.figure, f"{machine}; {cfg['epochs']} epoch(s), {len(seeds)} seed(s)")
    print(f"\nfigure: {figure}")
    report = {"machine": machine, "torch": torch.__version__, "timm": timm.__version__,
              "threads": torch.get_num_threads(), "quick": q, "config": cfg, "tasks": tasks, "models": models,
              "seeds": seeds, "rounds": rounds, "runs_file": runs_path, "loaded": loaded, "trained": trained,
              "figure": figure, "wall_s": time.perf_counter() - started, "summary": summary,
              "runs": {f"{t}/{m}/{sd}": runs[f"{t}/{m}/{sd}"] for t in tasks for m in models for sd in seeds}}
    if args.json:
        save_json(args.json, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
