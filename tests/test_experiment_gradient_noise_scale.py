"""The gradient_noise_scale experiment at smoke size, against independent computations: B_simple at two points of the
recorded run recomputed from per-example gradients taken one at a time (a Python loop of jax.grad, numpy covariance),
the critical-batch fit against the closed form through two points and against a synthetic hyperbola."""

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.experiment


def test_gradient_noise_scale_smoke_against_a_per_example_loop(tmp_path):
    import optax

    from jaxnn import data as data_lib, losses, models
    from jaxnn.experiments import run_experiment
    from jaxnn.experiments.gradient_noise_scale import fit_critical_batch
    from jaxnn.train import create_train_state, fit

    record = run_experiment("gradient_noise_scale", smoke=True, out_dir=tmp_path, progress=False)
    setting, measured = record["setting"], record["measured"]
    assert (tmp_path / "gradient_noise_scale.png").stat().st_size > 10_000
    assert record["verdict"] == {(True,): "agrees", (False,): "disagrees"}.get(
        tuple(set(c["agrees"] for c in record["checks"])), "partly")

    # B_simple at initialisation and at the target of seed 0's reference run: retrained by fit, per-example loop.
    digits = data_lib.load_dataset("digits", seed=setting["split_seed"])
    model = models.get_model("mlp", num_classes=10, width=setting["width"], depth=setting["depth"])
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    grad = jax.jit(jax.grad(lambda p, x, y: loss_fn(p, (x[None], y[None]))))
    x, y = np.asarray(digits.train.x), np.asarray(digits.train.y)

    def b_simple(params):
        rows = np.stack([np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad(params, x[i], y[i]))])
                         for i in range(len(x))]).astype(np.float64)
        mean = rows.mean(axis=0)
        return np.sum((rows - mean) ** 2) / len(rows) / np.sum(mean**2)

    start = create_train_state(model, optax.sgd(setting["reference_lr"]), digits.input_shape, jax.random.PRNGKey(0))
    points = measured["trajectory"]["0"]
    assert points[0]["b_simple"] == pytest.approx(b_simple(start.params), rel=2e-3)
    steps = points[-1]["steps"]
    assert points[-1]["status"] == "reached" and steps > 0
    state = fit(start, digits, batch_size=setting["reference_batch"], num_steps=steps, log_every=steps,
                eval_every=steps, progress=False).state
    assert float(loss_fn(state.params, (x, y))) == pytest.approx(points[-1]["train_loss"], rel=1e-4)
    assert points[-1]["b_simple"] == pytest.approx(b_simple(state.params), rel=2e-3)
    assert measured["b_simple_target"]["0"] == points[-1]["b_simple"]

    # The fit: two batch sizes give the hyperbola through both points, S = S_min + E_min / B, in closed form.
    (b1, b2), (s1, s2) = setting["batch_sizes"], measured["pooled_steps"]
    e_min = (s1 - s2) / (1 / b1 - 1 / b2)
    s_min = s1 - e_min / b1
    assert measured["pooled_fit"]["b_crit"] == pytest.approx(e_min / s_min, rel=1e-6)
    assert measured["ratio"] == pytest.approx(e_min / s_min / measured["b_simple_target_geomean"], rel=1e-6)
    sizes = np.array([8, 16, 32, 64, 128, 256, 512])
    synthetic = fit_critical_batch(sizes, 7.0 * (1 + 90.0 / sizes))
    assert synthetic["s_min"] == pytest.approx(7.0) and synthetic["b_crit"] == pytest.approx(90.0)
    assert synthetic["r2_log"] == pytest.approx(1.0) and np.max(np.abs(synthetic["residuals"])) < 1e-9
