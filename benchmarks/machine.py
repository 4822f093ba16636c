"""What the benchmarks share: the machine's name, and a second job that keeps one core busy."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
import time
from typing import Iterator

#: the other job of a "busy" machine: one process spinning on a core, as a second user's job would
SPINNER = "while True: pass"


def timed(fn) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(jobs, rounds, seed=0):
    """Seconds per call of each job over `rounds` rounds, in a fresh order each round (after one untimed
    warm-up round), so that drift in the machine's speed hits every job alike."""
    times = {name: [] for name in jobs}
    order = list(jobs)
    shuffle = random.Random(seed).shuffle
    for r in range(rounds + 1):
        shuffle(order)
        for name in order:
            dt = timed(jobs[name])
            if r:
                times[name].append(dt)
    return times


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(threads: int) -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread(s)"


@contextlib.contextmanager
def busy(on: bool = True) -> Iterator[None]:
    """Run the block with one other CPU-bound process on the machine (nothing when `on` is false)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", SPINNER])
    time.sleep(0.5)  # let it start spinning
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmRSS": now, "VmHWM": the peak), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Set the peak-RSS counter (VmHWM) back to the current RSS, and return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes("VmRSS")
