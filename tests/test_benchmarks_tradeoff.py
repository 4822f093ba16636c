"""benchmarks/tradeoff.py: its generated tasks (deterministic for a seed, balanced, the two halves of a
digit pair independent of the label alone), its Pareto front, and its quick run (JSON line, tables,
figure) run twice into one folder: the second run resumes (loads every finished run, trains none)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tradeoff.py"

TOP_FIELDS = {"machine", "torch", "timm", "threads", "quick", "config", "tasks", "models", "seeds", "rounds",
              "runs_file", "loaded", "trained", "figure", "wall_s", "summary", "runs"}
ROW_FIELDS = {"timm_name", "params", "seeds", "test_accs", "acc_mean", "acc_std", "val_acc_mean", "train_s_mean",
              "infer_img_s", "train_img_s", "infer_times_s", "train_times_s", "pareto", "window"}


@pytest.fixture
def bench(monkeypatch):
    """The benchmark module, imported here; sys.path and the modules it brings in are put back afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("tradeoff", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in set(sys.modules) - before:
        if name == "machine":
            del sys.modules[name]


@pytest.mark.parametrize("task", ["pairs", "pathfinder"])
def test_the_tasks_are_deterministic_and_balanced(bench, task):
    x1, y1 = bench.make_task(task, 400, 7)
    x2, y2 = bench.make_task(task, 400, 7)
    x3, _ = bench.make_task(task, 400, 8)
    assert x1.shape == ((400, 1, 32, 64) if task == "pairs" else (400, 1, 32, 32))
    assert bool((x1 == x2).all()) and bool((y1 == y2).all())
    assert not bool((x1 == x3).all())
    assert 0.4 < float(y1.float().mean()) < 0.6
    assert float(x1.min()) == -1.0 and float(x1.max()) == 1.0


def test_the_two_tasks_draw_different_labels_from_one_seed(bench):
    assert not bool((bench.make_task("pairs", 200, 0)[1] == bench.make_task("pathfinder", 200, 0)[1]).all())


def test_the_digits_of_a_pair_sit_in_the_two_halves(bench):
    x, _ = bench.make_pairs(50, 0)
    assert (x[:, :, :, :32].reshape(50, -1).max(1) > 0).all() and (x[:, :, :, 32:].reshape(50, -1).max(1) > 0).all()


def test_pathfinder_marks_two_points(bench):
    x, _ = bench.make_pathfinder(50, 0)
    assert ((x == 1.0).reshape(50, -1).sum(1) >= 2).all()  # two 3x3 marks (clipped at a border, or overlapping)
    assert ((x == 0.6).reshape(50, -1).sum(1) > 10).all()  # the dashed paths


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


def test_the_quick_run_reports_every_number_and_resumes(tmp_path):
    stdout, report = _run(tmp_path)
    assert set(report) == TOP_FIELDS
    assert report["quick"] is True and report["tasks"] == ["pairs", "pathfinder"]
    assert report["models"] == ["lbvim", "uvim"] and len(report["seeds"]) >= 2
    n_runs = 2 * 2 * len(report["seeds"])
    assert (report["trained"], report["loaded"]) == (n_runs, 0) and len(report["runs"]) == n_runs
    assert json.loads((tmp_path / "out.json").read_text()) == report
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for task in ("pairs", "pathfinder"):
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
    for task in ("pairs", "pathfinder"):
        for name in ("lbvim", "uvim"):
            assert report2["summary"][task][name]["acc_mean"] == report["summary"][task][name]["acc_mean"]
