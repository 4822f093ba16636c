"""docs/results.md, the one-page summary of what lbmamba measures, made from the result files in
benchmarks/results/ (one JSON file per benchmark run, each with its command, commit, machine and date).

    python benchmarks/report.py            # writes docs/results.md
    python benchmarks/report.py --check    # exits 1 when docs/results.md is not what the files make

Result files (written by the benchmarks with their --result option; `machine.write_result`):

    models_cpu.json   benchmarks/models_cpu.py    LBVim-T / uVim-T / Vim-T: params, GFLOPs, CPU images/s
    scan_cpu.json     benchmarks/scan_cpu.py      the scan at the LBVim-T layer shape, every CPU variant
    defaults.json     benchmarks/defaults.py      each command's shipped default: its score and wall time
    evidence.json     benchmarks/evidence.py      LB where context is local: segmentation and classification
    tradeoff.json     benchmarks/tradeoff.py      LB where context is global: two classification tasks
    tradeoff_other_mambas.json                    the other vision Mambas against their LB versions
    export.json       benchmarks/export.py        ONNX export: nodes, size, latency in onnxruntime
    gpu.json          benchmarks/gpu_check.py     anything measured on a GPU

A missing file makes its section say so and why, instead of a number. Numbers are the files' own; the
page only rounds them and states, for each comparison, whether LB helps, ties or loses, by a rule
written out on the page.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PAGE = os.path.join(HERE, "..", "docs", "results.md")
NOTEBOOK = "../benchmarks/RESULTS.md"

#: the paper's own figures (arXiv 2506.15976, abstract), marked as the paper's wherever shown
PAPER = {
    "imagenet": "LBVim: +0.8 to +1.6 points top-1 over the Mamba backbones it is compared with, at the same throughput",
    "ade20k": "+0.6 to +2.7 mIoU at the same throughput",
    "coco": "+0.9 box AP, +1.1 mask AP",
    "other_mambas": "+0.5 to +3.4 points top-1 for VMamba, LocalVim, PlainMamba and Adventurer with the LB scan",
    "mil": "LB-MambaMIL over MambaMIL: up to 3.06 % AUC, 3.39 % F1, 1.67 % accuracy (relative) on three WSI sets",
}
#: published ImageNet-1K top-1 of the reference models (each model's own paper)
PUBLISHED_TOP1 = {"Vim-T": "76.1 % (Vim paper)"}

#: why a section has no numbers when its file is missing
MISSING = {
    "models_cpu.json": "not measured yet: run `python benchmarks/models_cpu.py --result "
                       "benchmarks/results/models_cpu.json`",
    "scan_cpu.json": "not measured yet: run `python benchmarks/scan_cpu.py --sections big --shapes lbvim_t_layer "
                     "--result benchmarks/results/scan_cpu.json`",
    "defaults.json": "not measured yet: run `python benchmarks/defaults.py`",
    "evidence.json": "not measured yet: run `python benchmarks/evidence.py`",
    "tradeoff.json": "not measured yet: run `python benchmarks/tradeoff.py`",
    "export.json": "not measured yet: run `python benchmarks/export.py --result benchmarks/results/export.json`",
    "gpu.json": "not measured: no GPU has been lent to this project's sessions yet (`benchmarks/gpu_check.py` is "
                "ready for one)",
}


def load(folder: str) -> dict:
    """{file name: parsed result} for every *.json in `folder`."""
    found = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found[name] = json.load(f)
    return found


def source(result: dict) -> str:
    """One line saying where a result comes from."""
    load = result.get("load_average")
    busy = f", load average {load[0]:.1f}" if load else ""
    return (f"*`{result.get('command', '?')}`, commit {result.get('commit', '?')}, {result.get('cpu', '?')} "
            f"({result.get('vector_width', '?')}, {result.get('cores', '?')} cores{busy}), "
            f"{result.get('date', '?')}.*")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def label(model: str) -> str:
    """A study's model name as the page shows it: the window variants spelled out (they are not timm names)."""
    base, _, window = model.partition("_w")
    return f"{base}, window {window}" if base == "lbvim" and window.isdigit() else model


def table(header, rows) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def opening(results: dict, title: str, name: str):
    """A section's heading lines and its result file (None, with the lines saying why, when there is none)."""
    res = results.get(name)
    return ([f"## {title}", ""] + ([] if res is not None else [MISSING[name], ""])), res


def verdict(a: dict, b: dict) -> str:
    """LB model `a` against `b` (each with scores over seeds): "helps" / "loses" when the mean difference is
    more than twice its standard error (Welch), else "ties"; with the difference in points."""
    sa, sb = a["scores"], b["scores"]
    diff = a["mean"] - b["mean"]
    var = (a["std"] ** 2 / len(sa) if len(sa) > 1 else 0.0) + (b["std"] ** 2 / len(sb) if len(sb) > 1 else 0.0)
    se = math.sqrt(var)
    word = "ties" if abs(diff) <= 2 * se or not se and not diff else ("helps" if diff > 0 else "loses")
    return f"{word} ({diff * 100:+.1f} points, ± {2 * se * 100:.1f})"


