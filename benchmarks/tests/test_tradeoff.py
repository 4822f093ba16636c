"""benchmarks/tradeoff.py: its generated tasks (deterministic for a seed, every class, labels that follow
the rule read back from the drawn cells), its model table, its shared runs file, its Pareto front, and its
quick run (JSON line, tables, figure) run twice into one folder: the second run resumes (loads every
finished run, trains none; slow: `pytest -m slow`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "tradeoff.py"

TOP_FIELDS = {"machine", "torch", "timm", "threads", "quick", "config", "tasks", "models", "seeds", "rounds",
              "runs_file", "loaded", "trained", "figure", "wall_s", "summary", "runs"}
ROW_FIELDS = {"timm_name", "lr", "params", "seeds", "test_accs", "acc_mean", "acc_std", "val_acc_mean", "train_s_mean",
              "infer_img_s", "train_img_s", "infer_times_s", "train_times_s", "pareto", "window"}


@pytest.fixture
def bench(monkeypatch):
    return load_script(SCRIPT, monkeypatch)


@pytest.mark.parametrize("task", ["cued", "cued_rows"])
def test_the_tasks_are_deterministic_and_cover_every_class(bench, task):
    x1, y1 = bench.make_task(task, 400, 7)
    x2, y2 = bench.make_task(task, 400, 7)
    x3, _ = bench.make_task(task, 400, 8)
    assert x1.shape == ((400, 1, 32, 64) if task == "cued" else (400, 1, 64, 32)) and y1.dtype == torch.int64
    assert bool((x1 == x2).all()) and bool((y1 == y2).all())
    assert not bool((x1 == x3).all())
    assert set(y1.tolist()) == set(range(10)) and max(torch.bincount(y1).tolist()) < 0.2 * 400
    assert float(x1.min()) == -1.0 and float(x1.max()) == 1.0


def _cells(image):
    """{(row, col): the cell's 8 x 8 pixels in [0, 1]} for the cells of a (1, H, W) image that hold ink."""
    pix = (image[0] + 1) / 2
    rows, cols = pix.shape[0] // 8, pix.shape[1] // 8
    return {(r, c): pix[8 * r:8 * r + 8, 8 * c:8 * c + 8] for r in range(rows) for c in range(cols)
            if float(pix[8 * r:8 * r + 8, 8 * c:8 * c + 8].max()) > 0}


def _digit_class(bench, cell):
    """The class of the scikit-learn digit drawn in `cell` (the generator copies them unchanged)."""
    imgs, classes = bench._digits()
    match = (torch.from_numpy(imgs) - cell).abs().flatten(1).max(1).values < 1e-6
    assert bool(match.any())
    return set(classes[match.numpy()].tolist())


@pytest.mark.parametrize("task", ["cued", "cued_rows"])
def test_the_label_is_the_digit_the_far_cue_selects(bench, task):
    x, y = bench.make_task(task, 60, 3)
    across = 1 if task == "cued" else 0  # the grid axis the halves and the cue lines run along
    cues = {True: torch.from_numpy(bench._cue(True)), False: torch.from_numpy(bench._cue(False))}
    for image, label in zip(x, y.tolist()):
        cells = _cells(image)
        cue = [rc for rc in cells if rc[across] in (0, 7)]
        first = [rc for rc in cells if 1 <= rc[across] <= 3]
        second = [rc for rc in cells if 4 <= rc[across] <= 6]
        assert len(cue) == 1 and len(first) == 1 and len(second) == 1 and len(cells) == 3
        horizontal = torch.equal(cells[cue[0]], cues[True])
        assert horizontal or torch.equal(cells[cue[0]], cues[False])
        assert label in _digit_class(bench, cells[first[0]] if horizontal else cells[second[0]])


def test_a_model_entry_may_carry_its_own_learning_rate(bench):
    import argparse

    cfg = {"lr": 2e-3}
    assert bench.split_lr("vim", cfg) == ("vim", 2e-3) and bench.split_lr("vim@0.001", cfg) == ("vim", 1e-3)
    assert bench.parse_entry("vim@1e-3") == "vim@1e-3" and bench.parse_entry("other-mambas") == "other-mambas"
    for bad, message in (("vm@0.1", "unknown model 'vm'"), ("vim@fast", "positive learning rate"),
                         ("vim@-1", "positive learning rate"), ("vim@", "positive learning rate")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            bench.parse_entry(bad)


def test_processes_sharing_a_runs_file_keep_each_others_runs(bench, tmp_path):
    path = str(tmp_path / "runs.json")
    assert bench.record_run(path, {"a": 1}) == {}
    bench.record_run(path, {"a": 1}, "cued/lbvim/0", {"test_acc": 0.9})
    runs = bench.record_run(path, {"a": 1}, "cued_rows/lbvim/0", {"test_acc": 0.8})  # "another process"
    assert runs == {"cued/lbvim/0": {"test_acc": 0.9}, "cued_rows/lbvim/0": {"test_acc": 0.8}}
    assert json.loads(Path(path).read_text()) == {"config": {"a": 1}, "runs": runs}


def test_the_two_tasks_draw_different_labels_from_one_seed(bench):
    assert not bool((bench.make_task("cued", 200, 0)[1] == bench.make_task("cued_rows", 200, 0)[1]).all())


def test_model_groups_and_matched_sizes(bench):
    cfg = {"embed_dim": 32, "depth": 2, "patch": 8}
    assert set(bench.GROUPS["vim-family"]) == {"lbvim", "uvim", "vim", "lbvim_w2", "lbvim_w8", "lbvim_w16", "vim@0.001"}
    assert len(bench.GROUPS["other-mambas"]) == 8
    lrs = dict(bench.split_lr(entry, {"lr": 2e-3}) for entry in bench.GROUPS["other-mambas"])
    assert all(lrs[name] == lrs["lb_" + name] for name in ("vmamba", "localvim", "plainmamba", "adventurer"))
    sizes = {name: sum(p.numel() for p in bench.build_model(name, "cued", cfg, 0).parameters())
             for name in ("lbvim", "uvim", "lbvim_w8", "vmamba", "lb_vmamba", "adventurer", "lb_adventurer")}
    assert sizes["lbvim"] == sizes["uvim"] == sizes["lbvim_w8"]  # matched width and depth
    assert sizes["vmamba"] == sizes["lb_vmamba"] and sizes["adventurer"] == sizes["lb_adventurer"]
    out = bench.build_model("lb_plainmamba", "cued_rows", cfg, 0)(torch.zeros(2, 1, 64, 32))
    assert out.shape == (2, 10)


def test_the_pareto_front(bench):
    pts = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (3.0, 0.5), (0.5, 0.9)]
    assert bench.pareto(pts) == [0, 1, 3]
    assert bench.pareto([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # ties: neither beats the other


def _run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "runs"),
                           "--figure", str(tmp_path / "fig.png"), "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_quick_run_reports_every_number_and_resumes(tmp_path):
    stdout, report = _run(tmp_path)
    assert set(report) == TOP_FIELDS
    assert report["quick"] is True and report["tasks"] == ["cued", "cued_rows"]
    assert report["models"] == ["lbvim", "uvim"] and len(report["seeds"]) >= 2
    n_runs = 2 * 2 * len(report["seeds"])
    assert (report["trained"], report["loaded"]) == (n_runs, 0) and len(report["runs"]) == n_runs
    assert json.loads((tmp_path / "out.json").read_text()) == report
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for task in ("cued", "cued_rows"):
        assert f"## {task}:" in stdout
        rows = report["summary"][task]
        assert set(rows) == {"lbvim", "uvim"}
        for name, row in rows.items():
            assert set(row) == (ROW_FIELDS if name == "lbvim" else ROW_FIELDS - {"window"})  # uvim: window 1 built in
            assert row["params"] > 0 and row["infer_img_s"] > 0 and row["train_img_s"] > 0
            assert 0 <= row["acc_mean"] <= 1 and row["acc_std"] >= 0 and len(row["test_accs"]) == len(report["seeds"])
            assert f"| {name} | {row['params']:,} |" in stdout
        assert any(row["pareto"] for row in rows.values())
    assert rows["lbvim"]["params"] == rows["uvim"]["params"]  # matched width and depth
    assert "| model | params | test acc (%) mean ± std | train (img/s) | infer (img/s) | Pareto |" in stdout
    runs_file = Path(report["runs_file"])
    assert set(json.loads(runs_file.read_text())["runs"]) == set(report["runs"])

    stdout2, report2 = _run(tmp_path)
    assert (report2["trained"], report2["loaded"]) == (0, n_runs)
    assert "resumed:" in stdout2 and stdout2.count("loaded ") >= n_runs
    assert report2["runs"] == report["runs"]  # the same numbers, read back
    for task in ("cued", "cued_rows"):
        for name in ("lbvim", "uvim"):
            assert report2["summary"][task][name]["acc_mean"] == report["summary"][task][name]["acc_mean"]
