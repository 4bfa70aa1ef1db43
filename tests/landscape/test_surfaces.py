"""Surfaces against independent oracles: closed forms on a quadratic with a known Hessian, a plain Python loop of
single evaluations, PyTorch on identical weights; per-point batch-norm statistics; non-finite points; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.landscape import Surface, bezier_surface, interpolation_surface, line_surface, plane_surface
from jaxnn.landscape.directions import eigenvector_directions


# ---------------------------------------------------------------- quadratic with a known Hessian
def _quadratic(seed=0):
    """L(θ) = ½ (θ−θ*)ᵀ A (θ−θ*) + 3 on a pytree θ = {'w': (3,), 'm': (2, 2)} (7 parameters), A = Q diag(λ) Qᵀ."""
    rng = np.random.default_rng(seed)
    eigenvalues = np.array([9.0, 4.0, 2.5, 1.0, 0.5, -0.3, -2.0])
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    a = q @ np.diag(eigenvalues) @ q.T
    theta_star = rng.normal(size=7)
    unravel = lambda f: {"w": jnp.asarray(f[:3]), "m": jnp.asarray(f[3:]).reshape(2, 2)}  # noqa: E731
    ravel = lambda p: jnp.concatenate([p["w"], p["m"].ravel()])  # noqa: E731
    a_j, star_j = jnp.asarray(a), jnp.asarray(theta_star)

    def loss(params, batch):
        delta = ravel(params) - star_j
        return 0.5 * delta @ a_j @ delta + 3.0

    return loss, a, theta_star, ravel, unravel


def test_line_along_eigenvector_is_exact_parabola_at_the_minimum(x64):
    loss, a, theta_star, _, unravel = _quadratic()
    values, vectors = np.linalg.eigh(a)  # independent oracle for the eigenpairs
    alphas = np.linspace(-2, 2, 21)
    for index in (0, 3, 6):  # most negative, middle, largest
        direction = unravel(vectors[:, index])
        surface = line_surface(loss, unravel(theta_star), direction, alphas, None, chunk_size=4, progress=False)
        np.testing.assert_allclose(surface.losses, 3.0 + 0.5 * values[index] * alphas**2, rtol=0, atol=1e-10)


def test_line_at_a_generic_point_has_the_closed_form(x64):
    loss, a, theta_star, _, unravel = _quadratic()
    values, vectors = np.linalg.eigh(a)
    theta = theta_star + np.random.default_rng(1).normal(size=7)
    v = vectors[:, -1]
    gradient = a @ (theta - theta_star)
    base = 0.5 * (theta - theta_star) @ a @ (theta - theta_star) + 3.0
    alphas = np.linspace(-1.5, 1.5, 13)
    surface = line_surface(loss, unravel(theta), unravel(v), alphas, None, progress=False)
    np.testing.assert_allclose(surface.losses, base + alphas * (gradient @ v) + 0.5 * values[-1] * alphas**2,
                               rtol=0, atol=1e-10)


def test_evaluation_options_as_keywords_or_one_object(x64):
    """SurfaceOptions: the same surface from keywords and from options=, keywords over the object's fields, and a
    misspelt option is a TypeError naming it (as a signature would)."""
    from jaxnn.landscape import SurfaceOptions

    loss, a, theta_star, _, unravel = _quadratic()
    theta, direction = unravel(theta_star + 0.3), unravel(np.linalg.eigh(a)[1][:, 0])
    alphas = np.linspace(-1, 1, 5)
    metric_fns = {"twice": lambda p, b: 2.0 * loss(p, b)}
    by_keywords = line_surface(loss, theta, direction, alphas, None, chunk_size=2, progress=False,
                               metric_fns=metric_fns)
    options = SurfaceOptions(chunk_size=2, progress=False, metric_fns=metric_fns)
    by_object = line_surface(loss, theta, direction, alphas, None, options=options)
    assert set(by_object.metrics) == {"loss", "twice"}
    for name in by_object.metrics:
        np.testing.assert_array_equal(by_object.metrics[name], by_keywords.metrics[name])
    overridden = line_surface(loss, theta, direction, alphas, None, options=options, metric_fns=None)
    assert set(overridden.metrics) == {"loss"}
    with pytest.raises(TypeError, match="plane_surface\\(\\) got an unexpected keyword argument 'chunksize'"):
        plane_surface(loss, theta, direction, direction, alphas, alphas, None, chunksize=4)
    with pytest.raises(TypeError, match="options must be a SurfaceOptions, got dict"):
        line_surface(loss, theta, direction, alphas, None, options={"chunk_size": 2})


def test_second_difference_along_top_eigenvector_is_lambda_max(x64):
    loss, a, theta_star, _, unravel = _quadratic()
    lambda_max = np.linalg.eigvalsh(a)[-1]
    theta = unravel(theta_star + 0.7)
    h = 0.25
    top_vector = unravel(np.linalg.eigh(a)[1][:, -1])
    line = line_surface(loss, theta, top_vector, [-h, 0.0, h], None, progress=False).losses
    np.testing.assert_allclose((line[0] - 2 * line[1] + line[2]) / h**2, lambda_max, rtol=1e-12)
    # the same through the curvature engine's eigenvector (Lanczos), not numpy's
    (engine_vector,), (engine_value,) = eigenvector_directions(loss, theta, None, k=1, key=jax.random.key(0),
                                                               progress=False, tol=1e-8)
    np.testing.assert_allclose(engine_value, lambda_max, rtol=1e-10)
    line = line_surface(loss, theta, engine_vector, [-h, 0.0, h], None, progress=False).losses
    np.testing.assert_allclose((line[0] - 2 * line[1] + line[2]) / h**2, lambda_max, rtol=1e-9)


def test_plane_on_quadratic_has_closed_form(x64):
    loss, a, theta_star, _, unravel = _quadratic()
    _, vectors = np.linalg.eigh(a)
    u, v = vectors[:, -1], vectors[:, 0]
    alphas, betas = np.linspace(-1, 1, 7), np.linspace(-2, 2, 5)
    surface = plane_surface(loss, unravel(theta_star), unravel(u), unravel(v), alphas, betas, None, chunk_size=6,
                            progress=False)
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")
    expected = 3.0 + 0.5 * (u @ a @ u) * grid_a**2 + (u @ a @ v) * grid_a * grid_b + 0.5 * (v @ a @ v) * grid_b**2
    assert surface.losses.shape == (7, 5)
    np.testing.assert_allclose(surface.losses, expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- grid == plain loop of single evaluations
def _mlp(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"dense1": {"kernel": jax.random.normal(k[0], (5, 8)) / np.sqrt(5), "bias": 0.1 * jax.random.normal(k[1], (8,))},
              "dense2": {"kernel": jax.random.normal(k[2], (8, 3)) / np.sqrt(8), "bias": 0.1 * jax.random.normal(k[3], (3,))}}

    def logits(p, x):
        h = jax.nn.relu(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
        return h @ p["dense2"]["kernel"] + p["dense2"]["bias"]

    def loss(p, batch):
        log_probs = jax.nn.log_softmax(logits(p, batch[0]))
        return -jnp.mean(jnp.take_along_axis(log_probs, batch[1][:, None], axis=1))

    def accuracy(p, batch):
        out = logits(p, batch[0])
        return jnp.mean((jnp.argmax(out, axis=-1) == batch[1]).astype(out.dtype))

    return params, loss, accuracy


def _batches(sizes, seed=1):
    keys = jax.random.split(jax.random.key(seed), 2 * len(sizes))
    return [(jax.random.normal(keys[2 * i], (n, 5)), jax.random.randint(keys[2 * i + 1], (n,), 0, 3))
            for i, n in enumerate(sizes)]


def _directions(params):
    leaves, treedef = jax.tree.flatten(params)
    d1 = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(10 + i), l.shape) for i, l in enumerate(leaves)])
    d2 = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(20 + i), l.shape) for i, l in enumerate(leaves)])
    return d1, d2


@pytest.mark.parametrize("factor_linear_ops", [True, False])
def test_plane_equals_python_loop_of_single_evaluations(x64, factor_linear_ops):
    """11 × 7 = 77 points in chunks of 9 (77 is not a multiple of 9), over 3 batches of 6 and a short one of 4;
    oracle: loss and accuracy at each point on the concatenated data, one evaluation at a time."""
    params, loss, accuracy = _mlp()
    d1, d2 = _directions(params)
    batches = _batches([6, 6, 6, 4])
    alphas, betas = np.linspace(-1, 1, 11), np.linspace(-0.5, 1.5, 7)
    surface = plane_surface(loss, params, d1, d2, alphas, betas, batches, accuracy_fn=accuracy, chunk_size=9,
                            factor_linear_ops=factor_linear_ops, progress=False)
    x = jnp.concatenate([b[0] for b in batches])
    y = jnp.concatenate([b[1] for b in batches])
    single_loss, single_accuracy = jax.jit(loss), jax.jit(accuracy)
    for i, alpha in enumerate(alphas):
        for j, beta in enumerate(betas):
            point = jax.tree.map(lambda t, u, v: t + alpha * u + beta * v, params, d1, d2)
            np.testing.assert_allclose(surface.losses[i, j], single_loss(point, (x, y)), rtol=1e-12)
            np.testing.assert_allclose(surface.accuracies[i, j], single_accuracy(point, (x, y)), rtol=1e-12)
    assert surface.num_examples == 22 and surface.num_batches == 4
    assert surface.nonfinite_counts == {"loss": 0, "accuracy": 0}


@pytest.mark.parametrize("factor_linear_ops", [True, False])
def test_small_batches_are_evaluated_together_with_the_same_values(x64, monkeypatch, factor_linear_ops):
    """The vmapped strategy evaluates several small batches of a group at once (one product per layer over all
    their rows); values equal the batch-by-batch evaluation, and the merge factor divides the group."""
    from jaxnn.curvature.batches import prepare_data
    from jaxnn.landscape import grid_evaluation

    params, loss, accuracy = _mlp()
    d1, d2 = _directions(params)
    batches = _batches([4] * 6 + [3])
    prepared = prepare_data(batches)
    assert grid_evaluation._merge_factors(prepared, 8) == (6, 1)
    assert grid_evaluation._merge_factors(prepared, 4) == (3, 1)  # at most chunk_size batches: 3 divides 6
    monkeypatch.setattr(grid_evaluation, "MERGED_ROWS", 8)
    assert grid_evaluation._merge_factors(prepared, 8) == (2, 1)  # at most 8 rows of 4
    grid = np.linspace(-1.0, 1.0, 5)
    run = lambda: plane_surface(loss, params, d1, d2, grid, grid, batches, accuracy_fn=accuracy, chunk_size=8,
                                factor_linear_ops=factor_linear_ops, strategy="vmap", progress=False)
    monkeypatch.setattr(grid_evaluation, "MERGED_ROWS", 4096)
    merged = run()
    monkeypatch.setattr(grid_evaluation, "MERGED_ROWS", 1)  # one batch at a time
    one_by_one = run()
    np.testing.assert_allclose(merged.losses, one_by_one.losses, rtol=1e-13)
    np.testing.assert_allclose(merged.accuracies, one_by_one.accuracies, rtol=1e-13)


def test_line_and_interpolation_equal_python_loop(x64):
    params, loss, accuracy = _mlp()
    other, _, _ = _mlp(seed=5)
    d1, _ = _directions(params)
    batch = _batches([10])[0]
    alphas = np.linspace(-0.5, 1.5, 9)
    line = line_surface(loss, params, d1, alphas, batch, chunk_size=4, progress=False)
    interpolation = interpolation_surface(loss, params, other, alphas, batch, accuracy_fn=accuracy, chunk_size=2,
                                          progress=False)
    for i, alpha in enumerate(alphas):
        np.testing.assert_allclose(line.losses[i], loss(jax.tree.map(lambda t, u: t + alpha * u, params, d1), batch),
                                   rtol=1e-12)
        between = jax.tree.map(lambda t0, t1: (1 - alpha) * t0 + alpha * t1, params, other)
        np.testing.assert_allclose(interpolation.losses[i], loss(between, batch), rtol=1e-12)
        np.testing.assert_allclose(interpolation.accuracies[i], accuracy(between, batch), rtol=1e-12)
    np.testing.assert_allclose(interpolation.value_at("loss", 0.0), loss(params, batch), rtol=1e-12)
    np.testing.assert_allclose(interpolation.value_at("loss", 1.0), loss(other, batch), rtol=1e-12)
    summary = interpolation.summary()["metrics"]["loss"]
    inside = (alphas >= 0) & (alphas <= 1)
    chord = (1 - alphas[inside]) * summary["at_start"] + alphas[inside] * summary["at_end"]
    np.testing.assert_allclose(summary["barrier"], np.max(interpolation.losses[inside] - chord), rtol=1e-12)


def test_bezier_curve_equals_python_loop_and_reports_its_barrier(x64):
    """φ(t) = (1−t)²θ₀ + 2t(1−t)θ_b + t²θ₁ evaluated point by point; the ends are the endpoints; the barrier is the
    largest excess over the chord; a bend at the midpoint of θ₀, θ₁ is the straight line (the interpolation)."""
    params, loss, accuracy = _mlp()
    other, _, _ = _mlp(seed=5)
    bend, _, _ = _mlp(seed=9)
    batch = _batches([10])[0]
    ts = np.linspace(0, 1, 7)
    curve = bezier_surface(loss, params, bend, other, ts, batch, accuracy_fn=accuracy, chunk_size=3, progress=False)
    assert curve.kind == "bezier"
    for i, t in enumerate(ts):
        point = jax.tree.map(lambda a, b, c: (1 - t) ** 2 * a + 2 * t * (1 - t) * b + t**2 * c, params, bend, other)
        np.testing.assert_allclose(curve.losses[i], loss(point, batch), rtol=1e-12)
        np.testing.assert_allclose(curve.accuracies[i], accuracy(point, batch), rtol=1e-12)
    summary = curve.summary()["metrics"]["loss"]
    np.testing.assert_allclose([summary["at_start"], summary["at_end"]], [loss(params, batch), loss(other, batch)],
                               rtol=1e-12)
    chord = (1 - ts) * summary["at_start"] + ts * summary["at_end"]
    np.testing.assert_allclose(summary["barrier"], np.max(curve.losses - chord), rtol=1e-12)
    middle = jax.tree.map(lambda a, c: (a + c) / 2, params, other)
    straight = bezier_surface(loss, params, middle, other, ts, batch, progress=False)
    line = interpolation_surface(loss, params, other, ts, batch, progress=False)
    np.testing.assert_allclose(straight.losses, line.losses, rtol=1e-10)
    with pytest.raises(ValueError, match="bend"):
        bezier_surface(loss, params, {"dense1": params["dense1"]}, other, ts, batch, progress=False)


def test_stacked_batches_equal_list_of_batches_and_float32_default():
    params, loss, accuracy = _mlp()
    d1, d2 = _directions(params)
    batches = _batches([8, 8, 8])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)
    grid = np.linspace(-1, 1, 5)
    from_list = plane_surface(loss, params, d1, d2, grid, grid, batches, progress=False)
    from_stack = plane_surface(loss, params, d1, d2, grid, grid, stacked, stacked=True, progress=False)
    assert from_list.losses.dtype == np.float32
    np.testing.assert_allclose(from_list.losses, from_stack.losses, rtol=1e-6)
    x, y = (jnp.concatenate(parts) for parts in zip(*batches))
    point = jax.tree.map(lambda t, u, v: t + grid[1] * u + grid[4] * v, params, d1, d2)
    np.testing.assert_allclose(from_list.losses[1, 4], loss(point, (x, y)), rtol=2e-5)


def test_metric_fns_dict(x64):
    params, loss, accuracy = _mlp()
    d1, _ = _directions(params)
    batch = _batches([10])[0]
    squared_norm = lambda p, b: sum(jnp.sum(v**2) for v in jax.tree.leaves(p))  # noqa: E731
    alphas = np.array([-1.0, 0.0, 2.0])
    surface = line_surface(loss, params, d1, alphas, batch, metric_fns={"squared_norm": squared_norm},
                           accuracy_fn=accuracy, progress=False)
    assert set(surface.metrics) == {"loss", "accuracy", "squared_norm"}
    for i, alpha in enumerate(alphas):
        np.testing.assert_allclose(surface.metrics["squared_norm"][i],
                                   squared_norm(jax.tree.map(lambda t, u: t + alpha * u, params, d1), None), rtol=1e-12)


@pytest.mark.parametrize("factor_linear_ops", [True, False])
def test_progress_bar_reports_and_does_not_change_values(x64, capsys, factor_linear_ops):
    params, loss, _ = _mlp()
    d1, _ = _directions(params)
    batches = _batches([4, 4])
    alphas = np.linspace(-1, 1, 7)
    quiet = line_surface(loss, params, d1, alphas, batches, chunk_size=3, progress=False,
                         factor_linear_ops=factor_linear_ops)
    shown = line_surface(loss, params, d1, alphas, batches, chunk_size=3, progress=True,
                         factor_linear_ops=factor_linear_ops)
    np.testing.assert_array_equal(quiet.losses, shown.losses)
    assert "line surface" in capsys.readouterr().err


# ---------------------------------------------------------------- batch-norm statistics recomputed per point
def _bn_model():
    """h = x W; BN(h) = (h − μ)/√(σ² + ε); out = relu(BN(h)) v. Statistics: per-feature moments over the data."""
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (4, 3)), "v": jax.random.normal(k[1], (3,))}

    def batch_moments(p, batch):
        h = batch[0] @ p["w"]
        return {"mean": jnp.mean(h, axis=0), "mean_square": jnp.mean(h**2, axis=0)}

    def loss_with_state(p, batch, state):
        h = batch[0] @ p["w"]
        variance = state["mean_square"] - state["mean"] ** 2
        out = jax.nn.relu((h - state["mean"]) / jnp.sqrt(variance + 1e-5)) @ p["v"]
        return jnp.mean((out - batch[1]) ** 2)

    return params, batch_moments, loss_with_state


@pytest.mark.parametrize("factor_linear_ops", [True, False])
def test_recompute_state_per_point_equals_loop_with_full_data_statistics(x64, factor_linear_ops):
    params, batch_moments, loss_with_state = _bn_model()
    keys = jax.random.split(jax.random.key(3), 6)
    batches = [(jax.random.normal(keys[i], (5, 4)) + i, jax.random.normal(keys[3 + i], (5,))) for i in range(3)]
    d1 = {"w": jax.random.normal(keys[0], (4, 3)), "v": jnp.zeros(3)}
    alphas = np.linspace(-1, 1, 7)
    surface = line_surface(loss_with_state, params, d1, alphas, batches, recompute_state_fn=batch_moments,
                           chunk_size=3, factor_linear_ops=factor_linear_ops, progress=False)
    x = jnp.concatenate([b[0] for b in batches])
    y = jnp.concatenate([b[1] for b in batches])
    for i, alpha in enumerate(alphas):
        point = jax.tree.map(lambda t, u: t + alpha * u, params, d1)
        statistics = batch_moments(point, (x, y))  # recomputed on all data at this point
        np.testing.assert_allclose(surface.losses[i], loss_with_state(point, (x, y), statistics), rtol=1e-11)
    # eval mode (statistics of θ, closed over) is a different surface away from α = 0 ...
    frozen = batch_moments(params, (x, y))
    eval_surface = line_surface(lambda p, b: loss_with_state(p, b, frozen), params, d1, alphas, batches,
                                progress=False)
    np.testing.assert_allclose(eval_surface.losses[3], surface.losses[3], rtol=1e-11)
    assert np.max(np.abs(eval_surface.losses - surface.losses)) > 1e-2
    # ... and state_data can differ from data: statistics from the first batch only
    first_only = line_surface(loss_with_state, params, d1, alphas, batches, recompute_state_fn=batch_moments,
                              state_data=batches[:1], progress=False)
    point = jax.tree.map(lambda t, u: t + alphas[0] * u, params, d1)
    np.testing.assert_allclose(first_only.losses[0],
                               loss_with_state(point, (x, y), batch_moments(point, batches[0])), rtol=1e-11)


def test_recompute_state_must_return_floating_arrays():
    params, _, loss_with_state = _bn_model()
    batch = (jnp.ones((3, 4)), jnp.ones(3))
    with pytest.raises(TypeError, match="recompute_state_fn: output leaf .* expected a floating dtype"):
        line_surface(loss_with_state, params, params, [0.0], batch,
                     recompute_state_fn=lambda p, b: {"count": jnp.int32(3)}, progress=False)


# ---------------------------------------------------------------- PyTorch on identical weights
@pytest.mark.torch
def test_plane_matches_pytorch_reference_structure(x64):
    """The reference tool's loop in PyTorch (float64): set weights θ+αd₁+βd₂ on an identical MLP, evaluate."""
    torch = pytest.importorskip("torch")
    params, loss, _ = _mlp()
    d1, d2 = _directions(params)
    batch = _batches([12])[0]
    grid = np.linspace(-1, 1, 4)
    surface = plane_surface(loss, params, d1, d2, grid, grid, batch, chunk_size=5, progress=False)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x, y = torch.tensor(np.asarray(batch[0])), torch.tensor(np.asarray(batch[1]), dtype=torch.long)
    to_torch = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        for i, alpha in enumerate(grid):
            for j, beta in enumerate(grid):
                for layer, name in ((model[0], "dense1"), (model[2], "dense2")):
                    kernel = params[name]["kernel"] + alpha * d1[name]["kernel"] + beta * d2[name]["kernel"]
                    bias = params[name]["bias"] + alpha * d1[name]["bias"] + beta * d2[name]["bias"]
                    layer.weight.copy_(to_torch(kernel).T)  # torch stores (out, in)
                    layer.bias.copy_(to_torch(bias))
                expected = torch.nn.functional.cross_entropy(model(x), y).item()
                np.testing.assert_allclose(surface.losses[i, j], expected, rtol=1e-12)


