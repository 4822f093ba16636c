"""The thread rule every command shares (`threads: null`), on a machine with synthetic load."""

from __future__ import annotations

import os

import pytest
import torch

from lbmamba.engine import device
from lbmamba.engine.distributed import session


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine whose per-core busy share over the sample is set by the test."""
    load = {}

    def cpu_times(cpus):
        calls["n"] += 1
        if calls["n"] % 2:  # before the sample
            return dict.fromkeys(sorted(cpus), (0, 0))
        return {cpu: (int(100 * load.get(cpu, 0.0)), 100) for cpu in sorted(cpus)}

    calls = {"n": 0}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(device, "_cpu_times", cpu_times)
    monkeypatch.setattr(device.time, "sleep", lambda s: None)
    return load


def test_idle_machine_uses_every_core(two_cores):
    assert device.idle_cores() == pytest.approx(2.0)
    assert device.default_threads() == 2


def test_busy_core_is_left_to_the_other_job(two_cores):
    two_cores[1] = 0.97  # another process spins on core 1
    assert device.default_threads() == 1


def test_never_fewer_than_one_thread(two_cores):
    two_cores.update({0: 1.0, 1: 1.0})
    assert device.default_threads() == 1


def test_torchrun_processes_share_the_cores(two_cores):
    two_cores.update({0: 1.0, 1: 1.0})  # the other local process starting up: not counted as load
    assert device.default_threads(local_processes=2) == 1


def test_without_proc_stat_every_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(device, "_cpu_times", lambda cpus: None)
    assert device.default_threads() == 3


def test_real_proc_stat_reads_this_machine():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this OS")
    idle = device.idle_cores(0.05)
    assert idle is not None and 0.0 <= idle <= device.usable_cores() + 1e-6


def test_session_applies_the_rule(two_cores, monkeypatch, restore_globals):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    two_cores[0] = 1.0
    with session("cpu", None, "test"):
        assert torch.get_num_threads() == 1
    with session("cpu", 2, "test"):  # an explicit count wins
        assert torch.get_num_threads() == 2