def scored(rows: dict, mean_key: str, std_key: str, scores_key: str) -> dict:
    return {m: {"mean": r[mean_key], "std": r[std_key], "scores": r[scores_key]} for m, r in rows.items()}


# ----------------------------------------------------------------------------------------------- sections
def models_section(results: dict) -> list:
    out, res = opening(results, "Models", "models_cpu.json")
    gpu = results.get("gpu.json")
    if res is None:
        return out
    rows = []
    for label, r in res["data"]["rows"].items():
        infer = r["infer"]
        rows.append([label, f"{r['params'] / 1e6:.2f}", f"{(r['mm_flops'] + r['scan_flops']) / 1e9:.2f}",
                     " / ".join(f"{infer[b]:.1f}" for b in sorted(infer, key=int)), f"{r['train']:.1f}",
                     "see below" if gpu else "not measured: no GPU", PUBLISHED_TOP1.get(label, "–")])
    batches = " / ".join(f"b{b}" for b in sorted(next(iter(res["data"]["rows"].values()))["infer"], key=int))
    out += table(["model", "params (M)", "GFLOPs / image (224 px)", f"CPU inference img/s ({batches})",
                  f"CPU training img/s (b{res['data']['train_batch']})", "GPU img/s", "published top-1 (ImageNet)"],
                 rows)
    out += ["", source(res), "", "GFLOPs: matmuls and convolutions counted by PyTorch, the scan added by formula. "
            f"The paper's: {PAPER['imagenet']}. "
            "ImageNet accuracy is not measured here (no data set or GPU time).", ""]
    if gpu is None:
        out += [f"GPU: {MISSING['gpu.json']}.", ""]
    return out


def scan_section(results: dict) -> list:
    out, res = opening(results, "The scan", "scan_cpu.json")
    if res is None:
        return out
    for entry in res["data"]["shapes"].values():
        ms = entry["median_ms"]
        names = {"lb": "lbmamba cpu, LB (window auto)", "w1": "lbmamba cpu, window 1", "bi": "two window-1 scans "
                 "(Vim's cost)", "torch": "lbmamba torch backend, LB", "seq_ref": "sequential PyTorch loop "
                 "(mamba_ssm's reference)", "mambapy": "mambapy's parallel scan"}
        rows = []
        for key, label in names.items():
            fwd, both = ms.get(f"{key}.fwd"), ms.get(f"{key}.fwd_bwd")
            if fwd is None and both is None:
                why = "not installed here (`pip install mambapy`)" if key == "mambapy" else "skipped in this run"
                rows.append([label, why, "–", "–"])
                continue
            rel = f"{fwd / ms['lb.fwd']:.2f}x" if fwd and ms.get("lb.fwd") else "–"
            rows.append([label, f"{fwd:.2f}" if fwd else "–", f"{both:.2f}" if both else "–", rel])
        out += [f"Shape (batch, dim, L, N) = {tuple(entry['shape'])}, {res['data']['threads']} thread(s):", ""]
        out += table(["variant", "forward ms", "forward + backward ms", "forward time / LB's"], rows)
        ratios = entry["ratios"]
        out += ["", f"LB / window 1: {ratios['lb/w1 fwd']:.2f} forward, {ratios['lb/w1 fwd+bwd']:.2f} forward + "
                "backward (medians of per-round ratios).", ""]
    return out + [source(res), ""]


def defaults_section(results: dict) -> list:
    out, res = opening(results, "Each command's shipped default", "defaults.json")
    if res is None:
        return out
    rows = []
    for r in res["data"]["tasks"].values():
        if "error" in r:
            rows.append([f"`{r['command']}`", f"failed: {r['error']}", "–", "–", r["date"]])
        else:
            rows.append([f"`{r['command']}`", ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items()),
                         f"{r['wall_s'] / 60:.1f} min", " / ".join(f"{x:.1f}" for x in r["load"]),
                         f"{r['date']}, {r['commit']}"])
    for task, why in res["data"].get("not_run", {}).items():
        rows.append([f"`{task}`", f"not run: {why}", "–", "–", "–"])
    out += table(["command", "score (its validation / test split)", "wall time", "load before / after", "run at"],
                 rows)
    out += ["", f"Each command with nothing but `--output`, the default thread rule deciding its threads. A load "
            f"average above the machine's {res.get('cores', '?')} cores means other jobs shared it, and the wall "
            "time is longer than on an idle machine."]
    return out + ["", source(res), ""]


