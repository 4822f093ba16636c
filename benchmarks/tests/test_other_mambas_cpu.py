"""benchmarks/other_mambas_cpu.py: its scan counter (against models_cpu.py's formula for Vim / LBVim, and
that it puts the op back), and its quick run for two families, with every field of its JSON (slow:
`pytest -m slow`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import lbmamba.nn.mixer as mixer_module
from conftest import load_script, one_thread  # noqa: F401  (one_thread: the tests fixture, shared)
from lbmamba.ops import selective_scan_fn

SCRIPT = Path(__file__).resolve().parents[1] / "other_mambas_cpu.py"

MODEL_FIELDS = {"family", "variant", "timm_name", "params_m", "gflops_counted", "gflops_scan", "gflops", "scan_calls",
                "scans", "infer_img_s", "train_img_s", "infer_times_s", "train_times_s"}
FAMILY_FIELDS = {"original", "lb", "gflops_ratio", "infer_time_ratio", "infer_time_ratios", "infer_met",
                 "train_time_ratio", "train_time_ratios", "train_met"}
TOP_FIELDS = {"machine", "torch", "timm", "backend", "threads", "img_size", "batch", "rounds", "quick", "target",
              "families", "models"}


@pytest.fixture
def bench(monkeypatch):
    return load_script(SCRIPT, monkeypatch)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "lbvim_tiny_patch16_224"])
def test_the_scan_counter_agrees_with_the_vim_formula_and_restores_the_op(bench, name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, embed_dim=32, depth=3).eval()
    counted = bench.count_flops(model, 64)
    models_cpu = sys.modules["models_cpu"]
    assert counted["gflops_scan"] * 1e9 == pytest.approx(models_cpu.scan_flops(model, 1, 64), rel=1e-12)
    assert counted["scan_calls"] == 3 * (2 if name.startswith("vim") else 1)  # Vim: two scans per layer
    assert mixer_module.selective_scan_fn is selective_scan_fn  # the wrapper is gone again
    assert sys.modules["lbmamba.ops"].selective_scan_fn is selective_scan_fn


def test_a_model_without_visible_scans_is_refused(bench):
    with pytest.raises(RuntimeError, match="no selective_scan_fn call was seen"):
        bench.count_flops(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)), 8)


@pytest.mark.slow
def test_the_quick_run_writes_every_number(tmp_path):
    out = tmp_path / "other.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--models", "plainmamba", "adventurer",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == TOP_FIELDS
    assert (report["img_size"], report["batch"], report["rounds"], report["threads"], report["quick"]) == (
        64, 2, 1, 1, True)
    assert set(report["families"]) == {"plainmamba", "adventurer"}
    assert set(report["models"]) == {"PlainMamba-L1", "LB-PlainMamba-L1", "Adventurer-T", "LB-Adventurer-T"}
    for row in report["models"].values():
        assert set(row) == MODEL_FIELDS
        assert row["params_m"] > 5 and row["gflops"] > row["gflops_counted"] > 0 and row["gflops_scan"] > 0
        assert row["infer_img_s"] > 0 and row["train_img_s"] > 0
        assert len(row["infer_times_s"]) == len(row["train_times_s"]) == 1
        assert row["scan_calls"] == sum(s["calls"] for s in row["scans"]) > 0
        windows = {s["window"] for s in row["scans"]}
        assert windows == ({1} if row["variant"] == "original" else {4})  # "auto" at 16 patches (+1 token): W = 4
    for family, row in report["families"].items():
        assert set(row) == FAMILY_FIELDS
        orig, lb = report["models"][row["original"]], report["models"][row["lb"]]
        assert orig["family"] == lb["family"] == family
        assert orig["params_m"] == lb["params_m"] and orig["gflops_counted"] == pytest.approx(lb["gflops_counted"])
        assert row["gflops_ratio"] > 1  # the LB window recurrence: more scan FLOPs, nothing else
        assert row["infer_met"] == (row["infer_time_ratio"] <= report["target"])
        assert row["train_met"] == (row["train_time_ratio"] <= report["target"])
    assert "| plainmamba |" in proc.stdout and "| adventurer |" in proc.stdout
    assert report["machine"] in proc.stdout
