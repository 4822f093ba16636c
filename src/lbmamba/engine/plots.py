"""PNG figures (matplotlib's Agg canvas directly: no pyplot, no global backend switch), written atomically."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .files import atomic_path

__all__ = ["Panel", "plot_curves", "plot_throughput", "preload"]

#: one subplot: (title, y-axis label, [(record key, legend label), ...])
Panel = Tuple[str, str, Sequence[Tuple[str, str]]]


def preload() -> None:
    """Import matplotlib's canvas now, at the start of a run. Imported at the first figure, a SIGTERM or
    Ctrl-C that arrived during the import of its compiled modules came out as an ImportError
    ("initialization failed"), which a figure's error handling swallowed: the run went on instead of
    stopping."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    return path


def plot_curves(records: Sequence[Mapping[str, Any]], path: str, panels: Sequence[Panel], title: str = "",
                group: Optional[str] = None, x: str = "epoch") -> Optional[str]:
    """Curves against the record key `x` (epochs, or iterations for iteration-based runs), one subplot per
    panel; with `group` (e.g. "fold") one line per group value."""
    if not records:
        return None
    fig = _figure(5 * len(panels), 4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    groups = sorted({r.get(group) for r in records}, key=str) if group else [None]
    for ax, (panel_title, ylabel, series) in zip(axes, panels):
        for i, g in enumerate(groups):
            for j, (key, label) in enumerate(series):
                pts = [(r[x], r[key]) for r in records
                       if r.get(key) is not None and (group is None or r.get(group) == g)]
                if not pts:
                    continue
                # grouped: a colour per group, a line style per series; else a colour per series
                style = dict(color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[j % 4]) if group else {}
                name = label if group is None else f"{label}, {group} {g}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name, **style)
        ax.set_xlabel({"iter": "iteration"}.get(x, x))
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
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
