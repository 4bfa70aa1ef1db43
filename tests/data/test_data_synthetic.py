"""Synthetic sets: quadratic (closed-form Hessian vs jax.hessian), teacher-student (least squares), blobs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnn.data as data


def _dense_hessian(loss, w, batch):
    hessian = jax.jit(jax.hessian(loss))(w, batch)
    return np.asarray(hessian).reshape(w.size, w.size)


def test_quadratic_hessian_has_the_chosen_spectrum(x64):
    eigenvalues = [6.0, 3.0, 3.0, 1.0, 0.25, 0.0]  # repeated and zero eigenvalues
    ds = data.load_dataset("quadratic", input_dim=6, output_dim=2, eigenvalues=eigenvalues, num_examples=40,
                           val_fraction=0.0, test_fraction=0.0, standardize=False, dtype="float64")
    x, y = ds.train.x, ds.train.y
    assert x.shape == (40, 6) and y.shape == (40, 2) and ds.task == "regression" and ds.num_classes is None
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)))
    hessian = _dense_hessian(data.quadratic_loss, w, (jnp.asarray(x), jnp.asarray(y)))
    closed_form = data.quadratic_hessian(x, output_dim=2)
    np.testing.assert_allclose(hessian, closed_form, atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(hessian), np.sort(np.repeat(eigenvalues, 2)), atol=1e-10)
    np.testing.assert_allclose(x.T @ x / 40, closed_form[::2, ::2], atol=1e-12)
    # no noise: the generating weights are the exact minimiser and the loss there is 0
    w_star = np.array(ds.info["teacher_weights"])
    assert float(data.quadratic_loss(jnp.asarray(w_star), (x, y))) < 1e-20
    # a zero eigenvalue makes the minimiser non-unique: w* and the least-squares one differ by a null vector
    np.testing.assert_allclose(x @ (data.quadratic_minimizer(x, y) - w_star), 0.0, atol=1e-9)


def test_quadratic_minimizer_is_the_teacher_when_positive_definite(x64):
    ds = data.load_dataset("quadratic", input_dim=4, output_dim=2, eigenvalues=[4.0, 2.0, 1.0, 0.5],
                           num_examples=30, standardize=False, dtype="float64")
    np.testing.assert_allclose(data.quadratic_minimizer(ds.train.x, ds.train.y), np.array(ds.info["teacher_weights"]),
                               atol=1e-10)
    gradient = jax.grad(data.quadratic_loss)(jnp.asarray(ds.info["teacher_weights"]), (ds.train.x, ds.train.y))
    np.testing.assert_allclose(gradient, 0.0, atol=1e-12)


def test_quadratic_mse_convention(x64):
    ds = data.load_dataset("quadratic", input_dim=4, output_dim=3, num_examples=30, dtype="float64")
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)

    def mse(w, batch):
        return optax.losses.squared_error(batch[0] @ w, batch[1]).mean()

    w = jnp.zeros((4, 3))
    np.testing.assert_allclose(_dense_hessian(mse, w, (x, y)), (2.0 / 3.0) * data.quadratic_hessian(x, 3), atol=1e-12)


def test_quadratic_on_a_standardized_split_still_closed_form(x64):
    ds = data.load_dataset("quadratic", input_dim=5, condition_number=1e4, num_examples=100, dtype="float64")
    x, y = ds.train.x, ds.train.y
    hessian = _dense_hessian(data.quadratic_loss, jnp.ones((5, 1)), (x, y))
    np.testing.assert_allclose(hessian, data.quadratic_hessian(x), atol=1e-12)


def test_quadratic_geometric_spectrum(x64):
    values = data.quadratic_eigenvalues(5, condition_number=1e6, max_eigenvalue=2.0)
    np.testing.assert_allclose(values, 2.0 * np.array([1, 10**-1.5, 1e-3, 10**-4.5, 1e-6]), rtol=1e-12)
    ds = data.load_dataset("quadratic", input_dim=5, condition_number=1e6, max_eigenvalue=2.0, num_examples=20,
                           val_fraction=0, test_fraction=0, standardize=False, dtype="float64", rotate=False)
    second_moment = ds.train.x.T @ ds.train.x / 20
    np.testing.assert_allclose(second_moment, np.diag(values), atol=1e-12)  # rotate=False: axis-aligned
    assert ds.info["eigenvalues"] == pytest.approx(values.tolist(), rel=1e-12)


def test_quadratic_errors():
    with pytest.raises(ValueError, match=r"eigenvalues must have shape \(input_dim,\)=\(3,\); got shape \(2,\)"):
        data.load_dataset("quadratic", input_dim=3, eigenvalues=[1.0, 2.0])
    with pytest.raises(ValueError, match="eigenvalues must be finite and >= 0"):
        data.load_dataset("quadratic", input_dim=2, eigenvalues=[1.0, -1.0])
    with pytest.raises(ValueError, match="num_examples must be >= input_dim=10 to whiten"):
        data.load_dataset("quadratic", num_examples=5)
    with pytest.raises(ValueError, match="condition_number: expected a finite number >= 1, got 0.5"):
        data.load_dataset("quadratic", condition_number=0.5)
    with pytest.raises(ValueError, match=r"x must be a non-empty \(n, d\) matrix"):
        data.quadratic_hessian(np.zeros(3))


def test_linear_teacher_recovered_by_least_squares(x64):
    ds = data.load_dataset("teacher_student", teacher="linear", input_dim=5, output_dim=3, noise_std=0.0,
                           num_examples=50, standardize=False, dtype="float64", seed=2)
    assert ds.train.y.shape[1:] == (3,) and ds.output_dim == 3
    design = np.concatenate([ds.train.x, np.ones((len(ds.train), 1))], axis=1)
    solution = np.linalg.lstsq(design, ds.train.y, rcond=None)[0]
    [(weight, bias)] = data.teacher_params(2, 5, 3, teacher="linear")
    np.testing.assert_allclose(solution[:5], weight, atol=1e-10)
    np.testing.assert_allclose(solution[5], bias, atol=1e-10)


def test_mlp_teacher_and_noise_level(x64):
    ds = data.load_dataset("teacher_student", input_dim=4, output_dim=2, hidden_widths=(8, 6), activation="tanh",
                           noise_std=0.5, num_examples=4000, standardize=False, dtype="float64", seed=1,
                           val_fraction=0.0, test_fraction=0.0)
    layers = data.teacher_params(1, 4, 2, hidden_widths=(8, 6))
    assert [w.shape for w, _ in layers] == [(4, 8), (8, 6), (6, 2)]

    def independent_forward(x):  # jnp re-implementation of the documented teacher
        h = jnp.tanh(x @ layers[0][0] + layers[0][1])
        h = jnp.tanh(h @ layers[1][0] + layers[1][1])
        return h @ layers[2][0] + layers[2][1]

    residual = ds.train.y - np.asarray(independent_forward(jnp.asarray(ds.train.x)))
    # residual is N(0, 0.25) noise: sample std within ~5 standard errors (se = 0.5/sqrt(2*8000) ≈ 0.004)
    assert abs(residual.std() - 0.5) < 0.02 and abs(residual.mean()) < 0.03
    x = np.random.default_rng(0).normal(size=(7, 4))
    np.testing.assert_allclose(data.teacher_forward(layers, x, "tanh"), independent_forward(x), atol=1e-12)


def test_teacher_student_errors():
    with pytest.raises(ValueError, match=r"teacher must be one of \['mlp', 'linear'\]; got 'cnn'"):
        data.load_dataset("teacher_student", teacher="cnn")
    with pytest.raises(ValueError, match="activation must be one of"):
        data.load_dataset("teacher_student", activation="softplus")
    with pytest.raises(ValueError, match="noise_std: expected a finite number >= 0, got -1.0"):
        data.load_dataset("teacher_student", noise_std=-1)


def test_blobs_statistics(x64):
    ds = data.load_dataset("blobs", num_examples=3000, num_features=3, num_classes=4, cluster_std=0.5,
                           standardize=False, dtype="float64", val_fraction=0.0, test_fraction=0.0)
    centers = np.array(ds.info["centers"])
    assert centers.shape == (4, 3) and ds.input_shape == (3,) and ds.num_classes == 4
    counts = np.bincount(ds.train.y, minlength=4)
    assert counts.tolist() == [750, 750, 750, 750]
    for k in range(4):
        members = ds.train.x[ds.train.y == k]
        np.testing.assert_allclose(members.mean(axis=0), centers[k], atol=5 * 0.5 / np.sqrt(750))
        np.testing.assert_allclose(members.std(axis=0), 0.5, atol=0.05)
    nearest = np.argmin(((ds.train.x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
    assert (nearest == ds.train.y).mean() > 0.99


def test_synthetic_determinism_and_data_seed():
    a = data.load_dataset("blobs", seed=5)
    b = data.load_dataset("blobs", seed=5)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    # fixed data_seed, different split seeds: same examples, different split
    c = data.load_dataset("teacher_student", seed=0, data_seed=9, standardize=False)
    d = data.load_dataset("teacher_student", seed=1, data_seed=9, standardize=False)
    assert not np.array_equal(c.test.x, d.test.x)
    pool_c = np.sort(np.concatenate([c.train.x, c.val.x, c.test.x])[:, 0])
    pool_d = np.sort(np.concatenate([d.train.x, d.val.x, d.test.x])[:, 0])
    np.testing.assert_array_equal(pool_c, pool_d)


def test_blobs_errors():
    with pytest.raises(ValueError, match="num_classes: expected an integer >= 2, got 1"):
        data.load_dataset("blobs", num_classes=1)
    with pytest.raises(TypeError, match="num_examples: expected an integer >= 2, got float 10.5"):
        data.load_dataset("blobs", num_examples=10.5)
    with pytest.raises(ValueError, match="cluster_std: expected a finite number > 0, got"):
        data.load_dataset("blobs", cluster_std=0.0)
