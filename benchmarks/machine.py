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


def vector_width() -> str:
    """The widest x86 vector extension the CPU reports ("AVX-512", "AVX2", ...), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return platform.machine() or "unknown"


def provenance(args, script: str) -> dict:
    """Where a result file comes from: the command, the git commit (with "+dirty" when the tree has
    changes), the UTC date, the CPU and its vector width, and the load average (1, 5, 15 min) as it ends:
    above the cores' count, other jobs shared the machine and times are slower than an idle one's."""
    import shlex
    from datetime import datetime, timezone

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"command": shlex.join(["python", script, *args]), "commit": commit,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_name(),
            "vector_width": vector_width(), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def write_result(path: str, script: str, args, data: dict) -> str:
    """Write a result file for the results page (benchmarks/report.py): {"benchmark": the script's name,
    the provenance (command, commit, date, CPU), "data": data}, atomically."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    from lbmamba.engine.files import write_json

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    name = os.path.splitext(os.path.basename(script))[0]
    write_json(path, {"benchmark": name, **provenance(list(args), script), "data": data})
    return path


def read_result(path: str):
    """A result file's contents, or None when there is none."""
    import json

    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
