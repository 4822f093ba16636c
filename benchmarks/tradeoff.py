"""Does LB help? Accuracy against CPU throughput for LBVim, uVim, Vim and LBVim's windows (and, on request,
the other vision Mambas against their LB variants), on two generated tasks that need context across the
whole image, with mean ± std over seeds.

    python benchmarks/tradeoff.py                          # both tasks, the LBVim family, 3 seeds (about 2.5 h)
    python benchmarks/tradeoff.py --models lbvim uvim vim --seeds 0 1 2 3 4
    python benchmarks/tradeoff.py --models other-mambas --tasks cued
    python benchmarks/tradeoff.py --tasks cued --train-only &    # one process per task, then
    python benchmarks/tradeoff.py --tasks cued_rows --train-only; wait; python benchmarks/tradeoff.py
    python benchmarks/tradeoff.py --quick                  # tiny setting: checks that it runs (< 1 min)

Tasks (generated from a seed with numpy and scikit-learn's bundled 8 x 8 digits, no downloads; train / val
/ test come from disjoint seeds of one generator). A canvas is a grid of cells of 8 x 8 pixels; digits
and cues sit exactly in cells, so with patch 8 each is one token of a 32-token sequence, and the tasks
test how far information travels along the sequence rather than translation-invariant recognition:

* ``cued`` (32 x 64 pixels, 4 x 8 cells): one digit in columns 1-3, one in columns 4-6, and a cue (a
  horizontal or a vertical bar) in column 0 or 7, each in a random row; the label is the class of the
  left digit when the cue is horizontal, of the right one when it is vertical.
* ``cued_rows`` (64 x 32 pixels, 8 x 4 cells): the same rule across rows: digits in rows 1-3 and 4-6, the
  cue in row 0 or 7 (horizontal: the top digit). Tokens are flattened row by row, so here the two digits
  and the cue lie whole rows of tokens apart (up to 31 positions), where in ``cued`` they may share a row.

Why global context: which digit counts is decided by a cue up to seven cells away, in either direction.
A model whose tokens never exchange information can only add up what each token says on its own: it must
name one of the two digits and is right about 55 % of the time (half the cases, plus the 10 % where the
two digits agree). Anything above that line is context. Both tasks are ten-way (chance 10 %) and give every
model a first-order signal (the digit classes) to learn before the long-range part.

Tried first and dropped, because no model learnt them at a budget of a few minutes per run: same /
different on two digits far apart and a Pathfinder-like "are the two marks on one path" (4,000 images, 6
epochs: every model at chance; a same / different label is uncorrelated with either digit alone, so a
gradient has nothing to start from, and Pathfinder needs tracing over many hops), and a cue that changes
a digit's label to (class + 5) mod 10 (12,000 images, 4 epochs: 50 %, the no-context level).

Models (``--models``, names or the groups ``vim-family`` (the default) and ``other-mambas``). The LBVim
family at matched width and depth (``--embed-dim`` 64, ``--depth`` 4, ``--patch`` 8; one input
channel): ``lbvim`` (LB scan, window "auto": 4 at 32 tokens, flips every layer, mean pooling), ``uvim``
(window 1: a plain forward scan, flips), ``vim`` (bidirectional: two scans per layer, middle class token),
``lbvim_w2`` / ``lbvim_w8`` / ``lbvim_w16`` (LB scan, fixed window; with ``lbvim`` windows 2 / 4 / 8 / 16),
and ``vim@0.001``: Vim at half the shared learning rate, because at 2e-3 it fails to learn even the digits
on some seeds (any entry may carry its own learning rate as NAME@LR; its runs are kept apart).
The other Mambas, each original against its LB variant at the same width, depth and patch:
``vmamba`` / ``lb_vmamba`` (stages of depths 1, 1, 2, 1 from width embed-dim / 2, no stochastic depth, at
lr 5e-4: at 2e-3 it stayed near chance, at 1e-3 it reached 34 % on ``cued``, at 5e-4 97 %), ``localvim`` /
``lb_localvim``, ``plainmamba`` / ``lb_plainmamba``, ``adventurer`` / ``lb_adventurer``.

Training per (task, model, seed): AdamW (``--lr`` 2e-3, weight decay 0.05), cosine schedule per step
with a linear warm-up over the first 5 % of the steps, ``--batch`` 64, ``--epochs`` 4 over ``--n-train``
12,000 images (750 steps), cross-entropy; the seed sets the model's initialisation and the batch order (the data are
the same for every seed). Reported: test accuracy (2,000 images) and val accuracy after the last epoch,
parameters.

Resume: every finished (task, model, seed) run is added at once to ``--out``/runs-<config hash>.json
(under a file lock, written atomically), so several processes can share it;
a rerun with the same settings loads finished runs instead of training them again (the log says
"loaded"). Another setting (epochs, sizes, width...) gets another file. ``--train-only`` stops after
training: run one process per task that way, then one plain run to time and report.

Throughput: after training, every selected (task, model) is built once more and its inference (eval,
torch.inference_mode, one batch) and training step (forward, cross-entropy, backward, AdamW step) are
timed in ONE interleaved run (benchmarks/machine.py's `interleaved`: a fresh order per round after an
untimed warm-up round); images/s are medians over ``--rounds`` rounds. Throughput is measured on every
run (not resumed): it is the machine's, now.

Output: a markdown table per task (model, params, accuracy mean ± std over seeds, train and infer
images/s), a figure ``--figure`` (accuracy with std error bars against inference images/s, one panel
per task, Pareto front drawn: models that no other model beats on both axes), and, as the last line on
stdout, one JSON line with every number (also written to ``--json`` when given).

Cost on a 2-core CPU: a run of LBVim takes about 2-3 minutes on one thread (Vim about twice that; the
other Mambas more: LocalVim and PlainMamba four to six times), so the default 2 tasks x 7 entries x 3 seeds
= 42 runs take about 2.5 hours of one core, 1.3 hours with one process per task. Check that a task is learnt
at a budget before trusting a comparison: a model near the no-context level (about 55 %) says nothing
about LB.
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
from lbmamba.engine.files import atomic_path, write_json
from machine import describe, interleaved

#: the LBVim family at one width and depth: model name -> (timm name, extra kwargs)
VIM_FAMILY = {
    "lbvim": ("lbvim_tiny_patch16_224", {"window": "auto"}),
    "uvim": ("uvim_tiny_patch16_224", {}),
    "vim": ("vim_tiny_patch16_224", {}),
    "lbvim_w2": ("lbvim_tiny_patch16_224", {"window": 2}),
    "lbvim_w8": ("lbvim_tiny_patch16_224", {"window": 8}),
    "lbvim_w16": ("lbvim_tiny_patch16_224", {"window": 16}),
}
#: the other vision Mambas, each original against its LB variant at one small configuration
OTHER_FAMILIES = {
    "vmamba": "vmamba_tiny_s1l8",
    "localvim": "localvim_tiny",
    "plainmamba": "plainmamba_l1",
    "adventurer": "adventurer_tiny_patch16_224",
}
MODELS = {**VIM_FAMILY, **{pre + name: (pre + timm_name, {}) for name, timm_name in OTHER_FAMILIES.items()
                           for pre in ("", "lb_")}}
#: names --models accepts for a whole group
#: (Vim also at half the shared learning rate: at 2e-3 it fails to learn even the digits on some seeds)
#: (VMamba at a quarter of it: at 2e-3 and 1e-3 it stays near chance on `cued`, at 5e-4 it reaches 97 %, seed 0)
GROUPS = {"vim-family": [*VIM_FAMILY, "vim@0.001"],
          "other-mambas": [n + "@0.0005" if n.endswith("vmamba") else n for n in MODELS if n not in VIM_FAMILY]}
NUM_CLASSES = 10
#: the best a model whose tokens never exchange information can do: name one of the two digits (see above)
NO_CONTEXT_ACC = 0.5 + 0.5 / NUM_CLASSES
#: cells are CELL x CELL pixels; patch CELL = one token per cell
CELL = 8
#: task -> its grid of cells (rows, columns): 32 tokens either way, flattened row by row
GRIDS = {"cued": (4, 8), "cued_rows": (8, 4)}
#: split -> offset added to the data seed (disjoint streams)
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_029}

_DIGITS = None


def _digits():
    """scikit-learn's 1,797 digits: images (n, 8, 8) float32 in [0, 1], labels (n,) int64."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        _DIGITS = ((x.reshape(-1, 8, 8) / 16.0).astype(np.float32), y.astype(np.int64))
    return _DIGITS


