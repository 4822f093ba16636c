"""benchmarks/evidence.py and benchmarks/defaults.py: the study's plan (base models first, the windows on the
segmentation task with the largest LB - uVim gap, decided from the runs file), its digit scenes, one short
training run per kind of task with its learning curve; defaults.py keeps finished commands."""

import json
from pathlib import Path

import pytest
import torch

from conftest import load_script

HERE = Path(__file__).resolve().parents[1]


@pytest.fixture
def ev(monkeypatch):
    return load_script(HERE / "evidence.py", monkeypatch)


def fake_runs(gaps: dict, seeds=(0, 1, 2)) -> dict:
    """Finished lbvim and uvim runs on the segmentation tasks with the given lbvim - uvim gaps."""
    runs = {}
    for task, gap in gaps.items():
        for s in seeds:
            runs[f"{task}/uvim/{s}"] = {"score": 0.5}
            runs[f"{task}/lbvim/{s}"] = {"score": 0.5 + gap}
    return runs


def test_plan_puts_base_models_first_and_windows_where_lb_gains_most(ev):
    tasks, models, seeds = list(ev.TASKS), list(ev.MODELS), [0, 1, 2]
    keys = ev.plan(tasks, models, seeds, {})
    # nothing finished: the three models on every task, seed by seed, then the windows on marked_bar only
    assert keys[:3] == ["digit_scenes/lbvim/0", "digit_scenes/uvim/0", "digit_scenes/vim/0"]
    assert len(keys) == 3 * 3 * 3 + 3 * 3
    assert {k.split("/")[0] for k in keys if k.split("/")[1] in ev.WINDOW_MODELS} == {"marked_bar"}
    # one segmentation task finished: it gets the windows
    assert ev.window_task(fake_runs({"capped_bars": 0.02}), seeds) == "capped_bars"
    # both finished: the larger gap wins; windows already run on the other task stay planned
    runs = fake_runs({"capped_bars": 0.02, "digit_scenes": 0.05})
    assert ev.window_task(runs, seeds) == "digit_scenes"
    runs["capped_bars/lbvim_w2/0"] = {"score": 0.5}
    windowed = {k.split("/")[0] for k in ev.plan(tasks, models, seeds, runs) if k.split("/")[1] in ev.WINDOW_MODELS}
    assert windowed == {"digit_scenes", "capped_bars", "marked_bar"}
    assert ev.window_task(fake_runs({"capped_bars": 0.02}, seeds=(0,)), seeds) is None  # seeds 1, 2 missing


def test_digit_scenes_in_memory(ev):
    x, y = ev.make_data("digit_scenes", 6, 1, "train")
    assert x.shape == (6, 3, 32, 32) and y.shape == (6, 32, 32) and y.dtype == torch.int64
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and int(y.max()) <= 10 and (y > 0).any()
    assert torch.equal(ev.make_data("digit_scenes", 6, 1, "train")[1], y)
    assert not torch.equal(ev.make_data("digit_scenes", 6, 1, "test")[1], y)  # other digits, other scenes


@pytest.mark.parametrize("task", ["capped_bars", "marked_bar"])
def test_one_short_run_records_its_score_and_curve(ev, task):
    cfg = {"embed_dim": 16, "depth": 4, "batch": 4, "lr": 2e-3, "steps": {task: 4}}
    data = {"train": ev.make_data(task, 8, 0, "train"), "test": ev.make_data(task, 8, 1, "test")}
    r = ev.train_one(task, "lbvim", 0, cfg, data)
    assert r["task"] == task and r["model"] == "lbvim" and 0 <= r["score"] <= 1
    assert sorted(r["curve"]) == [1, 2, 3] and all(0 <= v <= 1 for v in r["curve"].values())
    assert r["params"] == sum(p.numel() for p in ev.build_model("lbvim", task, cfg, 0).parameters())


def test_defaults_keeps_finished_commands(monkeypatch, tmp_path):
    defaults = load_script(HERE / "defaults.py", monkeypatch)
    ran = []

    def fake(task):
        ran.append(task)
        return {"command": f"lbmamba {task}", "scores": {"x": 1.0}, "wall_s": 1.0, "load": [0.1, 0.2],
                "figures": {"nested": {"x": 1.0}}}

    monkeypatch.setattr(defaults, "run_default", fake)
    path = tmp_path / "defaults.json"
    defaults.main(["--tasks", "train", "--result", str(path)])
    defaults.main(["--tasks", "train", "mil", "--result", str(path)])
    assert ran == ["train", "mil"]
    stored = json.loads(path.read_text())
    assert stored["benchmark"] == "defaults" and set(stored["data"]["tasks"]) == {"train", "mil"}
    assert {"command", "commit", "date", "cpu", "vector_width"} <= set(stored)
    assert defaults.find({"a": {"b": {"c": 3}}}, "c") == 3 and defaults.find({"a": 1}, "c") is None
