"""benchmarks/gpu_check.py: its dry run (the GPU checks' code path at toy sizes, on the CPU, Triton's
kernels run by its interpreter), with every part of its JSON report (slow: `pytest -m slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[1]
SRC = BENCHMARKS.parent / "src"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["environment"]["dry_run"] is True
    assert report["checks_ok"] is True, json.dumps(report["checks"], indent=1)[-3000:]
    assert report["timings"] and report["targets"]
    assert all(set(row["ms"]) >= {"triton_lb", "triton_w1", "triton_bi"} for row in report["timings"])
    # the models' code path (toy sizes): every classifier and segmentor timed in both precisions
    models = report["models"]
    assert set(models["classifiers"]) == {"lbvim_tiny_patch16_224", "uvim_tiny_patch16_224", "vim_tiny_patch16_224"}
    assert set(models["segmentors"]) == {"lbvim_tiny_patch16_224", "vim_tiny_patch16_224"}
    for per_precision in [*models["classifiers"].values(), *models["segmentors"].values()]:
        assert set(per_precision) == {"fp32", "bf16"}
        assert all(r["forward_ms"] > 0 and r["train_step_ms"] > 0 for r in per_precision.values()), per_precision
    assert any("segmentor inference" in t["name"] for t in report["targets"])
