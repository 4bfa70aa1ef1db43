"""HessianCallback (against the training-loop protocol, with a fake context) and the curvature report."""

import json
from types import SimpleNamespace

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn.curvature as curvature
from _curvature_models import classification_data, dense_hessian_of, mlp_loss, mlp_params


class FakeTrainingContext:
    """The callback protocol of jaxnn.train: step, state.params, loss_fn(), analysis_batch, log(dict)."""

    def __init__(self, params, batch):
        self.step = 0
        self.state = SimpleNamespace(params=params)
        self.analysis_batch = batch
        self.logged = []

    def loss_fn(self):
        return mlp_loss

    def log(self, metrics):
        self.logged.append((self.step, dict(metrics)))


def test_hessian_callback_logs_every_k_steps(x64):
    batch = classification_data(1)
    ctx = FakeTrainingContext(jax.tree.map(jnp.asarray, mlp_params(0)), batch)
    callback = curvature.HessianCallback(every_k_steps=2, k=2, trace_samples=40, num_iters=60, tol=1e-6)
    expected = {0: np.linalg.eigvalsh(dense_hessian_of(mlp_loss, ctx.state.params, batch))}
    callback.on_train_begin(ctx)  # step 0: the initial parameters
    gradient = jax.jit(jax.grad(mlp_loss))
    for step in range(1, 6):
        ctx.step = step
        ctx.state = SimpleNamespace(params=jax.tree.map(lambda p, g: p - 0.5 * g, ctx.state.params, gradient(ctx.state.params, batch)))
        if step % 2 == 0:
            expected[step] = np.linalg.eigvalsh(dense_hessian_of(mlp_loss, ctx.state.params, batch))
        callback.on_step_end(ctx)
    callback.on_train_end(ctx)
    assert [step for step, _ in ctx.logged] == [0, 2, 4]
    for step, metrics in ctx.logged:
        exact = expected[step]
        assert set(metrics) == {"lambda_max", "lambda_2", "stable_lr_bound", "trace", "trace_se", "hessian_seconds",
                                "lanczos_iters", "hessian_examples"}
        assert metrics["hessian_examples"] == len(batch[0])
        assert all(isinstance(value, float) for value in metrics.values())
        assert 2 <= metrics["lanczos_iters"] < 60  # adaptive: stopped before the cap once both pairs converged
        assert metrics["lambda_max"] == pytest.approx(exact[-1], rel=1e-6)
        assert metrics["lambda_2"] == pytest.approx(exact[-2], rel=1e-6)
        assert metrics["stable_lr_bound"] == pytest.approx(2.0 / exact[-1], rel=1e-6)
        assert abs(metrics["trace"] - exact.sum()) <= 3 * metrics["trace_se"]
    assert [record["step"] for record in callback.history] == [0, 2, 4]


