"""Shipped configs and optimizers that take a different path through the step train for real."""

import json
import pathlib

import pytest

from jaxnn.config import load_config
from jaxnn.train import train_from_config

MNIST = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist not present")
def test_mnist_lenet_config_trains_on_real_mnist(tmp_path):
    cfg = load_config("mnist_lenet", overrides=[f"data.data_dir={MNIST}", "train.steps=60", "train.eval_every=30",
                                                "train.batch_size=64", "train.progress=false", "data.limit=3000",
                                                "optimizer.warmup_steps=10"])
    summary = train_from_config(cfg, run_dir=tmp_path / "lenet")
    assert summary["dataset"] == "mnist" and summary["split_sizes"]["train"] + summary["split_sizes"]["val"] \
        + summary["split_sizes"]["test"] == 3000
    assert summary["final"]["val_accuracy"] > 0.7  # 60 SGD steps of LeNet on real digits: far above chance


def test_lbfgs_with_line_search_fits_teacher_student_regression(tmp_path):
    cfg = load_config("digits_mlp", overrides=[
        "data.name=teacher_student", "data.kwargs={num_examples: 400, input_dim: 5, teacher: linear, noise_std: 0.0}",
        "model.kwargs={depth: 0}", "train.loss=mse", "optimizer.name=lbfgs", "optimizer.lr=1.0",
        "optimizer.schedule=constant", "train.batch_size=280", "train.steps=15", "train.eval_every=5",
        "train.log_every=1", "train.progress=false"])
    summary = train_from_config(cfg, run_dir=tmp_path / "lbfgs")
    records = [json.loads(line) for line in (tmp_path / "lbfgs" / "metrics.jsonl").read_text().splitlines()]
    # A linear model on a noiseless linear teacher: L-BFGS drives the full-batch loss to ~0.
    assert records[0]["step"] == 1 and records[0]["loss"] > 1e-2  # the loss at the initial weights
    assert summary["final"]["train_loss"] < 1e-6 and summary["final"]["test_loss"] < 1e-5
