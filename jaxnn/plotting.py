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
    return _save(fig, out_path, title, dpi=110)


def _save(fig, out_path: str | pathlib.Path, title: str = "", dpi: int = 110) -> pathlib.Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, dpi=dpi)
    return out_path


def plot_sweep(summary_path: str | pathlib.Path, losses_path: str | pathlib.Path,
               out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """A sweep's figures: ``sweep.png`` (the selection metric, and λmax when measured, against each swept value, one
    line per combination of the other swept values, e.g. per seed; with plain SGD, λmax panels show gradient
    descent's stability bound 2/lr when the learning rate is swept) and ``sweep_losses.png`` (every member's training loss against the step, the best member in black)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = json.loads(pathlib.Path(summary_path).read_text())
    rows, fields, metric = summary["rows"], summary["fields"], summary["selection_metric"]
    losses = np.load(losses_path)
    out_dir = pathlib.Path(out_dir)
    panels = [f for f in fields if f != "train.seed"] or list(fields)
    quantities = [metric] + (["lambda_max"] if any("lambda_max" in r for r in rows) else [])
    fig = Figure(figsize=(4.6 * len(panels), 3.6 * len(quantities)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(quantities), len(panels), squeeze=False)
    for column, field in enumerate(panels):
        others = [f for f in fields if f != field]
        groups: dict[tuple, list] = {}
        for row in rows:
            groups.setdefault(tuple(row[f] for f in others), []).append(row)
        xs_all = [r[field] for r in rows]
        log_x = min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20
        for line, quantity in enumerate(quantities):
            ax = axes[line, column]
            for key, members in sorted(groups.items()):
                members = sorted(members, key=lambda r: r[field])
                xs = [r[field] for r in members]
                ys = [r.get(quantity, float("nan")) for r in members]
                label = ", ".join(f"{f.split('.')[-1]}={v:g}" for f, v in zip(others, key)) or None
                ax.plot(xs, ys, "o-", markersize=4, label=label)
                diverged = [r[field] for r in members if r["status"] != "completed"]
                if diverged:
                    ax.plot(diverged, [np.nanmin(ys) if np.isfinite(ys).any() else 0] * len(diverged), "rx",
                            label="diverged" if key == sorted(groups)[0] else None)
            if quantity == "lambda_max" and field == "optimizer.lr" and summary.get("optimizer") == "sgd":
                grid = np.geomspace(min(xs_all), max(xs_all), 50) if log_x else np.linspace(min(xs_all), max(xs_all), 50)
                ax.plot(grid, 2 / grid, "k--", linewidth=1, label="2 / lr (GD stability bound)")
                finite = [r["lambda_max"] for r in rows if np.isfinite(r.get("lambda_max", np.nan))]
                if finite:
                    ax.set_ylim(0, 1.3 * max(finite))
            if log_x:
                ax.set_xscale("log")
            ax.set_xlabel(field)
            ax.set_ylabel({"lambda_max": "λmax (final)"}.get(quantity, f"final {quantity}"))
            ax.grid(alpha=0.3)
            if len(groups) > 1 or quantity == "lambda_max":
                ax.legend(fontsize=7)
    fig.suptitle(f"{summary['name']}: {summary['members']} members, {summary['steps']} steps")
    fig.tight_layout()
    paths = [out_dir / "sweep.png"]
    fig.savefig(paths[0], dpi=110)

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colour_field = panels[0]
    values = np.asarray([r[colour_field] for r in rows], float)
    scaled = np.log(values) if values.min() > 0 and values.max() / values.min() >= 20 else values
    span = np.ptp(scaled) or 1.0
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    steps = np.arange(1, losses.shape[0] + 1)
    for index, row in enumerate(rows):
        colour = "black" if index == summary.get("best_member") else cmap((scaled[index] - scaled.min()) / span)
        ax.plot(steps, losses[:, index], color=colour, linewidth=1.6 if colour == "black" else 0.7, alpha=0.85)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("training loss (batch)"), ax.grid(alpha=0.3)
    ax.set_title(f"every member (colour: {colour_field} {values.min():g} to {values.max():g}; black: best)")
    fig.tight_layout()
    paths.append(out_dir / "sweep_losses.png")
    fig.savefig(paths[1], dpi=110)
    return paths


def plot_layer_statistics(statistics_path: str | pathlib.Path, out_path: str | pathlib.Path,
                          title: str = "") -> pathlib.Path:
    """One row per layer: histograms of the activations it reads, of its pre-activation outputs and of its weight
    gradient (log counts), from a diagnostics.json written by ``jaxnn diagnose``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report = json.loads(pathlib.Path(statistics_path).read_text())
    layers = report["activations"]
    kernels = {g["name"].rsplit("/", 1)[0]: g for g in report["gradients"] if g["name"].endswith("kernel")}
    fig = Figure(figsize=(12, 2.3 * len(layers) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(layers), 3, squeeze=False)

    def bars(ax, histogram, colour):
        counts, edges = histogram["counts"], histogram["edges"]
        if counts:
            ax.stairs(counts, edges, fill=True, color=colour, alpha=0.8)
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)

    for row, a in enumerate(layers):
        saturated = "" if a["saturated_fraction"] is None else f", {a['saturated_fraction']:.0%} saturated"
        dead = "" if a["reads"] == "the data" else f", {a['dead_fraction']:.0%} dead"
        bars(axes[row, 0], a["histogram"], "tab:blue")
        axes[row, 0].set_title(f"{a['name']} reads: std {a['std']:.3g}{dead}{saturated}", fontsize=8)
        bars(axes[row, 1], a["output_histogram"], "tab:green")
        axes[row, 1].set_title(f"{a['name']} pre-activation: mean {a['output_mean']:.3g}, std {a['output_std']:.3g}",
                               fontsize=8)
        gradient = kernels.get(a["name"])
        if gradient is not None:
            bars(axes[row, 2], gradient["histogram"], "tab:red")
            ratio = "" if gradient["update_ratio"] is None else f", update/weight {gradient['update_ratio']:.1e}"
            axes[row, 2].set_title(f"{gradient['name']} gradient: norm {gradient['grad_norm']:.3g}{ratio}",
                                   fontsize=8)
        else:
            axes[row, 2].set_axis_off()
    return _save(fig, out_path, title, dpi=100)


def plot_reliability(report: dict, path: str) -> str:
    """Reliability diagram of a laplace.json report: accuracy against confidence per bin for the MAP network and the
    Laplace predictive, the diagonal being perfect calibration; ECE and NLL in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, label="perfect calibration")
    for key, label, style in (("map", "MAP", "o-"), ("laplace", f"Laplace ({report['structure']})", "s-")):
        rows = report[key]["bins"]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], style, markersize=4,
                label=f"{label}: ECE {report[key]['ece']:.3f}, NLL {report[key]['nll']:.3f}")
    ax.set_xlabel("confidence (top probability, per bin)"), ax.set_ylabel("accuracy in the bin")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.grid(alpha=0.3), ax.legend(fontsize="small", loc="upper left")
    ax.set_title(f"reliability on {report['num_test']} test examples")
    figure.savefig(path, dpi=110)
    return str(path)


class FigureFunction:
    """A figure function named by module and attribute, imported only when called: passing one to a background
    :class:`FigureWorker` does not import matplotlib in the calling process. Picklable."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        import importlib

        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FigureFunction({self.module}.{self.name})"


def draw_now(function, *args, **kwargs):
    """Draw a figure in this process (the default ``draw`` of the report writers)."""
    return function(*args, **kwargs)


def _warm_up(parent: int, preload: tuple = ()) -> None:
    """Worker start-up: let go of the parent's terminal and pipes (a caller reading the parent's output would
    otherwise wait for the worker too), exit when the parent is gone, and import matplotlib and the figure modules
    named in ``preload`` before the first figure is asked for."""
    import atexit
    import importlib
    import os
    import threading
    import time

    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def exit_with_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    # Every figure is on disk before the worker is told to stop: skip the interpreter's teardown of matplotlib and
    # friends, which the parent waited for at exit (1.5 s of `close()` on a busy 2-core machine, measured).
    atexit.register(os._exit, 0)
    import matplotlib.backends.backend_agg  # noqa: F401

    for module in preload:  # the caller names them: this ground-floor module imports no engine
        importlib.import_module(module)
    _draw_sample_figure()


def _draw_sample_figure() -> None:
    """Render a small figure with the report figures' elements (lines, a legend, filled contours with a colour
    bar, a 3-D surface, mathtext) to memory: the first figure of each kind pays for fonts, glyph caches and the 3-D
    toolkit (~0.3 s of the first landscape line plot, measured), which the worker then does before it is waited
    for."""
    import io

    import numpy as np
    from matplotlib.figure import Figure

    grid = np.linspace(-1, 1, 5)
    z = grid[:, None] ** 2 + grid[None, :] ** 2
    figure = Figure(figsize=(3, 2))
    line = figure.add_subplot(1, 3, 1)
    line.plot(grid, grid**2, label=r"$\lambda_{max}$ · η/2")
    line.set_yscale("log")
    line.legend()
    contour = figure.add_subplot(1, 3, 2)
    figure.colorbar(contour.contourf(grid, grid, z, levels=5), ax=contour)
    contour.contour(grid, grid, z, levels=3)
    surface = figure.add_subplot(1, 3, 3, projection="3d")
    surface.plot_surface(*np.meshgrid(grid, grid), z)
    figure.savefig(io.BytesIO(), format="png", dpi=50)


class FigureWorker:
    """Draws figures in one background process, so that importing matplotlib and rendering PNGs overlap the
    computation instead of adding to it (about 2 s of a ``jaxnn run`` on a 2-core CPU, measured).

    ``submit(function, *args, **kwargs)`` queues ``function(*args, **kwargs)`` — a module-level figure function;
    the arguments are pickled — and is a drop-in ``draw`` for the report writers. ``wait()`` blocks until every
    queued figure is written and re-raises the first error; ``close()`` also stops the process. Used as a context
    manager by the ``jaxnn`` command, which starts the process first thing (``start=True``) so that it has imported
    matplotlib by the time the first figure is ready; otherwise it starts with the first figure. ``preload``: modules
    of figure functions the worker imports while it waits (e.g. ``"jaxnn.curvature.plots"``).
    """

    def __init__(self, start: bool = False, preload: tuple = ()) -> None:
        self._pool = None
        self._pending: list = []
        self._preload = tuple(preload)
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker process and its imports now (a no-op if it runs already)."""
        if self._pool is None:
            import concurrent.futures
            import multiprocessing

            import os

            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_up,
                initargs=(os.getpid(), self._preload))
            self._pool.submit(int)  # makes the process start (and warm up) right away

    def submit(self, function, *args, **kwargs) -> None:
        import concurrent.futures

        try:
            self.start()
            future = self._pool.submit(function, *args, **kwargs)
        except (concurrent.futures.process.BrokenProcessPool, OSError, RuntimeError):
            function(*args, **kwargs)  # no worker process (it died, or cannot start here): draw in this one
            return
        self._pending.append((future, function, args, kwargs))

    def wait(self) -> None:
        """Block until every queued figure is written; a figure whose worker died is drawn in this process."""
        import concurrent.futures

        pending, self._pending = self._pending, []
        for future, function, args, kwargs in pending:
            try:
                future.result()
            except concurrent.futures.process.BrokenProcessPool:
                function(*args, **kwargs)

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
