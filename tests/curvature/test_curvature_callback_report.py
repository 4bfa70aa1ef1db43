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


def test_hessian_callback_in_fit_measures_a_fixed_set_from_step_0(x64):
    """In fit, by default: 1,024 training examples (the same set at every measurement, the first of the analysis
    shuffle), at step 0 and every k steps, each in its step's metrics record, λmax·η/2 with the schedule's η.
    Oracle: the dense Hessian of the loss on those examples (jax.hessian + eigvalsh) at the final parameters."""
    import optax

    from jaxnn import data as data_lib
    from jaxnn import losses, models
    from jaxnn.train import create_train_state, fit

    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=8, depth=1)
    state = create_train_state(model, optax.sgd(0.05), digits.input_shape, jax.random.PRNGKey(0))
    callback = curvature.HessianCallback(every_k_steps=5, num_iters=80, tol=1e-10)
    result = fit(state, digits, batch_size=32, num_steps=10, schedule=optax.constant_schedule(0.05), seed=3,
                 log_every=5, eval_every=10, progress=False, callbacks=[callback])
    assert [h["step"] for h in callback.history] == [0, 5, 10]
    assert result.history[0]["step"] == 0 and result.history[0]["lambda_max"] == callback.history[0]["lambda_max"]
    assert [r["step"] for r in result.history if "lambda_max" in r] == [0, 5, 10]
    last = callback.history[-1]
    assert last["hessian_examples"] == 1024 < len(digits.train)
    x, y = data_lib.host_stacked_batches(digits.train, 1024, 1, seed=4, shuffle=True)
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    flat, unravel = jax.flatten_util.ravel_pytree(result.state.params)
    dense = jax.hessian(lambda f: loss_fn(unravel(f), (jnp.asarray(x[0]), jnp.asarray(y[0]))))(flat)
    exact = np.linalg.eigvalsh(np.asarray(dense))[-1]
    assert last["lambda_max"] == pytest.approx(exact, rel=1e-8)
    assert last["edge_of_stability_ratio"] == pytest.approx(exact * 0.05 / 2, rel=1e-8)
    assert last["stable_lr_bound"] == pytest.approx(2 / exact, rel=1e-8)
    # one training batch, as the callback measured before: a different, noisier number
    batch_only = curvature.HessianCallback(every_k_steps=5, batch=(jnp.asarray(x[0, :32]), jnp.asarray(y[0, :32])))
    assert batch_only.measure(loss_fn, result.state.params, batch_only.batch, 10)["lambda_max"] != pytest.approx(
        exact, rel=1e-3)


def test_hessian_callback_bad_input():
    with pytest.raises(ValueError, match="every_k_steps: expected an integer >= 1, got 0"):
        curvature.HessianCallback(every_k_steps=0)
    with pytest.raises(ValueError, match="trace_samples: expected 0 \\(no trace\\) or >= 2"):
        curvature.HessianCallback(every_k_steps=1, trace_samples=1)
    with pytest.raises(ValueError, match="examples: expected an integer >= 1, got 0"):
        curvature.HessianCallback(every_k_steps=1, examples=0)
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