def evidence_section(results: dict) -> list:
    out, res = opening(results, "Does LB help where context is local?", "evidence.json")
    if res is None:
        return out
    data = res["data"]
    out += ["LBVim against uVim (the same model with window 1: a one-way scan with flips) and Vim (two scans per "
            f"layer), width {data['config']['embed_dim']}, depth {data['config']['depth']}, patch 4 on 32 x 32 "
            f"images, {len(data['seeds'])} seeds; segmentors are UperNet on the backbone. Tasks are described in "
            "`benchmarks/evidence.py` and `benchmarks/local_tasks.py`: `capped_bars` and `marked_bar` are built "
            "so that a label needs cells on both sides within four patches. Score: test mIoU (segmentation) or "
            "accuracy (classification), mean ± std over seeds; the learning curve is the mean score after a "
            "quarter, a half and three quarters of the steps.", "",
            "Why a one-way scan with flips should do worse here: in each layer it gives a token the context on one "
            "side only. The other side arrives a layer later, after the flip, and only through the state the "
            "tokens ahead of it kept, which their recurrence has meanwhile mixed with everything else in the row "
            "and the rows before. An LB scan gives every token both sides within its window in every layer; Vim "
            "does too, at twice the scan's cost.", ""]
    tally, at = {}, len(out)  # other model -> verdict -> tasks, for the summary line put before the tables
    for task, rows in data["summary"].items():
        what = "mIoU" if task != "marked_bar" else "accuracy"
        table_rows = [[label(m), f"{r['params']:,}", len(r["scores"]),
                       f"{pct(r['score_mean'])} ± {pct(r['score_std'])}",
                       " / ".join(pct(v) for _, v in sorted(r["curve_mean"].items(), key=lambda kv: int(kv[0]))),
                       f"{r['train_img_s']:.0f}", f"{r['infer_img_s']:.0f}"] for m, r in rows.items()]
        out += [f"**{task}** ({data['config']['steps'][task]} steps of {data['config']['batch']} images)", ""]
        out += table(["model", "params", "seeds", f"{what} (%)", "learning curve (%)", "train img/s",
                      "infer img/s"], table_rows)
        s = scored(rows, "score_mean", "score_std", "scores")
        lines = []
        for other in ("uvim", "vim"):
            if "lbvim" in s and other in s:
                said = verdict(s["lbvim"], s[other])
                lines.append(f"LB against {other}: {said}")
                tally.setdefault(other, {}).setdefault(said.split()[0], []).append(task)
        early = [f"{m} {pct(r['curve_mean'][min(r['curve_mean'], key=int)])} %" for m, r in rows.items()
                 if m in ("lbvim", "uvim", "vim")]
        out += ["", "; ".join(lines) + "." if lines else "",
                f"After a quarter of the steps: {', '.join(early)}.", ""]
    if tally:
        said = ["; ".join(f"LB against {other}: {word} on {', '.join(tasks)}" for word, tasks in words.items())
                for other, words in tally.items()]
        spans = []
        for task, rows in data["summary"].items():
            windows = [r["score_mean"] for m, r in rows.items() if m == "lbvim" or m.startswith("lbvim_w")]
            if len(windows) > 1:
                spans.append(f"{pct(max(windows) - min(windows))} points on {task}")
        span = f" LBVim's windows 2 to 16 lie within {', '.join(spans)}." if spans else ""
        out[at:at] = [f"**In short**: {'. '.join(said)}.{span}", ""]
    if data.get("missing"):
        out += [f"Not run yet: {', '.join(data['missing'])} (the study is resumable: rerun its command).", ""]
    out += [f"Figure: `{data['figure']}`. The paper's dense-prediction claim: ADE20K {PAPER['ade20k']}; COCO "
            f"{PAPER['coco']}.", "", source(res), ""]
    return out


