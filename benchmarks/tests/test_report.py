"""benchmarks/report.py: the results page from a small fixture set of result files (tables, verdicts, what
a missing file says), and the committed docs/results.md is what the committed result files make."""

import json
from pathlib import Path

import pytest

from conftest import load_script

HERE = Path(__file__).resolve().parents[1]
SCRIPT = HERE / "report.py"
STAMP = {"command": "python benchmarks/x.py", "commit": "abc1234", "date": "2026-12-08 02:00 UTC", "cpu": "Test CPU",
         "vector_width": "AVX2", "cores": 2, "load_average": [1.5, 1.2, 1.0]}


@pytest.fixture
def report(monkeypatch):
    return load_script(SCRIPT, monkeypatch)


def row(scores, **extra):
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
    return {"params": 1000, "scores": scores, "score_mean": mean, "score_std": std, "train_img_s": 50.0,
            "infer_img_s": 200.0, "curve_mean": {"10": 0.2, "5": 0.1, "15": 0.3}, **extra}


def write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps({"benchmark": name[:-5], **STAMP, "data": data}))


def test_page_from_fixture_files(report, tmp_path):
    write(tmp_path, "evidence.json", {
        "config": {"embed_dim": 64, "depth": 4, "batch": 32, "steps": {"capped_bars": 20}}, "seeds": [0, 1, 2],
        "figure": "benchmarks/evidence.png",
        "missing": ["digit_scenes/vim/2"],
        "summary": {"capped_bars": {"lbvim": row([0.90, 0.91, 0.92]),
                                    "uvim": row([0.80, 0.81, 0.79]),
                                    "vim": row([0.90, 0.93, 0.91])}}})
    write(tmp_path, "models_cpu.json", {"train_batch": 8, "rows": {
        "LBVim-T": {"params": 6.42e6, "mm_flops": 2.356e9, "scan_flops": 0.376e9, "infer": {"8": 28.9, "32": 28.5},
                    "train": 7.5},
        "Vim-T": {"params": 7.15e6, "mm_flops": 2.586e9, "scan_flops": 0.523e9, "infer": {"8": 17.5, "32": 16.2},
                  "train": 4.5}}})
    write(tmp_path, "defaults.json", {"tasks": {
        "train": {"command": "lbmamba train", "scores": {"val_top1": 99.4}, "wall_s": 120.0, "load": [0.5, 1.0],
                  "date": "2026-12-08 02:03 UTC", "commit": "abc1234"}}})
    page = report.render(report.load(str(tmp_path)))
    assert page.startswith("# Results\n")
    assert "**capped_bars** (20 steps of 32 images)" in page
    assert "| lbvim | 1,000 | 3 | 91.0 ± 1.0 | 10.0 / 20.0 / 30.0 | 50 | 200 |" in page
    assert "LB against uvim: helps (+11.0 points" in page  # 11 points against a margin of about 2
    assert "LB against vim: ties (-0.3 points" in page
    assert "**In short**: LB against uvim: helps on capped_bars. LB against vim: ties on capped_bars." in page
    assert "After a quarter of the steps: lbvim 10.0 %, uvim 10.0 %, vim 10.0 %." in page
    assert "Not run yet: digit_scenes/vim/2" in page
    assert "| LBVim-T | 6.42 | 2.73 | 28.9 / 28.5 | 7.5 | not measured: no GPU | – |" in page
    assert "| Vim-T | 7.15 | 3.11 | 17.5 / 16.2 | 4.5 | not measured: no GPU | 76.1 % (Vim paper) |" in page
    assert "| `lbmamba train` | val_top1 99.400 | 2.0 min | 0.5 / 1.0 | 2026-12-08 02:03 UTC, abc1234 |" in page
    assert "*`python benchmarks/x.py`, commit abc1234, Test CPU (AVX2, 2 cores, load average 1.5), 2026-12-08" in page
    # sections without a file say so and how to make it
    assert "run `python benchmarks/scan_cpu.py" in page and "run `python benchmarks/tradeoff.py`" in page
    assert "no GPU has been lent" in page


def test_verdict_rule(report):
    same = {"mean": 0.5, "std": 0.0, "scores": [0.5, 0.5, 0.5]}
    better = {"mean": 0.6, "std": 0.01, "scores": [0.59, 0.6, 0.61]}
    noisy = {"mean": 0.6, "std": 0.2, "scores": [0.4, 0.6, 0.8]}
    assert report.verdict(better, same).startswith("helps (+10.0 points")
    assert report.verdict(same, better).startswith("loses (-10.0 points")
    assert report.verdict(noisy, same).startswith("ties (+10.0 points")


def test_committed_page_is_what_the_committed_files_make(report):
    page = HERE.parent / "docs" / "results.md"
    assert page.read_text(encoding="utf-8") == report.render(report.load(str(HERE / "results"))), \
        "docs/results.md is stale: run python benchmarks/report.py"
