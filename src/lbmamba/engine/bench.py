"""Throughput and memory of classifiers: the LBMamba paper's protocol.

Inference: random input at `img_size` (224) px, batch 128 on a GPU (8 on the CPU by default), fp32,
`torch.no_grad()`, `warmup` untimed passes, then `iters` timed passes (100 on a GPU); the GPU is
synchronised before the clock starts and stops. images/s = batch x iters / seconds.
Training: forward + backward + AdamW step on random labels, same batch, timed the same way.
Peak memory, over the timed passes (after the warm-up): torch.cuda.max_memory_allocated() above what
was allocated before them (GPU), or the peak resident set size above the RSS before them (CPU, sampled
every 2 ms from /proc, after handing freed heap pages back to the OS with malloc_trim).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .classification import check_model_name
from .config import ConfigTable, Key
from .device import threads_key
from .errors import UserError, user_errors
from .files import write_json
from .plots import plot_throughput
from .records import progress
from .runs import Run, note, open_run

__all__ = ["BENCH", "bench", "benchmark_model", "read_accuracies"]


class _RssPeak:
    """Peak RSS increase of this process while the `with` block runs (Linux /proc; else ru_maxrss)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm", "r") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def increase(self) -> int:
        return max(self.peak - self.base, 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so that the RSS
    growth during a phase reflects what that phase allocates."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Memory:
    """Peak memory of the `with` block above the memory in use when it starts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss = _RssPeak() if device.type != "cuda" else None
        self.base = 0
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_memory()
            self.rss.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device) - self.base, 0)
        else:
            self.rss.__exit__(*exc)
            self.peak_bytes = self.rss.increase


def _timed(fn, iters: int, warmup: int, device: torch.device, desc: str, show: bool) -> Tuple[float, int]:
    """(seconds for `iters` synchronised calls after `warmup` untimed ones, peak memory bytes during the timed
    calls). Warm-up runs first so one-time costs (kernel compilation, allocator growth) are not counted."""
    with progress(total=warmup + iters, desc=desc, enabled=show) as bar:
        for _ in range(warmup):
            fn()
            bar.update(1)
        _sync(device)
        with _Memory(device) as mem:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
                bar.update(1)  # costs microseconds against milliseconds per pass
            _sync(device)
            seconds = time.perf_counter() - start
    return seconds, mem.peak_bytes


def benchmark_model(model: nn.Module, device: torch.device, batch_size: int, img_size: int, iters: int, warmup: int,
                    train: bool = True, in_chans: int = 3, name: str = "", show: bool = False) -> Dict[str, Any]:
    """Inference (and training) images/s and peak memory of one model (see the module docstring)."""
    model = model.to(device)
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    row: Dict[str, Any] = {}
    model.eval()
    with torch.no_grad():
        seconds, peak = _timed(lambda: model(x), iters, warmup, device, f"{name} inference", show)
    row["infer_img_per_s"] = round(batch_size * iters / seconds, 2)
    row["infer_ms_per_batch"] = round(1000 * seconds / iters, 3)
    row["infer_peak_mem_mb"] = round(peak / 2**20, 1)
    if train:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        num_classes = getattr(model, "num_classes", 1000) or 1000
        target = torch.randint(0, num_classes, (batch_size,), device=device)
        loss_fn = nn.CrossEntropyLoss()

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), target)
            loss.backward()
            optimizer.step()

        seconds, peak = _timed(step, iters, warmup, device, f"{name} training", show)
        row["train_img_per_s"] = round(batch_size * iters / seconds, 2)
        row["train_peak_mem_mb"] = round(peak / 2**20, 1)
        del optimizer
    return row


def read_accuracies(path: str) -> Dict[str, float]:
    """Top-1 accuracies by model name from JSON ({name: top1} or [{"model": .., "top1": ..}]), YAML or CSV
    (columns model, top1)."""
    if not os.path.isfile(path):
        raise UserError(f"results file not found: {path}")
    out: Dict[str, float] = {}
    try:
        if path.lower().endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    out[row["model"].strip()] = float(row.get("top1") or row.get("val_top1"))
            return out
        with open(path, "r", encoding="utf-8") as handle:
            text = handle.read()
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if isinstance(data, dict) and "results" in data and isinstance(data["results"], list):
            data = data["results"]
        if isinstance(data, dict):
            for name, value in data.items():
                out[str(name)] = float(value["top1"] if isinstance(value, Mapping) else value)
        elif isinstance(data, list):
            for item in data:
                if isinstance(item, Mapping) and "model" in item and ("top1" in item or "val_top1" in item):
                    out[str(item["model"])] = float(item.get("top1", item.get("val_top1")))
        else:
            raise ValueError("expected a mapping or a list")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise UserError(
            f"cannot read accuracies from {path} ({exc}); expected JSON {{\"model\": top1}}, a list of "
            "{\"model\": .., \"top1\": ..}, or a CSV with columns model,top1"
        ) from exc
    return out


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(c) for c in columns]] + [["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


BENCH = ConfigTable("bench", {
    "models": Key(None, "comma-separated timm model names", kind="str_list", flag=True),
    "img_size": Key(224, "input resolution", positive=True, flag=True),
    "batch_size": Key(None, "batch (null: 128 on a GPU, 8 on the CPU)", kind="int", positive=True, flag=True),
    "iters": Key(None, "timed passes (null: 100 on a GPU, 10 on the CPU)", kind="int", positive=True, flag=True),
    "warmup": Key(None, "untimed warm-up passes (null: 10 on a GPU, 2 on the CPU)", kind="int", low=0, flag=True),
    "train": Key(True, "also measure training throughput", flag=True),
    "model_kwargs": Key({}, "extra constructor arguments for every model, e.g. {depth: 12}", flag=True),
    "num_classes": Key(1000, "classifier outputs", positive=True, flag=True),
    "in_chans": Key(3, "input channels", positive=True, flag=True),
    "results": Key(None, "accuracies (JSON {model: top1}, list of {model, top1}, or CSV model,top1): plot against "
                         "accuracy", kind="str", flag=True),
    "device": Key("auto", "auto | cpu | cuda | cuda:N", flag=True, effect="none"),
    "threads": threads_key(),
    "output": Key(None, "where bench.json / bench.png go (null: runs/<time>-bench)", kind="str", flag=True,
                  effect="none"),
    "overwrite": Key(False, "move an earlier result in `output` aside first", flag=True, effect="once"),
    "progress": Key(True, "show a progress bar per model and pass", flag=True, effect="none"),
})


def _prepare_bench(cfg: Dict[str, Any], accuracies: Dict[str, float]) -> Dict[str, Any]:
    """Check the models and read the accuracies (into `accuracies`) before the output folder exists."""
    cfg["models"] = [m.strip() for m in cfg.get("models") or [] if m and m.strip()]
    if not cfg["models"]:
        raise UserError("no models given (--models a,b,c)")
    for name in cfg["models"]:
        check_model_name(name)
    if cfg.get("results"):
        accuracies.update(read_accuracies(cfg["results"]))
    return cfg


@user_errors()
def bench(overrides: Optional[Mapping[str, Any]] = None, config_path: Optional[str] = None) -> Dict[str, Any]:
    """Benchmark `models` (timm names) as the `BENCH` table says; writes bench.json and bench.png into the
    output folder; returns the figures."""
    accuracies: Dict[str, float] = {}
    with open_run(BENCH, overrides, config_path, lambda cfg: "bench", lambda cfg: _prepare_bench(cfg, accuracies),
                  distributed=False) as run:
        return _bench(run, accuracies)


def _bench(run: Run, accuracies: Mapping[str, float]) -> Dict[str, Any]:
    import timm

    cfg, dev = run.cfg, run.dist.device
    on_gpu = dev.type == "cuda"
    batch_size = cfg["batch_size"] or (128 if on_gpu else 8)
    iters = cfg["iters"] or (100 if on_gpu else 10)
    warmup = cfg["warmup"] if cfg["warmup"] is not None else (10 if on_gpu else 2)
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    rows: List[Dict[str, Any]] = []
    for name in cfg["models"]:
        kwargs = dict(cfg["model_kwargs"])
        kwargs.setdefault("num_classes", cfg["num_classes"])
        kwargs.setdefault("in_chans", cfg["in_chans"])
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise UserError(f"model {name!r} does not accept {sorted(kwargs)} ({exc})") from exc
        row: Dict[str, Any] = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
        if name in accuracies:
            row["top1"] = accuracies[name]
        try:
            row.update(benchmark_model(model, dev, batch_size, cfg["img_size"], iters, warmup, cfg["train"],
                                       cfg["in_chans"], name, cfg["progress"]))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        rows.append(row)
        note(f"  {name}: {row.get('infer_img_per_s', row.get('error'))} images/s")

    device_name = torch.cuda.get_device_name(dev) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    summary: Dict[str, Any] = {
        "device": device_name,
        "img_size": cfg["img_size"],
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "dtype": "float32",
        "torch": torch.__version__,
        "results": rows,
    }
    json_path = run.path("bench.json")
    write_json(json_path, summary)
    x_key = "top1" if accuracies and any("top1" in r for r in rows) else "params_m"
    plot_path = plot_throughput(rows, run.path("bench.png"), x_key=x_key,
                                title=f"{device_name}, batch {batch_size}, {cfg['img_size']} px, fp32")
    columns = ["model", "params_m"] + (["top1"] if accuracies else []) + [
        "infer_img_per_s", "infer_peak_mem_mb"] + (["train_img_per_s", "train_peak_mem_mb"] if cfg["train"] else [])
    print(f"throughput on {device_name}: batch {batch_size}, {cfg['img_size']} px, fp32, {warmup} warm-up + {iters} "
          "timed passes")
    print(_table(rows, columns))
    summary["json"] = json_path
    summary["plot"] = plot_path
    return summary
