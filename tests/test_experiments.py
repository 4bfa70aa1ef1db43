"""Experiment scripts in smoke size (JAXNN_FULL=1 runs them full size): outputs exist and the numbers they
record agree with an independent computation."""

import importlib.util
import json
import pathlib

import jax
import jax.flatten_util
import numpy as np
import pytest

import jaxnn

pytestmark = pytest.mark.experiment
ROOT = pathlib.Path(__file__).parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edge_of_stability_smoke(tmp_path):
    eos = _load("edge_of_stability")
    results = eos.run(tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "sharpness.png").stat().st_size > 10_000
    size = eos.FULL if saved["size"] == "full" else eos.SMOKE
    assert [r["lr"] for r in saved["runs"]] == list(size["lrs"])
    for run, params in zip(saved["runs"], results["final_params"]):
        assert run["steps"] == list(range(size["every"], size["steps"] + 1, size["every"]))
        # Oracle: the recorded final sharpness equals the top eigenvalue of the dense Hessian.
        model = jaxnn.models.get_model("mlp", num_classes=10, width=size["width"], depth=2, activation="tanh")
        loss_fn = jaxnn.make_loss_fn(model.apply, "softmax_cross_entropy", {})
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        dense = jax.hessian(lambda f: loss_fn(unravel(f), results["full_batch"]))(flat)
        top = float(np.linalg.eigvalsh(np.asarray(dense, np.float64))[-1])
        assert run["lambda_max"][-1] == pytest.approx(top, rel=2e-3)
