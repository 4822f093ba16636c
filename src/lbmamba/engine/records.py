"""What a run shows and keeps of its progress, the same for every task: a progress bar while an epoch
runs, one line per epoch on stderr, `metrics.jsonl` (one JSON object per epoch) and `curves.png` in the
run folder, and `summary.json` with the final figures (which the command also prints as its last stdout
line)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from .files import jsonable, write_json, write_jsonl
from .plots import Panel, plot_curves

__all__ = ["RunRecord", "progress", "read_jsonl"]


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", enabled: bool = True):
    """A tqdm bar on stderr that disappears when done (a no-op wrapper when not `enabled`)."""
    from tqdm import tqdm

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
    """

    def __init__(self, folder: str, panels: Sequence[Panel], title: str = "", group: Optional[str] = None,
                 keep: Optional[Callable[[Mapping[str, Any]], bool]] = None, shown: Sequence[str] = (),
                 enabled: bool = True):
        self.metrics_path = os.path.join(folder, "metrics.jsonl")
        self.plot_path = os.path.join(folder, "curves.png")
        self.summary_path = os.path.join(folder, "summary.json")
        self.panels, self.title, self.group, self.shown, self.enabled = panels, title, group, tuple(shown), enabled
        self.records: List[Dict[str, Any]] = [r for r in read_jsonl(self.metrics_path) if keep(r)] if keep else []
        if enabled:
            write_jsonl(self.metrics_path, self.records)  # a resumed run drops the epochs after its checkpoint

    def add(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's figures (None values left out), redraw the curves, print the epoch's line."""
        if not self.enabled:
            return
        record = {k: v for k, v in jsonable(record).items() if v is not None}
        self.records.append(record)
        write_jsonl(self.metrics_path, self.records)
        try:
            plot_curves(self.records, self.plot_path, self.panels, self.title, self.group)
        except Exception as exc:  # a figure must never stop a run
            print(f"warning: could not draw {self.plot_path}: {exc}", file=sys.stderr, flush=True)
        line = [f"{k} {_shown(record[k])}" for k in self.shown if k in record]
        print("  ".join(line), file=sys.stderr, flush=True)

    def finish(self, result: Mapping[str, Any]) -> None:
        """Write summary.json with the run's final figures."""
        if self.enabled:
            write_json(self.summary_path, result)