def test_hessian_callback_in_fit_measures_a_fixed_set_from_step_0(x64, tmp_path):
    """In fit, by default: 1,024 training examples (the same set at every measurement, the first of the analysis
    shuffle, in chunks), at step 0 and every k steps, each in its step's metrics record, and λmax over gradient
    descent's stable curvature 2/η with η the rate of the next update. Oracle: the dense Hessian of the loss on
    those examples (jax.hessian + eigvalsh) at the final parameters."""
    import json

    import optax

    from jaxnn import data as data_lib
    from jaxnn import losses, models
    from jaxnn.plotting import plot_training_curves
    from jaxnn.train import create_train_state, fit

    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=8, depth=1)
    schedule = optax.piecewise_constant_schedule(0.05, {5: 0.4})  # 0.05, then 0.02 from the update at step 5
    state = create_train_state(model, optax.sgd(schedule), digits.input_shape, jax.random.PRNGKey(0))
    callback = curvature.HessianCallback(every_k_steps=5, num_iters=80, tol=1e-10, optimizer="sgd")
    everything = curvature.HessianCallback(every_k_steps=10, examples=10 ** 6, chunk_size=500)
    result = fit(state, digits, batch_size=32, num_steps=10, schedule=schedule, seed=3, log_every=5, eval_every=10,
                 progress=False, callbacks=[callback, everything], run_dir=tmp_path)
    assert [h["step"] for h in callback.history] == [0, 5, 10] and [h["step"] for h in everything.history] == [0, 10]
    assert [r["step"] for r in result.history if "lambda_max" in r] == [0, 5, 10]
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    # two callbacks log the same keys at steps 0 and 10: the record keeps the last one's (the callbacks' order)
    assert first["step"] == 0 and first["lambda_max"] == everything.history[0]["lambda_max"] and "loss" not in first
    assert plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png").stat().st_size > 0
    assert everything.history[-1]["hessian_examples"] == len(digits.train) > 1024  # capped at the split
    at_5 = next(r for r in result.history if r["step"] == 5)
    assert at_5["lr"] == pytest.approx(0.05)  # the record's lr: the update that led to step 5
    assert at_5["edge_of_stability_ratio"] == pytest.approx(at_5["lambda_max"] * 0.02 / 2, rel=1e-12)
    last = callback.history[-1]
    assert last["hessian_examples"] == 1024
    x, y = data_lib.host_stacked_batches(digits.train, 1024, 1, seed=4, shuffle=True)
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    flat, unravel = jax.flatten_util.ravel_pytree(result.state.params)
    dense = jax.hessian(lambda f: loss_fn(unravel(f), (jnp.asarray(x[0]), jnp.asarray(y[0]))))(flat)
    exact = np.linalg.eigvalsh(np.asarray(dense))[-1]
    assert last["lambda_max"] == pytest.approx(exact, rel=1e-8)
    assert last["edge_of_stability_ratio"] == pytest.approx(exact * 0.02 / 2, rel=1e-8)
    assert last["stable_lr_bound"] == pytest.approx(2 / exact, rel=1e-8)
    assert "edge_of_stability_ratio" not in everything.history[-1]  # no update rule named: no ratio
    # one training batch, as the callback measured before: a different, noisier number
    batch_only = curvature.HessianCallback(every_k_steps=5, batch=(jnp.asarray(x[0, :32]), jnp.asarray(y[0, :32])))
    assert batch_only.measure(loss_fn, result.state.params, batch_only.batch, 10)["lambda_max"] != pytest.approx(
        exact, rel=1e-3)


@pytest.mark.parametrize("rule", ["sgd", "momentum", "nesterov"])
def test_stable_curvature_is_where_optax_starts_to_diverge_on_a_quadratic(rule, x64):
    """optax's own update (sgd; heavy-ball and Nesterov momentum 0.9) on L(θ) = λθ²/2: shrinks just below the
    stable curvature and grows just above it."""
    import optax

    eta, beta = 0.1, 0.9
    limit = curvature.stable_curvature(rule, eta, beta if rule != "sgd" else 0.0)
    tx = optax.sgd(eta, momentum=None if rule == "sgd" else beta, nesterov=rule == "nesterov")

    def final(curvature_value):
        theta, opt_state = jnp.ones(()), tx.init(jnp.ones(()))
        for _ in range(3000):
            updates, opt_state = tx.update(curvature_value * theta, opt_state)
            theta = optax.apply_updates(theta, updates)
        return abs(float(theta))

    assert final(0.98 * limit) < 1e-3 and final(1.02 * limit) > 1e3


def test_hessian_callback_bad_input():
    with pytest.raises(ValueError, match="every_k_steps: expected an integer >= 1, got 0"):
        curvature.HessianCallback(every_k_steps=0)
    with pytest.raises(ValueError, match="trace_samples: expected 0 \\(no trace\\) or >= 2"):
        curvature.HessianCallback(every_k_steps=1, trace_samples=1)
    with pytest.raises(ValueError, match="examples: expected an integer >= 1, got 0"):
        curvature.HessianCallback(every_k_steps=1, examples=0)
    with pytest.raises(ValueError, match=r"optimizer: expected one of \['sgd', 'momentum', 'nesterov'\], got 'adam'"):
        curvature.HessianCallback(every_k_steps=1, optimizer="adam")
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\), got 1.0"):
        curvature.HessianCallback(every_k_steps=1, optimizer="momentum", momentum=1.0)
    ctx = FakeTrainingContext(mlp_params(0), None)
    ctx.step = 3
    with pytest.raises(ValueError, match="batch: HessianCallback needs data"):
        curvature.HessianCallback(every_k_steps=3).on_step_end(ctx)