# ---------------------------------------------------------------- non-finite points
def test_nonfinite_points_are_kept_as_nan_and_counted(x64):
    def log_barrier(params, batch):
        return -jnp.log(1.0 - jnp.sum(params["w"] ** 2))  # NaN outside the unit ball, +inf on it

    params = {"w": jnp.zeros(2)}
    alphas = np.linspace(-1.5, 1.5, 7)
    surface = plane_surface(log_barrier, params, {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])},
                            alphas, alphas, None, progress=False)
    grid_a, grid_b = np.meshgrid(alphas, alphas, indexing="ij")
    outside = grid_a**2 + grid_b**2 >= 1.0
    assert np.isnan(surface.losses[outside]).all()
    np.testing.assert_allclose(surface.losses[~outside], -np.log(1 - grid_a[~outside] ** 2 - grid_b[~outside] ** 2),
                               rtol=1e-12)
    assert surface.nonfinite_counts["loss"] == int(outside.sum())
    summary = surface.summary()
    assert summary["nonfinite_points"] == int(outside.sum())
    assert summary["metrics"]["loss"]["nonfinite"] == int(outside.sum())
    np.testing.assert_allclose(summary["metrics"]["loss"]["at_origin"], 0.0, atol=1e-15)


# ---------------------------------------------------------------- bad input
def test_bad_input_errors_name_argument_expected_and_actual():
    params, loss, accuracy = _mlp()
    d1, d2 = _directions(params)
    batch = _batches([4])[0]
    grid = [0.0, 1.0]
    with pytest.raises(ValueError, match="d1: expected a pytree with the structure of params"):
        plane_surface(loss, params, {"dense1": d1["dense1"]}, d2, grid, grid, batch, progress=False)
    wrong_shape = jax.tree.map(lambda v: v, d2)
    wrong_shape["dense2"]["kernel"] = jnp.ones((3, 8))
    with pytest.raises(ValueError, match=r"d2: leaf \['dense2'\]\['kernel'\] expected shape \(8, 3\) "
                                         r"\(that of params\), got \(3, 8\)"):
        plane_surface(loss, params, d1, wrong_shape, grid, grid, batch, progress=False)
    with pytest.raises(ValueError, match="direction: expected a non-zero direction"):
        line_surface(loss, params, jax.tree.map(jnp.zeros_like, params), grid, batch, progress=False)
    with pytest.raises(ValueError, match="direction: leaf .* expected finite values, got 8 NaN/inf"):
        line_surface(loss, params, jax.tree.map(lambda v: v * jnp.nan, params), grid, batch, progress=False)
    other = jax.tree.map(lambda v: v, params)
    other["dense1"]["kernel"] = jnp.ones((5, 9))
    with pytest.raises(ValueError, match=r"params1: leaf \['dense1'\]\['kernel'\] expected shape \(5, 8\) "
                                         r"\(that of params0\), got \(5, 9\)"):
        interpolation_surface(loss, params, other, grid, batch, progress=False)
    with pytest.raises(ValueError, match="params1: expected a pytree with the structure of params0"):
        interpolation_surface(loss, params, {"dense1": params["dense1"]}, grid, batch, progress=False)
    with pytest.raises(ValueError, match="alphas: expected a 1-D array of coordinates, got shape \\(2, 1\\)"):
        line_surface(loss, params, d1, [[0.0], [1.0]], batch, progress=False)
    with pytest.raises(ValueError, match="alphas: expected at least one coordinate"):
        line_surface(loss, params, d1, [], batch, progress=False)
    with pytest.raises(ValueError, match="betas: expected finite coordinates"):
        plane_surface(loss, params, d1, d2, grid, [0.0, np.nan], batch, progress=False)
    with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1, got 0"):
        line_surface(loss, params, d1, grid, batch, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="data: expected at least one batch, got an empty list"):
        line_surface(loss, params, d1, grid, [], progress=False)
    with pytest.raises(ValueError, match="data: batch 1 expected the structure of batch 0"):
        line_surface(loss, params, d1, grid, [batch, (batch[0],)], progress=False)
    with pytest.raises(ValueError, match=r"data: leaf \[0\] expected finite values, got 1 non-finite"):
        line_surface(loss, params, d1, grid, (batch[0].at[0, 0].set(jnp.nan), batch[1]), progress=False)
    with pytest.raises(ValueError, match=r"metric_fns\['logits'\]: expected a scalar output, got shapes \[\(4, 3\)\]"):
        line_surface(loss, params, d1, grid, batch, progress=False,
                     metric_fns={"logits": lambda p, b: b[0] @ p["dense1"]["kernel"] @ p["dense2"]["kernel"]})
    with pytest.raises(ValueError, match=r"metric_fns: expected names other than \['loss'\] "
                                         r"\(taken by loss_fn/accuracy_fn\), got 'loss'"):
        line_surface(loss, params, d1, grid, batch, metric_fns={"loss": loss}, progress=False)
    with pytest.raises(TypeError, match="accuracy_fn: expected a callable"):
        line_surface(loss, params, d1, grid, batch, accuracy_fn="accuracy", progress=False)
    with pytest.raises(ValueError, match="loss_fn: failed when traced on params and one batch"):
        line_surface(lambda p, b: p["missing"], params, d1, grid, batch, progress=False)


