"""benchmarks/scan_cpu.py: `--skip` for every variant (a whole variant or one kind; an unknown name is an error),
and a skipped job is neither run nor printed."""

import argparse
from pathlib import Path

import pytest

from conftest import load_script, one_thread  # noqa: F401  (one_thread: the tests fixture, shared)

SCRIPT = Path(__file__).resolve().parents[1] / "scan_cpu.py"


@pytest.fixture
def bench(monkeypatch):
    return load_script(SCRIPT, monkeypatch)


def test_skip_takes_a_variant_or_one_kind_and_names_the_known_ones(bench):
    parser = argparse.ArgumentParser()
    assert bench.skipped_jobs(["torch.fwd", "seq_ref", "exp"], parser) == {"torch.fwd", "seq_ref.fwd",
                                                                          "seq_ref.fwd_bwd", "exp.fwd"}
    assert bench.skipped_jobs(["torch.fwd,seq_ref", "exp"], parser) == {"torch.fwd", "seq_ref.fwd",
                                                                       "seq_ref.fwd_bwd", "exp.fwd"}
    for bad in ("nope", "lb.backward", "exp.fwd_bwd"):
        with pytest.raises(SystemExit):
            bench.skipped_jobs([bad], parser)


@pytest.mark.usefixtures("one_thread")
def test_skipped_jobs_are_not_run(bench, monkeypatch):
    monkeypatch.setattr(bench, "variants", lambda: {"lb": bench.lbmamba_scan("auto"), "w1": bench.lbmamba_scan(1)})
    times = bench.bench_shape((1, 4, 16, 4), rounds=2, slow_rounds=1, skip={"lb.fwd", "exp.fwd", "w1.fwd_bwd"})
    assert set(times) == {("w1", "fwd"), ("lb", "fwd_bwd")} and all(len(v) == 2 for v in times.values())
    assert bench.ratio(times, "lb", "w1", "fwd") is None
