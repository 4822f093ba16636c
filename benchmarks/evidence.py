"""Does the LB scan help where its context is local? LBVim against uVim (the same model with window 1) and Vim
(two scans per layer, same width and depth) as segmentation backbones and as classifiers, on tasks where a
label needs context from both sides within a few patches, with mean ± std over seeds; then LBVim's windows
on the segmentation task where LB's effect is largest and on the classification task.

    python benchmarks/evidence.py                  # every study, 3 seeds, resumable (2.5-3.5 h of one core)
    python benchmarks/evidence.py --tasks capped_bars --train-only &    # one process per task, then
    python benchmarks/evidence.py --tasks marked_bar --train-only; wait; python benchmarks/evidence.py
    python benchmarks/evidence.py --quick          # tiny setting: checks that it runs (about a minute)

Tasks (generated from seeds, no downloads; train and test sets from disjoint seeds):

* ``digit_scenes`` (segmentation, 11 classes): the shipped segmentation demo's scenes (textured
  backgrounds, one or two of scikit-learn's 8 x 8 digits upscaled to 14-22 px), made at 32 x 32 px in
  memory; train scenes draw from 80 % of the digit images, test scenes from the other 20 %.
* ``capped_bars`` (segmentation, 5 classes) and ``marked_bar`` (classification, 4 classes): see
  benchmarks/local_tasks.py: a bar's class is set by the caps at its two ends, at most four cells away on
  either side, so a token that sees one side only can narrow four classes to two.

Models (``--models``; the LBVim family at one width and depth: ``--embed-dim`` 64, ``--depth`` 4, patch 4,
so 64 tokens, 8 per row): ``lbvim`` (window "auto" = 4 at 64 tokens), ``uvim`` (window 1), ``vim`` (two
scans per layer, middle class token when classifying), and the windows ``lbvim_w2`` / ``lbvim_w8`` /
``lbvim_w16``, which run on ``marked_bar`` and on the segmentation task with the largest gap between
``lbvim`` and ``uvim`` over the finished seeds (so they run after the three models there). Segmentors are
the shipped ``lbmamba seg train`` default's (UperNet with 64 / 32 head channels, the backbone's four maps).

Training per (task, model, seed): AdamW (``--lr`` 2e-3, weight decay 0.05), a linear warm-up over 5 % of
the steps then a cosine decay, ``--batch`` 32, a task's own number of steps (``STEPS``) over a fixed set
of generated images; the seed sets the initialisation and the batch order. Scores on a test set of 500
images: mIoU (mmseg's, over the classes) for segmentation, accuracy for classification.

Resume and output as in tradeoff.py: finished runs go at once to a runs file keyed by the settings; a rerun
loads them. Then one interleaved timing of every (task, model) (training step and inference, images/s,
medians over ``--rounds``), a figure (score against inference images/s, one panel per task), the markdown
tables, and a result file for the results page (``--result``, default benchmarks/results/evidence.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
import local_tasks
from lbmamba.data.generated import digit_pools
from lbmamba.data.segmentation import DIGIT_SCENE_CLASSES, scene_instances
from lbmamba.engine.metrics import confusion_matrix, segmentation_scores
from lbmamba.models.dense import build_segmentor
from machine import describe, interleaved, write_result
from tradeoff import VIM_FAMILY, pareto, plot, record_run, update, warmup_cosine

#: task -> (kind, classes, input channels)
TASKS = {
    "digit_scenes": ("seg", DIGIT_SCENE_CLASSES, 3),
    "capped_bars": ("seg", local_tasks.SEG_CLASSES, 1),
    "marked_bar": ("cls", local_tasks.CLS_CLASSES, 1),
}
#: optimizer steps per run (quick: 8)
STEPS = {"digit_scenes": 1200, "capped_bars": 300, "marked_bar": 400}
#: fractions of a run's steps after which the test score is taken too (the learning curve)
CURVE_AT = (0.25, 0.5, 0.75)
MODELS = {name: VIM_FAMILY[name] for name in ("lbvim", "uvim", "vim", "lbvim_w2", "lbvim_w8", "lbvim_w16")}
BASE_MODELS = ("lbvim", "uvim", "vim")
WINDOW_MODELS = ("lbvim_w2", "lbvim_w8", "lbvim_w16")
SIZE = 32
PATCH = 4
#: split -> offset added to the data seed (disjoint streams)
SPLIT_OFFSETS = {"train": 0, "test": 1_000_003}


def make_digit_scenes(n: int, seed: int, split: str):
    """(images (n, 3, 32, 32) float32 in [0, 1], masks (n, 32, 32) int64): digit scenes made in memory."""
    _, pools = digit_pools(0)  # the digit split is fixed; the scenes draw from their own seed
    rng = np.random.default_rng([seed, 17])
    digits, labels = pools["train" if split == "train" else "val"]
    images = np.zeros((n, 3, SIZE, SIZE), np.float32)
    masks = np.zeros((n, SIZE, SIZE), np.int64)
    for i in range(n):
        image, instances = scene_instances(rng, digits, labels, SIZE, SIZE, (14, 22), 2)
        images[i] = image.transpose(2, 0, 1) / 255.0
        for y, x, size, digit, inside in instances:
            masks[i, y:y + size, x:x + size][inside] = digit + 1
    return images, masks


def make_data(task: str, n: int, seed: int, split: str):
    if task == "digit_scenes":
        images, targets = make_digit_scenes(n, seed, split)
    elif task == "capped_bars":
        images, targets = local_tasks.make_capped_bars(n, seed)
    else:
        images, targets = local_tasks.make_marked_bar(n, seed)
    return local_tasks.as_tensors(images, targets)


def build_model(name: str, task: str, cfg: dict, seed: int) -> torch.nn.Module:
    timm_name, extra = MODELS[name]
    kind, classes, chans = TASKS[task]
    size = {"embed_dim": cfg["embed_dim"], "depth": cfg["depth"], "patch_size": PATCH}
    torch.manual_seed(seed)
    if kind == "seg":
        return build_segmentor(timm_name, len(classes), img_size=SIZE, head_channels=64, aux_channels=32,
                               in_chans=chans, backbone_kwargs={**size, **extra})
    return timm.create_model(timm_name, img_size=SIZE, in_chans=chans, num_classes=len(classes), **size, **extra)


def loss_of(model, task: str, x, y):
    if TASKS[task][0] == "seg":
        return model.losses(x, y)["loss"]
    return F.cross_entropy(model(x), y)


def score(model, task: str, x, y, batch: int) -> float:
    """Test mIoU (segmentation) or accuracy (classification)."""
    kind, classes, _ = TASKS[task]
    model.eval()
    conf, correct = torch.zeros(len(classes), len(classes), dtype=torch.int64), 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            pred = model(x[i:i + batch]).argmax(1)
            if kind == "seg":
                conf += confusion_matrix(pred, y[i:i + batch], len(classes))
            else:
                correct += int((pred == y[i:i + batch]).sum())
    return segmentation_scores(conf)["mIoU"] if kind == "seg" else correct / len(y)


def train_one(task: str, name: str, seed: int, cfg: dict, data: dict) -> dict:
    model = build_model(name, task, cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.05)
    total = cfg["steps"][task]
    sched = warmup_cosine(opt, total)
    (xtr, ytr), batch = data["train"], cfg["batch"]
    gen = torch.Generator().manual_seed(seed)
    order, losses, start = torch.randperm(len(ytr), generator=gen), [], time.perf_counter()
    marks, curve = {max(1, round(f * total)) for f in CURVE_AT}, {}
    model.train()
    for step in range(total):
        if step in marks:  # the score part-way (its time is not training time)
            paused = time.perf_counter()
            curve[step] = score(model, task, *data["test"], batch)
            model.train()
            start += time.perf_counter() - paused
        at = (step * batch) % len(ytr)
        if at + batch > len(ytr):  # a new pass over the set, in a new order
            order, at = torch.randperm(len(ytr), generator=gen), 0
        idx = order[at:at + batch]
        losses.append(update(opt, sched, loss_of(model, task, xtr[idx], ytr[idx])))
    train_s = time.perf_counter() - start
    return {"task": task, "model": name, "seed": seed, "steps": total,
            "params": sum(p.numel() for p in model.parameters()),
            "score": score(model, task, *data["test"], batch), "curve": curve,
            "final_loss": statistics.fmean(losses[-50:]), "train_s": train_s}


def window_task(runs: dict, seeds) -> str | None:
    """The segmentation task with the largest mean lbvim - uvim score gap over `seeds`, among those where both
    models have finished every seed (None while there is none). A task that takes the lead later gets its
    windows too: every process that shares the runs file plans alike from what is in it."""
    gaps = {}
    for task, (kind, _, _) in TASKS.items():
        keys = [(f"{task}/lbvim/{s}", f"{task}/uvim/{s}") for s in seeds]
        if kind == "seg" and all(a in runs and b in runs for a, b in keys):
            gaps[task] = statistics.fmean(runs[a]["score"] - runs[b]["score"] for a, b in keys)
    return max(gaps, key=gaps.get) if gaps else None


def plan(tasks, models, seeds, runs: dict) -> list:
    """Keys "task/model/seed" to have, in order: the base models first, then the windows on marked_bar and
    on the segmentation task window_task() picks (planned once the runs it needs are in `runs`; a task
    that already has window runs keeps them)."""
    keys = [f"{t}/{m}/{s}" for t in tasks for s in seeds for m in models if m in BASE_MODELS]
    picked = {window_task(runs, seeds)} | {k.split("/")[0] for k in runs if k.split("/")[1] in WINDOW_MODELS}
    keys += [f"{t}/{m}/{s}" for t in tasks if TASKS[t][0] == "cls" or t in picked
             for s in seeds for m in models if m in WINDOW_MODELS]
    return keys


def throughput(tasks, models, cfg: dict, rounds: int) -> dict:
    """{"task/model/train" | "task/model/infer": seconds per batch} from one interleaved run."""
    jobs, batch = {}, cfg["batch"]
    for task in tasks:
        x, y = make_data(task, batch, 99, "train")
        for name in models:
            model = build_model(name, task, cfg, 0)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])

            def infer(m=model, x=x):
                m.eval()
                with torch.inference_mode():
                    m(x)

            def step(m=model, o=opt, x=x, y=y, task=task):
                m.train()
                o.zero_grad(set_to_none=True)
                loss_of(m, task, x, y).backward()
                o.step()

            jobs[f"{task}/{name}/infer"], jobs[f"{task}/{name}/train"] = infer, step
    return interleaved(jobs, rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (0 1 with --quick)")
    p.add_argument("--embed-dim", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--depth", type=int, default=None, help="default 4 (segmentors need at least 4)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (8 with --quick)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-train", type=int, default=None, help="default 8000 (64 with --quick)")
    p.add_argument("--n-test", type=int, default=None, help="default 500 (32 with --quick)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/evidence_runs", help="folder of the resumable runs file")
    p.add_argument("--figure", default="benchmarks/evidence.png")
    p.add_argument("--result", default=None,
                   help="result file for the results page (default benchmarks/results/evidence.json; none with "
                        "--quick)")
    p.add_argument("--quick", action="store_true", help="tiny setting: checks that it runs")
    p.add_argument("--train-only", action="store_true", help="train the missing runs and stop")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: time and report the finished runs (a model with fewer seeds says so)")
    args = p.parse_args(argv)
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)
    tasks = args.tasks or list(TASKS)
    models = args.models or list(MODELS)
    seeds = pick(args.seeds, [0, 1, 2], [0, 1])
    # "version": bump it when a task generator or the models change, so that old runs are not reused
    cfg = {"version": 2, "embed_dim": pick(args.embed_dim, 64, 16), "depth": pick(args.depth, 4, 4),
           "batch": pick(args.batch, 32, 8), "lr": args.lr, "n_train": pick(args.n_train, 8000, 64),
           "n_test": pick(args.n_test, 500, 32), "data_seed": args.data_seed,
           "steps": dict.fromkeys(TASKS, 8) if q else dict(STEPS)}
    rounds = pick(args.rounds, 7, 1)
    result_path = args.result if args.result is not None else (None if q else "benchmarks/results/evidence.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe(torch.get_num_threads())
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    # the runs file is named by the settings every run shares; a task's steps live in each run, so that a
    # new budget for one task retrains that task only
    shared = {k: v for k, v in cfg.items() if k != "steps"}
    digest = hashlib.sha1(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:10]
    runs_path = os.path.join(args.out, f"runs-{digest}.json")

    def current(found: dict) -> dict:
        return {k: r for k, r in found.items() if r.get("steps") == cfg["steps"][k.split("/")[0]]}

    runs = current(record_run(runs_path, shared))
    print(f"# LB where context is local: {', '.join(tasks)}; models {', '.join(models)}; seeds {seeds}")
    print(f"{machine}; torch {torch.__version__}; settings {json.dumps(cfg)}; runs file {runs_path}", flush=True)

    data, trained = {}, 0
    while not args.report_only:  # planned again after every run: the windows' task is known once the base runs are in
        todo = [k for k in plan(tasks, models, seeds, runs) if k not in runs]
        if not todo:
            break
        key = todo[0]
        task, name, seed = key.split("/")
        if task not in data:
            n = {"train": cfg["n_train"], "test": cfg["n_test"]}
            data[task] = {s: make_data(task, n[s], cfg["data_seed"] + off, s) for s, off in SPLIT_OFFSETS.items()}
        r = train_one(task, name, int(seed), cfg, data[task])
        runs = current(record_run(runs_path, shared, key, r))
        trained += 1
        print(f"trained {key}: score {r['score']:.3f} ({r['train_s']:.0f} s)", flush=True)
    planned = plan(tasks, models, seeds, runs)
    print(f"{sum(k in runs for k in planned) - trained} of {len(planned)} planned run(s) loaded from {runs_path}, "
          f"{trained} trained now", flush=True)
    if args.train_only:
        return 0

    finished = {(t, m): [s for s in seeds if f"{t}/{m}/{s}" in runs] for t in tasks for m in models}
    done = {key for key, got in finished.items() if got}
    times = throughput(tasks, [m for m in models if any((t, m) in done for t in tasks)], cfg, rounds)
    summary, batch = {}, cfg["batch"]
    for task in tasks:
        rows = {}
        for name in models:
            if (task, name) not in done:
                continue
            got = [runs[f"{task}/{name}/{s}"] for s in finished[(task, name)]]
            scores = [r["score"] for r in got]
            curves = [r["curve"] for r in got]
            rows[name] = {
                "timm_name": MODELS[name][0], **MODELS[name][1], "params": got[0]["params"],
                "seeds": finished[(task, name)], "scores": scores, "score_mean": statistics.fmean(scores),
                "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "curve_mean": {step: statistics.fmean(c[step] for c in curves) for step in curves[0]},
                "train_s_mean": statistics.fmean(r["train_s"] for r in got),
                "infer_img_s": batch / statistics.median(times[f"{task}/{name}/infer"]),
                "train_img_s": batch / statistics.median(times[f"{task}/{name}/train"])}
        front = {list(rows)[i] for i in pareto([(r["infer_img_s"], r["score_mean"]) for r in rows.values()])}
        for name, r in rows.items():
            r["pareto"] = name in front
        if rows:
            summary[task] = rows

    for task, rows in summary.items():
        what = "mIoU" if TASKS[task][0] == "seg" else "accuracy"
        print(f"\n## {task}: test {what} over the finished seeds, CPU images/s (batch {batch}, median of "
              f"{rounds} interleaved rounds)\n")
        print(f"| model | params | seeds | {what} (%) mean ± std | train (img/s) | infer (img/s) |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['params']:,} | {len(r['seeds'])} | {100 * r['score_mean']:.1f} ± "
                  f"{100 * r['score_std']:.1f} | {r['train_img_s']:.1f} | {r['infer_img_s']:.1f} |")
    if summary:
        plot(summary, args.figure, f"{machine}; {len(seeds)} seed(s)", key="score",
             ylabel="test mIoU / accuracy (%), mean ± std over seeds", reference=None)
        print(f"\nfigure: {args.figure}")
    report = {"machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(), "config": cfg,
              "seeds": seeds, "rounds": rounds, "window_task": window_task(runs, seeds),
              "missing": sorted(k for k in planned if k not in runs),
              "figure": args.figure, "wall_s": time.perf_counter() - started, "summary": summary}
    if result_path:
        write_result(result_path, "benchmarks/evidence.py", sys.argv[1:] if argv is None else argv, report)
        print(f"result file: {result_path}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
