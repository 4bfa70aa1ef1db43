"""Figures: the training-curves plot, and the background FigureWorker (written files, errors, a dying worker)."""

import json
import os

import pytest

from jaxnn import plotting


def _metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s, "loss_mean": 1.0 / s, "accuracy": 0.5 + s / 100, "val_loss": 1.1 / s,
                "val_accuracy": 0.5 + s / 120} for s in range(10, 60, 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_training_curves_png(tmp_path):
    out = plotting.plot_training_curves(_metrics(tmp_path), tmp_path / "curves.png", title="t")
    assert out.stat().st_size > 5_000


def test_figure_worker_draws_in_another_process_and_reports_errors(tmp_path):
    metrics = _metrics(tmp_path)
    with plotting.FigureWorker(start=True) as figures:
        figures.submit(plotting.plot_training_curves, metrics, tmp_path / "a.png", "a")
        figures.submit(plotting.FigureFunction("jaxnn.plotting", "plot_training_curves"), metrics, tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 5_000 and (tmp_path / "b.png").stat().st_size > 5_000
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with plotting.FigureWorker() as figures:
            figures.submit(plotting.plot_training_curves, tmp_path / "missing.jsonl", tmp_path / "c.png")


def test_figures_are_drawn_here_when_the_worker_dies(tmp_path):
    """The worker is killed (as by the OOM killer): figures queued then, and after, are drawn in this process."""
    import signal
    import time

    metrics = _metrics(tmp_path)
    with plotting.FigureWorker(start=True) as figures:
        figures.submit(time.sleep, 2)
        figures.submit(plotting.plot_training_curves, metrics, tmp_path / "d.png")
        for pid in list(figures._pool._processes):  # the executor's worker processes
            os.kill(pid, signal.SIGKILL)
        figures.submit(plotting.plot_training_curves, metrics, tmp_path / "e.png")
    assert (tmp_path / "d.png").stat().st_size > 5_000 and (tmp_path / "e.png").stat().st_size > 5_000
