"""How many CPU threads the bundled demos should use: `lbmamba eval` on the digits and `lbmamba mil train`
(one fold) with 1 and with 2 threads, on an idle machine and with one core kept busy by another process.

    PYTHONPATH=src python benchmarks/demo_threads.py [--repeats 3]

Each run is its own process (as users start them); the figures are the commands' own: eval images/s and
mil train wall_s. Runs alternate between the thread counts; medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def _lbmamba(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "lbmamba", *args, "--no-progress"], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="lbmamba-demo-threads-")
    checkpoint = _lbmamba("train", "--epochs", "2", "--output", os.path.join(work, "digits"))["checkpoint"]
    results = {}
    for load in ("idle", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            for r in range(args.repeats):
                for threads in ("1", "2"):
                    ev = _lbmamba("eval", "--checkpoint", checkpoint, "--threads", threads)
                    mil = _lbmamba("mil", "train", "--fold-indices", "0", "--epochs", "4", "--stop-epoch", "4",
                                   "--threads", threads, "--output", os.path.join(work, f"mil-{load}-{r}-{threads}"))
                    results.setdefault((load, threads), []).append((ev["images_per_s"], mil["wall_s"]))
        finally:
            if busy is not None:
                busy.kill()
    print(f"{'machine':8} {'threads':>7} {'eval images/s':>14} {'mil train s':>12}")
    for (load, threads), rows in results.items():
        print(f"{load:8} {threads:>7} {statistics.median(r[0] for r in rows):14.0f} "
              f"{statistics.median(r[1] for r in rows):12.1f}")


if __name__ == "__main__":
    main()