def test_surface_checks_its_own_shapes():
    with pytest.raises(ValueError, match=r"metrics\['loss'\]: expected shape \(3,\), got \(2,\)"):
        Surface(kind="line", alphas=np.zeros(3), betas=None, metrics={"loss": np.zeros(2)}, nonfinite_counts={})
    with pytest.raises(ValueError, match="kind: expected one of"):
        Surface(kind="cube", alphas=np.zeros(3), betas=None, metrics={"loss": np.zeros(3)}, nonfinite_counts={})


def _cnn():
    """conv(3x3, 2->3) - relu - max-pool - dense on 6x6x2 images: a convolutional loss (per_point on CPU)."""
    keys = jax.random.split(jax.random.key(7), 3)
    params = {"conv": {"kernel": 0.5 * jax.random.normal(keys[0], (3, 3, 2, 3)), "bias": jnp.full((3,), 0.1)},
              "dense": {"kernel": 0.3 * jax.random.normal(keys[1], (27, 4)), "bias": jnp.zeros(4)}}

    def logits(p, x):
        h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
        h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return h.reshape(h.shape[0], -1) @ p["dense"]["kernel"] + p["dense"]["bias"]

    def loss(p, batch):
        out = jax.nn.log_softmax(logits(p, batch[0]))
        return -jnp.mean(jnp.take_along_axis(out, batch[1][:, None], axis=1))

    def accuracy(p, batch):
        return jnp.mean((jnp.argmax(logits(p, batch[0]), -1) == batch[1]).astype(jnp.result_type(float)))

    data_keys = jax.random.split(keys[2], 6)
    batches = [(jax.random.normal(data_keys[2 * i], (n, 6, 6, 2)), jax.random.randint(data_keys[2 * i + 1], (n,), 0, 4))
               for i, n in enumerate([5, 5, 3])]
    return params, loss, accuracy, batches


