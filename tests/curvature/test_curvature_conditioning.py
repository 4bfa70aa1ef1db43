"""Conditioning, critical points, gradient-direction quantities and Newton steps on closed-form problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnn.curvature as curvature
from _curvature_models import classification_data, flat, matrix_with_spectrum, mlp_loss, mlp_params

KEY = jax.random.key(3)


def _ridge_loss(lam, w, batch):
    """½||Xw − y||² + ½λ||w||² (sums, not means): the Hessian is exactly XᵀX + λI."""
    x, y = batch
    return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)


def _quadratic_with_linear_term(matrix, vector, theta, batch):
    """½θᵀAθ − bᵀθ: gradient Aθ − b, Hessian A, minimiser A⁻¹b."""
    return 0.5 * theta @ (matrix @ theta) - vector @ theta


def _polynomial_surface(coefficients, p, batch):
    """a x² + b y² + c y⁴ (coefficients as a Partial argument: one compiled program for every surface)."""
    a, b, c = coefficients[0], coefficients[1], coefficients[2]
    return a * p["x"] ** 2 + b * p["y"] ** 2 + c * p["y"] ** 4


SURFACES = {
    "saddle": (1.0, -1.0, 0.0),  # x² − y²
    "bowl": (1.0, 1.0, 0.0),  # x² + y²
    "cap": (-1.0, -1.0, 0.0),  # −x² − y²
    "flat direction": (1.0, 0.0, 1.0),  # x² + y⁴
}


def _two_variable(kind):
    return jax.tree_util.Partial(_polynomial_surface, jnp.asarray(SURFACES[kind]))


def test_ridge_regression_condition_number_from_svd(x64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) * np.linspace(0.2, 3.0, 12)
    y = rng.normal(size=40)
    lam = 0.3
    singular = np.linalg.svd(x, compute_uv=False)
    expected = (singular.max() ** 2 + lam) / (singular.min() ** 2 + lam)
    op = curvature.hessian(jax.tree_util.Partial(_ridge_loss, lam), np.zeros(12), (x, y))
    np.testing.assert_allclose(np.asarray(curvature.dense_matrix(op)), x.T @ x + lam * np.eye(12), atol=1e-12)
    condition = curvature.condition_number(op, KEY, num_iters=12, progress=False)
    assert condition.verdict == "positive definite" and condition.positive_definite
    assert condition.condition_number == pytest.approx(expected, rel=1e-10)
    assert condition.lambda_max == pytest.approx(singular.max() ** 2 + lam, rel=1e-12)
    assert condition.nonconvexity_ratio == pytest.approx(1 / expected, rel=1e-10)


def test_saddle_minimum_maximum_degenerate_and_not_critical(x64):
    origin = {"x": np.float64(0.0), "y": np.float64(0.0)}
    saddle = curvature.classify_critical_point(curvature.hessian(_two_variable("saddle"), origin), KEY, progress=False)
    assert saddle.kind == "saddle" and saddle.lambda_min == pytest.approx(-2.0) and saddle.lambda_max == pytest.approx(2.0)
    assert abs(float(saddle.escape_direction["y"])) == pytest.approx(1.0, abs=1e-12)  # ±ŷ
    assert float(saddle.escape_direction["x"]) == pytest.approx(0.0, abs=1e-12)
    assert saddle.escape_curvature == pytest.approx(-2.0)

    bowl = curvature.classify_critical_point(curvature.hessian(_two_variable("bowl"), origin), KEY, progress=False)
    assert bowl.kind == "minimum" and bowl.escape_direction is None
    cap = curvature.classify_critical_point(curvature.hessian(_two_variable("cap"), origin), KEY, progress=False)
    assert cap.kind == "maximum" and cap.escape_curvature == pytest.approx(-2.0)
    flat_direction = curvature.classify_critical_point(
        curvature.hessian(_two_variable("flat direction"), origin), KEY, progress=False
    )
    assert flat_direction.kind == "degenerate"  # Hessian diag(2, 0): the second-order test is inconclusive
    away = curvature.classify_critical_point(
        curvature.hessian(_two_variable("saddle"), {"x": np.float64(1.0), "y": np.float64(0.0)}), KEY, progress=False
    )
    assert away.kind == "not critical" and away.gradient_norm == pytest.approx(2.0)


def test_l2_svm_hessian_is_two_lambda_identity(x64):
    """λ||w||² + mean hinge: the hinge is piecewise linear, so H = 2λI (not λI) away from the margin."""
    lam = 0.05
    x, labels = classification_data(2, num_examples=50, num_features=8)
    signs = np.where(labels > 0, 1.0, -1.0)
    w = np.random.default_rng(1).normal(size=8)
    assert np.min(np.abs(1 - signs * (x @ w))) > 1e-6  # no example exactly on the margin

    def svm_loss(weights, batch):
        inputs, targets = batch
        return lam * jnp.sum(weights**2) + jnp.mean(jnp.maximum(0.0, 1.0 - targets * (inputs @ weights)))

    op = curvature.hessian(svm_loss, w, (x, signs))
    np.testing.assert_allclose(np.asarray(curvature.dense_matrix(op)), 2 * lam * np.eye(8), atol=1e-15)
    condition = curvature.condition_number(op, KEY, num_iters=8, progress=False)
    assert condition.lambda_max == pytest.approx(2 * lam) and condition.lambda_min == pytest.approx(2 * lam)
    assert condition.condition_number == pytest.approx(1.0)
    assert curvature.trace(op, KEY, 4, progress=False).estimate == pytest.approx(2 * lam * 8, rel=1e-12)


def test_gradient_direction_quantities_are_exact_on_a_quadratic(x64):
    matrix = matrix_with_spectrum([0.5, 1.0, 2.0, 3.0, 10.0], seed=4)
    vector = np.array([1.0, -2.0, 0.5, 0.0, 1.5])
    loss_fn = jax.tree_util.Partial(_quadratic_with_linear_term, jnp.asarray(matrix), jnp.asarray(vector))
    theta = np.array([0.3, 0.1, -0.4, 2.0, 1.0])
    op = curvature.hessian(loss_fn, theta)
    result = curvature.gradient_curvature(op)
    g = matrix @ theta - vector
    assert result.gradient_curvature_product == pytest.approx(g @ matrix @ g, rel=1e-13)
    assert result.directional_curvature == pytest.approx(g @ matrix @ g / (g @ g), rel=1e-13)
    assert result.largest_nonincreasing_step == pytest.approx(2 * (g @ g) / (g @ matrix @ g), rel=1e-13)
    loss = lambda t: float(loss_fn(jnp.asarray(t), None))
    for step in (0.01, result.optimal_step, 0.3):
        actual = loss(theta - step * g) - loss(theta)
        assert curvature.predicted_loss_change(result, step) == pytest.approx(actual, rel=1e-10, abs=1e-14)
    # The model is exact for a quadratic: the largest non-increasing step returns to the same loss.
    assert loss(theta - result.largest_nonincreasing_step * g) == pytest.approx(loss(theta), rel=1e-12)
    np.testing.assert_allclose(curvature.predicted_loss_change(result, np.array([0.0, 0.1])), [0.0, curvature.predicted_loss_change(result, 0.1)])


def test_quadratic_model_is_second_order_accurate_on_an_mlp(x64):
    params, batch = mlp_params(0), classification_data(1)
    op = curvature.hessian(mlp_loss, params, batch)
    result = curvature.gradient_curvature(op)
    loss, gradient = op.loss_and_gradient()
    errors = []
    for step in (0.2, 0.1, 0.05):
        moved = jax.tree.map(lambda p, g: p - step * g, op.params, gradient)
        actual = float(op.loss_value(moved)) - float(loss)
        errors.append(abs(actual - curvature.predicted_loss_change(result, step)))
    # Third-order remainder: halving the step divides the error by ≈ 8.
    assert 6 < errors[0] / errors[1] < 10 and 6 < errors[1] / errors[2] < 10


def test_newton_step_solves_the_quadratic(x64):
    positive = matrix_with_spectrum([0.1, 0.5, 1.0, 4.0, 9.0, 20.0], seed=5)
    indefinite = matrix_with_spectrum([-3.0, -0.5, 1.0, 4.0, 9.0, 20.0], seed=6)
    vector = np.arange(1.0, 7.0)
    theta = np.full(6, 0.5)
    for matrix, methods in ((positive, ("cg", "gmres", "dense")), (indefinite, ("gmres", "dense"))):
        loss_fn = jax.tree_util.Partial(_quadratic_with_linear_term, jnp.asarray(matrix), jnp.asarray(vector))
        op = curvature.hessian(loss_fn, theta)
        for method in methods:
            result = curvature.newton_step(op, method=method, tol=1e-12)
            np.testing.assert_allclose(theta + flat(result.step), np.linalg.solve(matrix, vector), rtol=1e-8)
            assert result.relative_residual < 1e-8
    op = curvature.hessian(jax.tree_util.Partial(_quadratic_with_linear_term, jnp.asarray(positive), jnp.asarray(vector)), theta)
    damped = curvature.newton_step(op, method="cg", damping=2.0, tol=1e-12)
    gradient = positive @ theta - vector
    np.testing.assert_allclose(flat(damped.step), -np.linalg.solve(positive + 2.0 * np.eye(6), gradient), rtol=1e-8)


def test_invalid_conditioning_arguments_are_rejected(x64):
    op = curvature.hessian(_two_variable("saddle"), {"x": np.float64(0.0), "y": np.float64(0.0)})
    with pytest.raises(ValueError, match="zero_tolerance: expected a finite number >= 0, got -1.0"):
        curvature.condition_number(op, KEY, zero_tolerance=-1.0, progress=False)
    with pytest.raises(TypeError, match="lanczos_result: expected a LanczosResult, got tuple"):
        curvature.condition_number(op, lanczos_result=(1.0, 2.0))
    with pytest.raises(ValueError, match="gradient: expected a pytree with the structure of params"):
        curvature.classify_critical_point(op, KEY, gradient={"x": 0.0}, progress=False)
    with pytest.raises(ValueError, match="operator kind 'linear' has no loss function"):
        curvature.gradient_curvature(curvature.linear_operator(lambda v: v, np.zeros(2)))
    with pytest.raises(ValueError, match=r"method: expected one of \['cg', 'gmres', 'dense'\], got 'lbfgs'"):
        curvature.newton_step(op, method="lbfgs")
    with pytest.raises(TypeError, match="curvature: expected a GradientCurvature"):
        curvature.predicted_loss_change({"gradient_norm": 1.0}, 0.1)