def test_curvature_report_and_files(x64, tmp_path):
    params, batch = mlp_params(0), classification_data(1)
    exact = np.linalg.eigvalsh(dense_hessian_of(mlp_loss, params, batch))
    report = curvature.curvature_report(
        mlp_loss, params, [batch], k=3, density=True, key=jax.random.key(0), progress=False, num_iters=80,
        trace_samples=30, density_probes=3, density_iters=80,
    )
    json.dumps(report, allow_nan=False)  # strictly JSON-serialisable
    eigen = report["eigenvalues"]
    scale = np.abs(exact).max()
    np.testing.assert_allclose(eigen["top"], exact[::-1][:3], atol=1e-6 * scale)
    np.testing.assert_allclose(eigen["bottom"], exact[:3], atol=1e-6 * scale)
    assert max(eigen["top_residuals"] + eigen["bottom_residuals"]) < 1e-6 * scale
    conditioning = report["conditioning"]
    assert conditioning["lambda_max"] == pytest.approx(exact[-1], rel=1e-8)
    expected_verdict = "indefinite" if exact[0] < 0 else "positive definite"
    assert conditioning["verdict"] == expected_verdict
    assert conditioning["nonconvexity_ratio"] == pytest.approx(abs(exact[0]) / abs(exact[-1]), rel=1e-6)
    loss, gradient = jax.value_and_grad(mlp_loss)(jax.tree.map(jnp.asarray, params), batch)
    gradient_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(gradient))))
    assert report["loss"] == pytest.approx(float(loss), rel=1e-12)
    assert report["gradient_norm"] == pytest.approx(gradient_norm, rel=1e-10)
    assert report["critical_point"]["kind"] == "not critical"
    trace = report["trace"]
    assert abs(trace["estimate"] - exact.sum()) <= 3 * trace["standard_error"]
    check = report["gradient_direction"]["quadratic_model_check"]
    assert check["actual_change"] < 0 and check["predicted_change"] < 0
    assert report["num_hvps"] == 80 + 2 * 3 + 30 + 1 + 3 * 80
    assert len(report["density"]["grid"]) == len(report["density"]["density"]) == 1000
    assert set(report["timing_seconds"]) >= {"lanczos", "trace", "density", "total"}

    paths = curvature.write_curvature_report(report, tmp_path / "run" / "analysis")
    with open(paths["json"]) as handle:
        assert json.load(handle) == json.loads(json.dumps(report))
    with open(paths["figure"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_curvature_report_bad_input(tmp_path):
    params, batch = mlp_params(0), classification_data(1)
    with pytest.raises(TypeError, match="key"):
        curvature.curvature_report(mlp_loss, params, batch)
    with pytest.raises(ValueError, match="data: expected at least one batch"):
        curvature.curvature_report(mlp_loss, params, [], key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="report: expected the dict returned by curvature_report"):
        curvature.write_curvature_report({"loss": 1.0}, tmp_path)
    nan_batch = (np.full_like(batch[0], np.nan), batch[1])
    with pytest.raises(FloatingPointError, match="loss_fn: expected a finite loss"):
        curvature.curvature_report(mlp_loss, params, nan_batch, key=jax.random.key(0), progress=False)


def test_a_config_run_with_hessian_every_logs_the_ratio_for_its_own_update_rule(tmp_path):
    """analysis.hessian_every and hessian_examples reach the callback; a momentum run's ratio uses heavy-ball's
    stable curvature 2(1+β)/η with the config's β and rate; an Adam run logs no ratio."""
    import json
    import pathlib

    from jaxnn import config as config_lib
    from jaxnn.train import train_from_config

    common = {"model.kwargs": {"width": 8, "depth": 1}, "train.steps": 4, "train.batch_size": 32,
              "train.log_every": 2, "train.progress": False, "analysis.hessian_every": 2,
              "analysis.hessian_examples": 100, "output_dir": str(tmp_path)}
    for name, overrides in (("momentum", {"optimizer.name": "momentum", "optimizer.lr": 0.05,
                                          "optimizer.momentum": 0.8}),
                            ("adam", {"optimizer.name": "adam"})):
        cfg = config_lib.load_config(None, overrides={**common, **overrides, "name": name})
        run_dir = pathlib.Path(train_from_config(cfg)["run_dir"])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        measured = [r for r in records if "lambda_max" in r]
        assert [r["step"] for r in measured] == [0, 2, 4] and {r["hessian_examples"] for r in measured} == {100.0}
        for r in measured:
            if name == "momentum":
                assert r["edge_of_stability_ratio"] == pytest.approx(r["lambda_max"] * 0.05 / (2 * 1.8), rel=1e-6)
            else:
                assert "edge_of_stability_ratio" not in r
