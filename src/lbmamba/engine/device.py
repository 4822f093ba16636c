"""Which device a command runs on, and how many CPU threads it uses."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, Iterator, Optional, Tuple

import torch

from .config import Key
from .errors import UserError

__all__ = ["resolve_device", "set_cpu_threads", "threads_warning", "ThreadFollower",
            "cpu_threads", "threads_key", "default_threads", "autocast",
           "grad_scaler", "AMP_MODES"]

#: mixed-precision settings every training command takes (null: fp32)
AMP_MODES = ("bf16", "fp16")


def resolve_device(name: Optional[str] = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> the LOCAL_RANK-th GPU when CUDA is available, else the CPU; 'cuda' -> cuda:LOCAL_RANK;
    'cpu', 'cuda:N', 'mps' as they are. Makes a CUDA device the current one."""
    text = (name or "auto").lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda":
        text = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available (use device=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    return device


def threads_key() -> Key:
    """The `threads` key every command has."""
    return Key(None, "CPU threads per process; null: the cores other processes leave idle when the command starts "
                     "(watched for 0.2 s; under torchrun: cores / local processes), at least 1, and during training "
                     "the idle cores again every 2 s (a job that takes or frees cores changes the count); a "
                     "number: fixed", kind="int",
               positive=True, flag=True, effect="none")


#: how long a command watches the machine's load before it chooses its thread count
LOAD_SAMPLE_S = 0.2


def _cpu_times(cpus) -> Optional[Dict[int, Tuple[int, int]]]:
    """{cpu: (busy, total) jiffies} from /proc/stat for these CPUs; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy = user + nice + system + irq + softirq + steal
        times[int(name[3:])] = (busy, busy + idle + iowait)
    return times or None


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def idle_cores(sample_s: float = LOAD_SAMPLE_S) -> Optional[float]:
    """How many of this process's cores other processes leave idle, watched for `sample_s` seconds (this
    process sleeps meanwhile); None where the load cannot be read (no /proc/stat)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times(cpus) or {}
    idle = 0.0
    for cpu, (busy0, total0) in before.items():
        busy1, total1 = after.get(cpu, (busy0, total0))
        elapsed = total1 - total0
        idle += 1.0 - (busy1 - busy0) / elapsed if elapsed > 0 else 1.0
    return idle


def default_threads(local_processes: int = 1) -> int:
    """The thread count of `threads: null`, for every command: the cores that other processes leave idle
    when the command starts, at least 1; under torchrun, the cores shared among the local processes
    (they start together, so each would see the others as load).

    Why (benchmarks/RESULTS.md, 2-core machine): on an idle machine two threads ran the LBVim-T training
    step faster than one; beside another CPU-bound job one thread was faster than two (torch's own
    ops wait for a thread that has to share its core), for the demos and the big models alike.
    """
    cores = usable_cores()
    if local_processes > 1:
        return max(1, cores // local_processes)
    idle = idle_cores()
    return cores if idle is None else max(1, min(cores, int(idle + 0.5)))


def threads_warning(threads: int, idle: Optional[float] = None) -> Optional[str]:
    """The line an explicit `threads` above the cores other processes leave idle gets (None: it fits): such
    threads wait for cores another job holds, so a step can take many times longer (about 20x measured on a
    2-core machine beside one busy process: 10.8 s against 0.71 s with one thread). `idle`: as `idle_cores`."""
    if threads <= 1:
        return None
    idle = idle_cores() if idle is None else idle
    if idle is None:
        return None
    free = max(1, int(idle + 0.5))
    if threads <= free:
        return None
    return (f"warning: threads {threads}, but only {free} of this machine's {usable_cores()} cores are idle now "
            f"(other processes use the rest); threads that share a core with another job wait for it, which can make "
            f"each step many times slower (about 20x measured on a 2-core machine): leave threads unset or use {free}")


#: how often a run whose thread count the rule chose looks at the machine again (seconds of wall time), and how
#: many looks in a row must ask for the same new count before it changes (one burst of load changes nothing)
FOLLOW_EVERY_S = 2.0
FOLLOW_AGREE = 2


class ThreadFollower:
    """`threads: null` during a run: the thread count follows the cores other processes leave idle.

    Decided once at the start, a run keeps two threads when a CPU-bound job arrives later, and then each of
    its steps waits for a core the other job holds (a detection run's steps went from 1.2 s to 5-7 s on a
    2-core machine). So after its steps the loop calls `after_step()`; every `every_s` seconds it measures
    what other processes used since the last look (the machine's busy time from /proc/stat minus this
    process's own CPU time) and, when `agree` looks in a row ask for the same other count, sets it.
    `decisions` lists (idle cores seen, threads wanted, threads set) per look, for logs and tests.
    `sample` (for tests): a function returning (wall s, busy jiffies, total jiffies, own CPU s), or None.
    """

    def __init__(self, threads: int, every_s: float = FOLLOW_EVERY_S, agree: int = FOLLOW_AGREE,
                 sample=None, announce=None):
        self.cores, self.threads, self.every_s, self.agree = usable_cores(), int(threads), every_s, agree
        self.sample, self.announce = sample or _machine_sample, announce
        self.decisions = []
        self._last, self._looked, self._wanted, self._votes = self.sample(), time.monotonic(), None, 0

    def others_busy(self, before, after) -> Optional[float]:
        """Cores other processes kept busy between two samples (None: no time passed)."""
        wall, busy, total = after[0] - before[0], after[1] - before[1], after[2] - before[2]
        if wall <= 0 or total <= 0:
            return None
        return max(0.0, busy / total * self.cores - (after[3] - before[3]) / wall)

    def after_step(self) -> Optional[int]:
        """Look again when it is time; the new thread count when it changed it, else None."""
        if self._last is None or time.monotonic() - self._looked < self.every_s:
            return None
        now, self._looked = self.sample(), time.monotonic()
        others = self.others_busy(self._last, now) if now is not None else None
        self._last = now
        if others is None:
            return None
        idle = self.cores - others
        wanted = max(1, min(self.cores, int(idle + 0.5)))
        self._votes = self._votes + 1 if wanted == self._wanted else 1
        self._wanted = wanted
        changed = wanted != self.threads and self._votes >= self.agree
        if changed:
            before, self.threads = self.threads, wanted
            set_cpu_threads(wanted)
            if self.announce:
                self.announce(f"threads {before} -> {wanted}: other processes keep {others:.1f} of the "
                              f"{self.cores} cores busy")
        self.decisions.append((round(idle, 2), wanted, self.threads))
        return wanted if changed else None


def _machine_sample() -> Optional[Tuple[float, int, int, float]]:
    """(wall s, busy jiffies, total jiffies of this process's CPUs, this process's CPU s); None without /proc."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    times = _cpu_times(os.sched_getaffinity(0))
    if times is None:
        return None
    own = os.times()
    return (time.monotonic(), sum(b for b, _ in times.values()), sum(t for _, t in times.values()),
            own.user + own.system)


def set_cpu_threads(threads: int) -> None:
    """Threads for torch's CPU kernels; the cpu scan backend follows torch's count on every call."""
    torch.set_num_threads(threads)


@contextlib.contextmanager
def cpu_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with `threads` CPU threads (None: as they are), and restore the count after it."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    set_cpu_threads(threads)
    try:
        yield
    finally:
        set_cpu_threads(before)


def autocast(device: torch.device, amp: Optional[str]):
    """torch.autocast to bf16 / fp16 on `device`, or nothing for amp=None (fp32)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device: torch.device, amp: Optional[str]) -> "torch.amp.GradScaler":
    """A loss scaler, enabled for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