@pytest.mark.parametrize("strategy", ["python", "vmap", "auto"])
@pytest.mark.parametrize("factor_linear_ops", [True, False])
def test_convolutional_plane_is_the_same_with_every_strategy(x64, strategy, factor_linear_ops):
    """Oracle: loss and accuracy at each point on the concatenated data, one jitted evaluation at a time."""
    params, loss, accuracy, batches = _cnn()
    d1, d2 = _directions(params)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    surface = plane_surface(loss, params, d1, d2, alphas, betas, batches, accuracy_fn=accuracy, chunk_size=4,
                            factor_linear_ops=factor_linear_ops, strategy=strategy, progress=False)
    expected_strategy = "python" if strategy == "python" or (strategy == "auto" and jax.default_backend() == "cpu") \
        else "vmap"
    assert surface.timing["python_loop"] == float(expected_strategy == "python")
    x = jnp.concatenate([b[0] for b in batches])
    y = jnp.concatenate([b[1] for b in batches])
    single_loss, single_accuracy = jax.jit(loss), jax.jit(accuracy)
    for i, alpha in enumerate(alphas):
        for j, beta in enumerate(betas):
            point = jax.tree.map(lambda t, u, v: t + alpha * u + beta * v, params, d1, d2)
            np.testing.assert_allclose(surface.losses[i, j], single_loss(point, (x, y)), rtol=1e-12)
            np.testing.assert_allclose(surface.accuracies[i, j], single_accuracy(point, (x, y)), rtol=1e-12)


