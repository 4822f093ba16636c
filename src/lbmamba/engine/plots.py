"""PNG figures (matplotlib's Agg canvas directly: no pyplot, no global backend switch)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

__all__ = ["plot_training_curves", "plot_throughput"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_training_curves(records: Sequence[Dict], path: str, title: str = "") -> Optional[str]:
    """Loss (train / val) and accuracy (val top-1 / top-5, EMA, train top-1) against the epoch."""
    if not records:
        return None
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)

    def series(key):
        pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        x, y = series(key)
        if x:
            ax_loss.plot(x, y, marker="o", markersize=3, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    for key, label in (("train_top1", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5"),
                       ("val_top1_ema", "val top-1 (EMA)")):
        x, y = series(key)
        if x:
            ax_acc.plot(x, y, marker="o", markersize=3, label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_throughput(rows: List[Dict], path: str, x_key: str = "params_m", title: str = "") -> Optional[str]:
    """Inference throughput against parameters (millions) or accuracy (`x_key='top1'`), one labelled point per model."""
    pts = [r for r in rows if r.get(x_key) is not None and r.get("infer_img_per_s")]
    if not pts:
        return None
    fig = _figure(6, 4.5)
    ax = fig.subplots()
    for r in pts:
        ax.scatter(r[x_key], r["infer_img_per_s"], s=30)
        ax.annotate(r["model"], (r[x_key], r["infer_img_per_s"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("parameters (M)" if x_key == "params_m" else "top-1 accuracy (%)")
    ax.set_ylabel("inference throughput (images/s)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