def tradeoff_section(results: dict) -> list:
    out, res = opening(results, "Does LB help where context is global?", "tradeoff.json")
    if res is None:
        return out
    out += ["Two generated classification tasks where the label depends on a cue up to seven cells away "
            "(`benchmarks/tradeoff.py`); test accuracy, mean ± std over seeds.", ""]
    for name in ("tradeoff.json", "tradeoff_other_mambas.json"):
        res = results.get(name)
        if res is None:
            continue
        for task, rows in res["data"]["summary"].items():
            table_rows = [[label(m), f"{r['params']:,}", f"{pct(r['acc_mean'])} ± {pct(r['acc_std'])}",
                           f"{r['train_img_s']:.0f}", f"{r['infer_img_s']:.0f}"] for m, r in rows.items()]
            out += [f"**{task}**" + (" (other vision Mambas)" if name != "tradeoff.json" else ""), ""]
            out += table(["model", "params", "accuracy (%)", "train img/s", "infer img/s"], table_rows)
            s = scored(rows, "acc_mean", "acc_std", "test_accs")
            # LBVim against uVim and Vim; each other Mamba's LB version against the original (same lr)
            pairs = [("lbvim", "uvim"), ("lbvim", "vim"), ("lbvim", "vim@0.001")]
            pairs += [(m, m[3:]) for m in rows if m.startswith("lb_")]
            lines = [f"{a} against {b}: {verdict(s[a], s[b])}" for a, b in pairs if a in s and b in s]
            out += ["", "; ".join(lines) + "." if lines else "", "", source(res), ""]
    if "tradeoff_other_mambas.json" not in results:
        out += ["The other vision Mambas against their LB versions: no result file yet (their runs are in "
                "`benchmarks/tradeoff_runs/`, their numbers in the notebook): `python benchmarks/tradeoff.py --models "
                "other-mambas --figure benchmarks/tradeoff_other_mambas.png --result "
                "benchmarks/results/tradeoff_other_mambas.json` times them and writes it.", ""]
    out += ["Vim at the shared learning rate fails to learn these tasks on some seeds (at half of it, it learns the "
            "digits but not the cue), so LB's wins over Vim here say more about training stability at this scale "
            "than about context.", "",
            f"The paper's: ImageNet {PAPER['imagenet']}; {PAPER['other_mambas']}.", ""]
    return out


def export_section(results: dict) -> list:
    out, res = opening(results, "Deployment (ONNX)", "export.json")
    if res is None:
        return out
    data, rows = res["data"], []
    for r in data.get("models", []):
        latency = [" / ".join(f"{r[f'{job}_ms_b{b}']:.0f}" if f"{job}_ms_b{b}" in r else "–"
                              for job in ("eager", "ort_fp32", "ort_int8")) for b in (1, 8)]
        share = r.get("ort_fp32_profile_b1", {}).get("dense_share")
        rows.append([f"{r['model']} ({r['img_size']} px)", f"{r['export_s']:.0f} / {r['export_cpu_s']:.0f}",
                     f"{r['nodes']:,}", f"{r['mb']:.1f} / {r['int8_mb']:.1f}", f"{r['rel_error']:.0e}", *latency,
                     f"{100 * share:.0f} %" if share is not None else "–"])
    out += table(["model", "export s (wall / CPU)", "nodes", "MB fp32 / int8", "error vs PyTorch",
                  "batch 1 ms: eager / ort fp32 / ort int8", "batch 8 ms: eager / ort fp32 / ort int8",
                  "MatMul share of ort time"], rows)
    digits = data.get("digits")
    if digits:
        out += ["", f"int8 on the shipped default ({digits['train_epochs']} epochs, {digits['images']} held-out "
                f"digits): top-1 {digits['top1_ort_fp32']:.2f} % in onnxruntime fp32, {digits['top1_ort_int8']:.2f} "
                f"% int8 (PyTorch {digits['val_top1_train']:.2f} %)."]
    load = data.get("load_at_start")
    if load and load[0] > (res.get("cores") or 1):
        out += ["", f"Measured while other jobs shared the machine (load average {load[0]:.1f} at the start): "
                "latencies, eager's above all, are slower than on an idle machine; rerun for the targets."]
    out += ["", "Why int8 barely helps the Mambas: onnxruntime spends most of their time in the scan's elementwise "
            "graph, which stays fp32 (the last column); details in `docs/deploy.md`."]
    return out + ["", source(res), ""]


def render(results: dict) -> str:
    lines = ["# Results", "",
             "What lbmamba measures, on one page. It is made by `python benchmarks/report.py` from the result "
             "files in `benchmarks/results/` (one per benchmark run, each naming its command, commit, machine and "
             "date); do not edit it by hand. How each number was measured, the history and the dead ends are in "
             f"the notebook, [`benchmarks/RESULTS.md`]({NOTEBOOK}). Figures marked as the paper's come from the "
             "LBMamba paper (arXiv 2506.15976) and were not measured here.", "",
             "Verdicts: LB *helps* or *loses* when the mean difference over seeds is more than twice its standard "
             "error, and *ties* otherwise (the ± after a difference is that margin).", ""]
    for section in (models_section, scan_section, defaults_section, evidence_section, tradeoff_section,
                    export_section):
        lines += section(results)
    lines += [f"MIL: the paper's {PAPER['mil']}; here only the demo's figure above (no WSI data sets can be "
              "downloaded on the machines this project runs on).", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=RESULTS, help="folder of result files")
    p.add_argument("--page", default=PAGE, help="the page to write")
    p.add_argument("--check", action="store_true", help="exit 1 when the page differs from what the files make")
    args = p.parse_args(argv)
    text = render(load(args.results))
    if args.check:
        current = open(args.page, encoding="utf-8").read() if os.path.exists(args.page) else ""
        if current != text:
            print(f"{args.page} is not what {args.results} makes: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    with open(args.page, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
