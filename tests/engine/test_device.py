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


# ------------------------------------------------------------------ the rule during a run
class _Machine:
    """Samples of a 2-core machine: each look, 10 s pass; `others` cores busy with other jobs, `own` with us."""

    def __init__(self):
        self.wall = self.busy = self.own = 0.0
        self.others, self.own_cores = 0.0, 1.0

    def sample(self):
        self.wall += 10.0
        self.busy += 100 * 10.0 * min(2.0, self.others + self.own_cores)  # jiffies at 100 Hz, over both cores
        self.own += 10.0 * self.own_cores
        return (self.wall, int(self.busy), int(self.wall * 100 * 2), self.own)


@pytest.fixture
def follower(monkeypatch, restore_globals):
    machine = _Machine()
    rule = device.ThreadFollower(1, every_s=0, sample=machine.sample, announce=(said := []).append)
    rule.cores = 2
    return rule, machine, said


def test_a_run_takes_the_cores_that_free_up_and_gives_back_those_another_job_takes(follower):
    rule, machine, said = follower
    assert rule.after_step() is None and rule.threads == 1  # one look asking for 2 is not enough
    assert rule.after_step() == 2 and torch.get_num_threads() == 2
    machine.others, machine.own_cores = 1.0, 1.0  # a CPU-bound job arrives: we keep only our share
    assert rule.after_step() is None
    assert rule.after_step() == 1 and torch.get_num_threads() == 1
    machine.others = 0.0  # it ends
    rule.after_step()
    assert rule.after_step() == 2
    assert [wanted for _, wanted, _ in rule.decisions] == [2, 2, 1, 1, 2, 2]
    assert said == ["threads 1 -> 2: other processes keep 0.0 of the 2 cores busy",
                    "threads 2 -> 1: other processes keep 1.0 of the 2 cores busy",
                    "threads 1 -> 2: other processes keep 0.0 of the 2 cores busy"]


def test_one_burst_of_load_changes_nothing(follower):
    rule, machine, _ = follower
    rule.after_step(), rule.after_step()
    for others in (1.0, 0.0, 1.0, 0.0):  # never two looks in a row asking for the same other count
        machine.others = others
        assert rule.after_step() is None
    assert rule.threads == 2


def test_only_the_rule_follows_the_machine_an_explicit_count_stays(two_cores, monkeypatch, restore_globals):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with session("cpu", None, "test") as info:
        assert isinstance(info.follower, device.ThreadFollower)
    with session("cpu", 2, "test") as info:
        assert info.follower is None


def test_the_real_machine_sees_a_stand_in_load():
    """Another process spinning on one core shows as about one core other processes keep busy."""
    import subprocess
    import sys
    import time

    if device._machine_sample() is None:
        pytest.skip("no /proc/stat on this OS")
    rule = device.ThreadFollower(1, every_s=0)
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        before = device._machine_sample()
        time.sleep(1.0)  # this process sleeps: what is busy is the load (and whatever else runs here)
        others = rule.others_busy(before, device._machine_sample())
    finally:
        load.kill()
        load.wait()
    assert others is not None and others >= 0.5