def test_unknown_or_unsupported_strategy_is_refused(x64):
    params, loss, _, batches = _cnn()
    d1, _ = _directions(params)
    with pytest.raises(ValueError, match="strategy must be one of auto, vmap, python, got 'fast'"):
        line_surface(loss, params, d1, [0.0, 1.0], batches, strategy="fast", progress=False)
    with pytest.raises(ValueError, match="strategy: 'python' .one point per call. does not recompute per-point state"):
        with pytest.warns(DeprecationWarning, match="strategy='per_point' is now strategy='python'"):
            line_surface(lambda p, b, s: loss(p, b), params, d1, [0.0, 1.0], batches, strategy="per_point",
                         recompute_state_fn=lambda p, b: {"m": jnp.mean(b[0])}, progress=False)
    with pytest.raises(ValueError, match="split: expected one of"):
        line_surface(loss, params, d1, [0.0, 1.0], batches, split="hosts", progress=False)
    with pytest.raises(ValueError, match="split: 'points' needs the 'vmap' strategy"):
        line_surface(loss, params, d1, [0.0, 1.0], batches, split="points", strategy="python", progress=False)


def test_points_split_on_one_device_is_the_data_path(x64):
    """Without a mesh of several devices there is nothing to split: ``split="points"`` gives the same numbers."""
    params, loss, _, batches = _cnn()
    d1, d2 = _directions(params)
    grid = np.linspace(-1.0, 1.0, 3)
    data = plane_surface(loss, params, d1, d2, grid, grid, batches, progress=False)
    points = plane_surface(loss, params, d1, d2, grid, grid, batches, split="points", progress=False)
    np.testing.assert_array_equal(points.losses, data.losses)