def _put(canvas, row: int, col: int, img) -> None:
    canvas[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = img


def _cue(horizontal: bool) -> np.ndarray:
    """The cue: a 2 x 4 bar (horizontal) or a 4 x 2 bar (vertical), centred in a cell."""
    cell = np.zeros((CELL, CELL), np.float32)
    if horizontal:
        cell[3:5, 2:6] = 1.0
    else:
        cell[2:6, 3:5] = 1.0
    return cell


def make_cued(n: int, seed: int, across: str = "columns"):
    """(images (n, 1, 8 rows, 8 cols), labels (n,)): two digits, one in each half of the grid, and a cue in
    an outer line. across="columns": a 4 x 8 grid, digits in columns 1-3 and 4-6, the cue in column 0 or
    7; across="rows": an 8 x 4 grid, digits in rows 1-3 and 4-6, the cue in row 0 or 7. The label is the
    class of the first digit (left / top) when the cue is horizontal, of the second when it is vertical."""
    rows, cols = GRIDS["cued" if across == "columns" else "cued_rows"]
    rng = np.random.default_rng([seed, 3 if across == "columns" else 5])
    imgs, classes = _digits()
    out = np.zeros((n, 1, rows * CELL, cols * CELL), np.float32)
    y = np.zeros(n, np.int64)
    long_axis = cols if across == "columns" else rows
    for i in range(n):
        picks = rng.integers(len(classes), size=2)
        second = bool(rng.integers(2))
        spots = [(1, long_axis // 2), (long_axis // 2, long_axis - 1), (0, long_axis)]  # first, second, cue lines
        lines = [int(rng.integers(*spots[0])), int(rng.integers(*spots[1])), int(rng.choice([0, long_axis - 1]))]
        short = rng.integers(rows if across == "columns" else cols, size=3)
        for (line, other), img in zip(zip(lines, short), (imgs[picks[0]], imgs[picks[1]], _cue(not second))):
            _put(out[i, 0], *((other, line) if across == "columns" else (line, other)), img)
        y[i] = classes[picks[int(second)]]
    return out, y


TASKS = {"cued": make_cued, "cued_rows": lambda n, seed: make_cued(n, seed, across="rows")}


def make_task(task: str, n: int, seed: int):
    """The task's images scaled to [-1, 1] and its labels, as tensors."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {tuple(TASKS)}")
    x, y = TASKS[task](n, seed)
    return torch.from_numpy((x - 0.5) / 0.5), torch.from_numpy(y)


def architecture(name: str, cfg: dict) -> dict:
    """The size arguments of model `name`: the LBVim family at --embed-dim / --depth / --patch; the other
    Mambas at the same width, depth and patch where they have them (VMamba: four stages of depths 1, 1, 2,
    1 from width embed-dim / 2, its 4-px stem fixed)."""
    family = name.removeprefix("lb_")
    if family == "vmamba":  # stochastic depth off, as in every other model here (VMamba-T's default is 0.2)
        return {"depths": (1, 1, 2, 1), "dims": max(cfg["embed_dim"] // 2, 8), "drop_path_rate": 0.0}
    return {"embed_dim": cfg["embed_dim"], "depth": cfg["depth"], "patch_size": cfg["patch"]}


def split_lr(entry: str, cfg: dict) -> tuple:
    """(model name, learning rate) of a --models entry: "vim" trains at --lr, "vim@0.001" at 0.001."""
    name, _, lr = entry.partition("@")
    return name, float(lr) if lr else cfg["lr"]


def parse_entry(entry: str) -> str:
    """argparse type of --models: a model name, a group, or a model name with "@<learning rate>"."""
    name, at, lr = entry.partition("@")
    if entry in GROUPS or (name in MODELS and not at):
        return entry
    if name not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from {', '.join([*MODELS, *GROUPS])}")
    try:
        if float(lr) > 0:
            return entry
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{entry!r}: the part after '@' must be a positive learning rate, got {lr!r}")


def build_model(entry: str, task: str, cfg: dict, seed: int) -> torch.nn.Module:
    name = entry.partition("@")[0]
    timm_name, extra = MODELS[name]
    rows, cols = GRIDS[task]
    torch.manual_seed(seed)
    return timm.create_model(timm_name, img_size=(rows * CELL, cols * CELL), in_chans=1, num_classes=NUM_CLASSES,
                             **architecture(name, cfg), **extra)


def accuracy(model, x, y, batch: int) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


def warmup_cosine(opt, total: int):
    """The studies' schedule, stepped once per step: a linear warm-up over the first 5 % of `total` steps,
    then a cosine decay to 0."""
    warm = max(1, int(0.05 * total))

    def lr_factor(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def update(opt, sched, loss) -> float:
    """One optimizer and schedule step on `loss`; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def train_one(task: str, name: str, seed: int, cfg: dict, data: dict) -> dict:
    model = build_model(name, task, cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=split_lr(name, cfg)[1], weight_decay=0.05)
    (xtr, ytr), batch = data["train"], cfg["batch"]
    per_epoch = math.ceil(len(ytr) / batch)
    sched = warmup_cosine(opt, per_epoch * cfg["epochs"])
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    for _ in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), batch):
            idx = order[i:i + batch]
            losses.append(update(opt, sched, F.cross_entropy(model(xtr[idx]), ytr[idx])))
    train_s = time.perf_counter() - start
    return {"task": task, "model": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
            "val_acc": accuracy(model, *data["val"], batch), "test_acc": accuracy(model, *data["test"], batch),
            "final_loss": statistics.fmean(losses[-per_epoch:]), "train_s": train_s}


def record_run(path: str, cfg: dict, key: str | None = None, result: dict | None = None) -> dict:
    """Add one finished run to the runs file at `path` (when `key` is given) and return every run in it.
    Read, update and replace under an exclusive lock, so that several processes (one per task, say) can
    share the file without losing each other's runs."""
    import fcntl

    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = {"config": cfg, "runs": {}}
        if os.path.exists(path):
            with open(path) as f:
                store = json.load(f)
        if key is not None:
            store["runs"][key] = result
            write_json(path, store)
    return store["runs"]


def pareto(points):
    """Indices of the points (throughput, accuracy) that no other point beats on both (>= both, > one)."""
    front = []
    for i, (t, a) in enumerate(points):
        if not any((t2 >= t and a2 >= a) and (t2 > t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(summary: dict, path: str, title: str, key: str = "acc",
         ylabel: str = "test accuracy (%), mean ± std over seeds",
         reference: tuple | None = (NO_CONTEXT_ACC, "no context (about 55 %)")) -> str:
    """One panel per task of summary[task][model]: the score `key`_mean ± `key`_std (fractions, drawn in %)
    against infer_img_s, the Pareto front, and a dotted `reference` line (value, label) when given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(summary)
    fig = Figure(figsize=(5.5 * len(tasks), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        rows = summary[task]
        names = list(rows)
        pts = [(rows[m]["infer_img_s"], rows[m][f"{key}_mean"]) for m in names]
        for k, m in enumerate(names):
            ax.errorbar(pts[k][0], pts[k][1] * 100, yerr=rows[m][f"{key}_std"] * 100, fmt="o", capsize=3,
                        color=f"C{k % 10}", label=m)
            ax.annotate(m, (pts[k][0], pts[k][1] * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if reference is not None:
            ax.axhline(reference[0] * 100, color="grey", ls=":", lw=1, label=reference[1])
        front = pareto(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] * 100 for i in front], "k--", lw=1, alpha=0.6,
                label="Pareto front")
        ax.set_xlabel("CPU inference throughput (images/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format=os.path.splitext(path)[1][1:] or "png")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    p.add_argument("--models", nargs="+", type=parse_entry, default=None,
                   help="model names or groups (vim-family, other-mambas; default: vim-family); NAME@LR trains "
                        "NAME at learning rate LR instead of --lr (its own runs, e.g. vim@0.001)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (0 1 with --quick)")
    p.add_argument("--n-train", type=int, default=None, help="default 12000 (64 with --quick)")
    p.add_argument("--n-val", type=int, default=None, help="default 500 (32 with --quick)")
    p.add_argument("--n-test", type=int, default=None, help="default 2000 (32 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="default 4 (1 with --quick)")
    p.add_argument("--embed-dim", type=int, default=None, help="default 64 (32 with --quick)")
    p.add_argument("--depth", type=int, default=None, help="default 4 (2 with --quick)")
    p.add_argument("--patch", type=int, default=CELL, help=f"patch side (default {CELL}: one token per cell)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (32 with --quick)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/tradeoff_runs", help="folder of the resumable runs file")
    p.add_argument("--figure", default="benchmarks/tradeoff.png")
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--result", default=None, help="also write the summary to this result file (for "
                   "benchmarks/report.py: benchmarks/results/tradeoff.json, or tradeoff_other_mambas.json)")
    p.add_argument("--quick", action="store_true", help="tiny setting: checks that it runs")
    p.add_argument("--train-only", action="store_true",
                   help="train the missing runs and stop (no timing, table or figure): for several processes "
                        "sharing one runs file, e.g. one per task, before one full run reports")
    args = p.parse_args(argv)
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)
    tasks = args.tasks or list(TASKS)
    chosen = args.models or (["lbvim", "uvim"] if q else ["vim-family"])
    models = list(dict.fromkeys(m for name in chosen for m in GROUPS.get(name, [name])))
    seeds = pick(args.seeds, [0, 1, 2], [0, 1])
    # "version" of the task generators and the model sizes (architecture()): bump it when either changes,
    # so that runs saved by the old ones are not reused
    cfg = {"version": 2, "n_train": pick(args.n_train, 12000, 64), "n_val": pick(args.n_val, 500, 32),
           "n_test": pick(args.n_test, 2000, 32), "epochs": pick(args.epochs, 4, 1),
           "embed_dim": pick(args.embed_dim, 64, 32), "depth": pick(args.depth, 4, 2), "patch": args.patch,
           "batch": pick(args.batch, 64, 32), "lr": args.lr, "data_seed": args.data_seed}
    rounds = pick(args.rounds, 5, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe(torch.get_num_threads())
    started = time.perf_counter()

    os.makedirs(args.out, exist_ok=True)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    runs_path = os.path.join(args.out, f"runs-{digest}.json")
    runs = record_run(runs_path, cfg)
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
                runs = record_run(runs_path, cfg, key, r)
                trained += 1
                print(f"trained {key}: test acc {r['test_acc']:.3f} (val {r['val_acc']:.3f}, "
                      f"{r['train_s']:.1f} s)", flush=True)
    if loaded:
        print(f"resumed: {loaded} finished run(s) loaded from {runs_path}, {trained} trained now")
    if args.train_only:
        return 0

    # throughput: every (task, model) in one interleaved run
    jobs, batch = {}, cfg["batch"]
    gen = torch.Generator().manual_seed(0)
    for task in tasks:
        x = data[task]["train"][0][:batch]
        labels = torch.randint(0, NUM_CLASSES, (len(x),), generator=gen)
        for name in models:
            model = build_model(name, task, cfg, 0)
            opt = torch.optim.AdamW(model.parameters(), lr=split_lr(name, cfg)[1])

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
            base, lr = split_lr(name, cfg)
            accs = [runs[f"{task}/{name}/{s}"]["test_acc"] for s in seeds]
            vals = [runs[f"{task}/{name}/{s}"]["val_acc"] for s in seeds]
            summary[task][name] = {
                "timm_name": MODELS[base][0], **MODELS[base][1], "lr": lr,
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
        write_json(args.json, report)
    if args.result:
        from machine import write_result

        write_result(args.result, "benchmarks/tradeoff.py", sys.argv[1:] if argv is None else argv,
                     {k: v for k, v in report.items() if k != "runs"})
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
