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


def draw_now(function, *args, **kwargs):
    """Draw a figure in this process (the default ``draw`` of the report writers)."""
    return function(*args, **kwargs)


def _warm_up() -> None:
    """Worker start-up: import matplotlib and the figure modules before the first figure is asked for."""
    import matplotlib.backends.backend_agg  # noqa: F401

    import jaxnn.curvature.plots  # noqa: F401
    import jaxnn.landscape.plots  # noqa: F401


class FigureWorker:
    """Draws figures in one background process, so that importing matplotlib and rendering PNGs overlap the
    computation instead of adding to it (about 2 s of a ``jaxnn run`` on a 2-core CPU, measured).

    ``submit(function, *args, **kwargs)`` queues ``function(*args, **kwargs)`` — a module-level figure function;
    the arguments are pickled — and is a drop-in ``draw`` for the report writers. ``wait()`` blocks until every
    queued figure is written and re-raises the first error; ``close()`` also stops the process. Used as a context
    manager by the ``jaxnn`` command; the process starts with the first figure.
    """

    def __init__(self) -> None:
        self._pool = None
        self._pending: list = []

    def submit(self, function, *args, **kwargs) -> None:
        if self._pool is None:
            import concurrent.futures
            import multiprocessing

            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_up)
        self._pending.append(self._pool.submit(function, *args, **kwargs))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self._pool = None

    def __enter__(self) -> "FigureWorker":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.wait()
        finally:
            self.close(cancel=kind is not None)
