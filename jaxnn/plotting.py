"""matplotlib figures of a run (``Figure`` objects rendered by Agg: files, never windows, no global backend change).

matplotlib is imported by the functions that draw, not with this module.
"""

from __future__ import annotations

import json
import pathlib


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training_curves(metrics_path: str | pathlib.Path, out_path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Train/val loss (log scale) and accuracy against the step, from metrics.jsonl, saved as a PNG."""
    records = read_metrics(metrics_path)
    has_acc = any("accuracy" in r or "val_accuracy" in r for r in records)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11 if has_acc else 6, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)
    ax = axes[0, 0]
    for key, label, style in (("loss_mean", "train loss (mean since last log)", "-"), ("val_loss", "val loss", "o-")):
        x, y = _series(records, key)
        if x:
            ax.plot(x, y, style, label=label, markersize=3)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend()
    if has_acc:
        ax = axes[0, 1]
        for key, label, style in (("accuracy", "train accuracy (batch)", "-"), ("val_accuracy", "val accuracy", "o-")):
            x, y = _series(records, key)
            if x:
                ax.plot(x, y, style, label=label, markersize=3)
        ax.set_xlabel("step"), ax.set_ylabel("accuracy"), ax.set_ylim(0, 1.01), ax.grid(alpha=0.3), ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, dpi=110)
    return out_path
