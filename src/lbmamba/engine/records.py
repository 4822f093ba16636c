"""What a run shows and keeps of its progress, the same for every task: a progress bar while an epoch
runs (plain lines in a log file), one line per epoch on stderr, `metrics.jsonl` (one JSON object per
epoch) and `curves.png` in the run folder, a CSV (`metrics.csv`) or TensorBoard (`tensorboard/`) copy
of the figures, and `summary.json` with the final figures (which the command also prints as its last
stdout line)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from .errors import UserError
from .files import jsonable, write_csv, write_json, write_jsonl
from .plots import Panel, plot_curves, preload
from .runs import SUMMARY

__all__ = ["RunRecord", "LOGS", "progress", "read_jsonl"]

#: the other logs a run can keep of its figures (`log` key)
LOGS = ("csv", "tensorboard")


class _LineProgress:
    """Progress for a log file (stderr is not a terminal): a plain line at most every `interval` seconds,
    never the carriage returns and escape codes of a bar."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int], desc: str, interval: float = 60.0):
        self.iterable, self.desc, self.interval = iterable, desc, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix(self, **values):
        self.postfix = "  ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and (self.total is None or self.n < self.total):
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            rate = self.n / max(now - self.start, 1e-9)
            print(f"{self.desc}: {self.n}{of} ({rate:.3g}/s) {self.postfix}".rstrip(), file=sys.stderr, flush=True)


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", enabled: bool = True):
    """Progress on stderr: a tqdm bar that disappears when done on a terminal, a plain line a minute in a
    log file, nothing when not `enabled`."""
    from tqdm import tqdm

    if enabled and not sys.stderr.isatty():
        return _LineProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                disable=not enabled)


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """The records of a JSON-lines file (none when it does not exist; a damaged line is skipped)."""
    records = []
    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunRecord:
    """The per-epoch record of a run in `folder` (rank 0 only: other ranks pass `enabled=False`).

    Args:
        panels: the subplots of curves.png (see `plots.Panel`).
        title: the figure's title.
        group: a record key that splits the curves (MIL's "fold").
        keep: on resume, which records of the existing metrics.jsonl stay (those the checkpoint covers);
            None starts the file afresh.
        shown: the record keys printed in the line per epoch.
        log: also keep the figures as "csv" (metrics.csv) or "tensorboard" (event files in tensorboard/,
            one step per record); None: metrics.jsonl only.
        x: the record key the curves are drawn against ("epoch", or "iter" for iteration-based runs).
    """

    def __init__(self, folder: str, panels: Sequence[Panel], title: str = "", group: Optional[str] = None,
                 keep: Optional[Callable[[Mapping[str, Any]], bool]] = None, shown: Sequence[str] = (),
                 enabled: bool = True, log: Optional[str] = "csv", x: str = "epoch"):
        self.metrics_path = os.path.join(folder, "metrics.jsonl")
        self.csv_path = os.path.join(folder, "metrics.csv")
        self.plot_path = os.path.join(folder, "curves.png")
        self.summary_path = os.path.join(folder, SUMMARY)
        self.panels, self.title, self.group, self.shown, self.enabled = panels, title, group, tuple(shown), enabled
        self.log, self.x = log, x
        self.records: List[Dict[str, Any]] = [r for r in read_jsonl(self.metrics_path) if keep(r)] if keep else []
        self._tensorboard = None
        if not enabled:
            return
        try:
            preload()
        except Exception as exc:  # a figure must never stop a run
            print(f"warning: matplotlib does not load, no curves.png: {exc}", file=sys.stderr, flush=True)
        write_jsonl(self.metrics_path, self.records)  # a resumed run drops the epochs after its checkpoint
        if log == "csv":
            self._write_csv()
        elif log == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise UserError("log=tensorboard needs the tensorboard package: pip install tensorboard") from exc
            # purge_step: a resumed run drops the steps its checkpoint does not cover
            self._tensorboard = SummaryWriter(os.path.join(folder, "tensorboard"),
                                              purge_step=self._last_step() + 1 if keep else None)

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(k for r in self.records for k in r))
        write_csv(self.csv_path, [columns] + [[r.get(c, "") for c in columns] for r in self.records])

    def _last_step(self) -> int:
        """The TensorBoard step of the last record: its iteration in iteration-based runs, else the count."""
        if self.x != "epoch" and self.records:
            return int(self.records[-1][self.x])
        return len(self.records)

    def _write_tensorboard(self, record: Mapping[str, Any]) -> None:
        prefix = f"{self.group}{record[self.group]}/" if self.group else ""
        for key, value in record.items():
            if key not in (self.x, self.group) and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tensorboard.add_scalar(prefix + key, value, global_step=self._last_step())
        self._tensorboard.flush()

    def add(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's figures (None values left out), redraw the curves, print the epoch's line."""
        if not self.enabled:
            return
        record = {k: v for k, v in jsonable(record).items() if v is not None}
        self.records.append(record)
        write_jsonl(self.metrics_path, self.records)
        if self.log == "csv":
            self._write_csv()
        elif self._tensorboard is not None:
            self._write_tensorboard(record)
        try:
            plot_curves(self.records, self.plot_path, self.panels, self.title, self.group, self.x)
        except Exception as exc:  # a figure must never stop a run
            print(f"warning: could not draw {self.plot_path}: {exc}", file=sys.stderr, flush=True)
        line = [f"{k} {_shown(record[k])}" for k in self.shown if k in record]
        print("  ".join(line), file=sys.stderr, flush=True)

    def finish(self, result: Mapping[str, Any]) -> None:
        """Write summary.json with the run's final figures."""
        if self.enabled:
            write_json(self.summary_path, result)
        if self._tensorboard is not None:
            self._tensorboard.close()
