"""Each command's shipped default, run as a new user runs it: its final score and its wall time.

    python benchmarks/defaults.py                      # train, mil train, seg train, det train (about 20 min
                                                       # on an idle 2-core CPU); finished commands are kept
    python benchmarks/defaults.py --tasks train mil    # some of them

Each command runs in a fresh process (`python -m lbmamba <command> --output <folder>`, nothing else given),
with the default thread rule, in a temporary folder removed afterwards. Its last stdout line (the JSON
every command prints) gives the figures; the headline score is the one its README line quotes. A finished
command is written into the result file at once (`--result`, default benchmarks/results/defaults.json), so
an interrupted run keeps what finished; a rerun runs only the commands the file lacks (`--again` reruns
the chosen ones).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(1, HERE)

from machine import provenance, read_result, write_result  # noqa: E402  (after the path set-up)

#: task -> the command's words after `lbmamba`, and the figures its README line quotes
TASKS = {
    "train": (["train"], ["val_top1"]),
    "mil": (["mil", "train"], ["auc_mean", "f1_mean", "acc_mean"]),
    "seg": (["seg", "train"], ["val_mIoU", "val_mAcc"]),
    "det": (["det", "train"], ["val_box_AP50", "val_box_AP", "val_mask_AP"]),
}


def find(figures: dict, key: str):
    """figures[key], looked for in nested dicts too (commands nest their final evaluation)."""
    if key in figures:
        return figures[key]
    for value in figures.values():
        if isinstance(value, dict):
            got = find(value, key)
            if got is not None:
                return got
    return None


def run_default(task: str) -> dict:
    words, keys = TASKS[task]
    with tempfile.TemporaryDirectory(prefix=f"lbmamba-default-{task}-") as folder:
        cmd = [sys.executable, "-m", "lbmamba", *words, "--output", os.path.join(folder, "run")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "src"),
                                                            os.environ.get("PYTHONPATH", "")])}
        start, load_before = time.perf_counter(), os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
        wall = time.perf_counter() - start
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # 1-min load average before and after
    command = "lbmamba " + " ".join(words)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return {"command": command, "error": f"exit {proc.returncode}: {tail}", "wall_s": wall, "load": load}
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    scores = {k: float(find(figures, k)) for k in keys if isinstance(find(figures, k), (int, float))}
    return {"command": command, "scores": scores, "wall_s": wall, "load": load, "figures": figures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--result", default=os.path.join(HERE, "results", "defaults.json"))
    p.add_argument("--again", action="store_true", help="rerun the chosen commands even when the file has them")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    for task in args.tasks:
        done = (read_result(args.result) or {}).get("data", {}).get("tasks", {})
        if task in done and not args.again:
            print(f"{task}: kept from {args.result}")
            continue
        row = run_default(task)
        stamp = provenance([], "")
        row.update(commit=stamp["commit"], date=stamp["date"])
        print(f"{task}: {row.get('scores', row.get('error'))}, {row['wall_s']:.0f} s", flush=True)
        old = (read_result(args.result) or {}).get("data", {"tasks": {}})
        tasks = {**old.get("tasks", {}), task: row}
        write_result(args.result, "benchmarks/defaults.py", argv, {"tasks": tasks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
