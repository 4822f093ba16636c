"""benchmarks/seg_cpu.py: its quick run writes every number (LBVim-T and Vim-T segmentors) and the ratio line
(slow: `pytest -m slow`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "seg_cpu.py"


@pytest.mark.slow
def test_the_cpu_benchmark_quick_run_writes_its_numbers(tmp_path):
    out = tmp_path / "seg.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"LBVim-T", "Vim-T"}
    for row in report["models"].values():
        assert row["params_m"] > 20 and row["gflops"] > row["gflops_counted"] > 0
        assert row["infer_img_s"] > 0 and row["train_img_s"] > 0
    assert "LBVim-T / Vim-T inference" in proc.stdout
