"""Synthetic data sets with known structure: Gaussian blobs, a teacher network, and an exact quadratic.

All generators draw from numpy Generators seeded by ``data_seed`` (default: the dataset ``seed``), so the
same seed gives the same examples. Examples are generated as one pool; `load_dataset` splits it.

The "quadratic" set is linear regression, whose loss is an exact quadratic in the weights
``w`` (shape (d, out), no bias):

    L(w) = 1/(2n) Σ_i ||x_i w − y_i||²   ⇒   ∇²L = kron(XᵀX/n, I_out)   (w flattened row-major)

(`quadratic_loss`, `quadratic_hessian`). With the mean-squared-error convention
``mean_{i,j} (x_i w − y_i)_j²`` (e.g. ``optax.losses.squared_error(...).mean()``) the Hessian is
``(2/out) · kron(XᵀX/n, I_out)``. The inputs are generated so that XᵀX/n over the whole generated pool
equals ``U diag(eigenvalues) Uᵀ`` exactly (``whiten=True``), so with ``val_fraction=test_fraction=0`` and
``standardize=False`` the train-set Hessian of `quadratic_loss` has exactly the chosen eigenvalues (each
repeated ``out`` times). Whatever the split, `quadratic_hessian(train.x)` is the exact Hessian on train.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxnn.validation import check_float, check_int
from jaxnn.data.dataset import SourceData

# Stream tags so that the generators of different data sets never share random numbers.
_BLOBS_STREAM, _TEACHER_STREAM, _QUADRATIC_STREAM = 101, 102, 103

TEACHER_KINDS = ("mlp", "linear")
TEACHER_ACTIVATIONS = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "identity": lambda z: z,
}
TEACHER_BIAS_STD = 0.1


def _generator(seed: int, stream: int, part: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(stream, part)))


def _data_seed(seed: int, data_seed) -> int:
    return seed if data_seed is None else check_int(data_seed, "data_seed", minimum=0, allow_bool=False)


def load_blobs(*, data_dir=None, seed: int = 0, download: bool = True, num_examples: int = 1000,
               num_features: int = 2, num_classes: int = 3, cluster_std: float = 1.0,
               center_box: tuple[float, float] = (-10.0, 10.0), data_seed: int | None = None) -> SourceData:
    """Isotropic Gaussian blobs: class k ~ N(c_k, cluster_std² I), centres c_k uniform in ``center_box``^d.

    ``sklearn.datasets.make_blobs``; classes are balanced (sizes differ by at most one). The centres are
    recorded in ``info["centers"]``.
    """
    del data_dir, download
    num_examples = check_int(num_examples, "num_examples", minimum=2, allow_bool=False)
    num_features = check_int(num_features, "num_features", minimum=1, allow_bool=False)
    num_classes = check_int(num_classes, "num_classes", minimum=2, allow_bool=False)
    if num_examples < num_classes:
        raise ValueError(f"num_examples must be >= num_classes={num_classes}; got {num_examples}")
    cluster_std = check_float(cluster_std, "cluster_std", minimum=0.0, exclusive_minimum=True, strict=True)
    if len(tuple(center_box)) != 2 or not center_box[0] < center_box[1]:
        raise ValueError(f"center_box must be (low, high) with low < high; got {center_box!r}")
    import sklearn.datasets  # imported here: scikit-learn takes seconds to import and only this loader needs it

    generator_seed = int(_generator(_data_seed(seed, data_seed), _BLOBS_STREAM).integers(2**31 - 1))
    x, y, centers = sklearn.datasets.make_blobs(
        n_samples=num_examples, n_features=num_features, centers=num_classes, cluster_std=cluster_std,
        center_box=tuple(float(c) for c in center_box), shuffle=True, random_state=generator_seed,
        return_centers=True,
    )
    info = {
        "source": "synthetic Gaussian blobs (sklearn.datasets.make_blobs)",
        "generator": {"num_examples": num_examples, "num_features": num_features, "num_classes": num_classes,
                      "cluster_std": cluster_std, "center_box": [float(c) for c in center_box],
                      "data_seed": _data_seed(seed, data_seed)},
        "centers": centers.tolist(),
    }
    return SourceData(x=x.astype(np.float64), y=y.astype(np.int32), num_classes=num_classes,
                      task="classification", info=info)


def teacher_params(data_seed: int, input_dim: int, output_dim: int, *, teacher: str = "mlp",
                   hidden_widths: Sequence[int] = (32,)) -> list[tuple[np.ndarray, np.ndarray]]:
    """The teacher's layers [(W, b), ...] as drawn by the "teacher_student" set with this ``data_seed``.

    W_l ~ N(0, 1/fan_in) (LeCun normal), b_l ~ N(0, 0.1²); ``teacher="linear"`` is the single layer
    (input_dim -> output_dim), ``"mlp"`` has hidden layers of ``hidden_widths``.
    """
    if teacher not in TEACHER_KINDS:
        raise ValueError(f"teacher must be one of {list(TEACHER_KINDS)}; got {teacher!r}")
    widths = [] if teacher == "linear" else [check_int(w, "hidden_widths[i]", minimum=1, allow_bool=False)
                                             for w in hidden_widths]
    if teacher == "mlp" and not widths:
        raise ValueError("hidden_widths must list at least one width for teacher='mlp'")
    sizes = [input_dim, *widths, output_dim]
    rng = _generator(data_seed, _TEACHER_STREAM, 0)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        weight = rng.normal(0.0, 1.0 / math.sqrt(fan_in), size=(fan_in, fan_out))
        bias = rng.normal(0.0, TEACHER_BIAS_STD, size=(fan_out,))
        layers.append((weight, bias))
    return layers


def teacher_forward(layers: Sequence[tuple[np.ndarray, np.ndarray]], x: np.ndarray, activation: str = "tanh") -> np.ndarray:
    """f(x) = W_L σ(… σ(x W_1 + b_1) …) + b_L: the activation between layers, none after the last."""
    if activation not in TEACHER_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(TEACHER_ACTIVATIONS)}; got {activation!r}")
    hidden = np.asarray(x, dtype=np.float64)
    for index, (weight, bias) in enumerate(layers):
        hidden = hidden @ weight + bias
        if index < len(layers) - 1:
            hidden = TEACHER_ACTIVATIONS[activation](hidden)
    return hidden


def load_teacher_student(*, data_dir=None, seed: int = 0, download: bool = True, num_examples: int = 1000,
                         input_dim: int = 10, output_dim: int = 1, teacher: str = "mlp",
                         hidden_widths: Sequence[int] = (32,), activation: str = "tanh", noise_std: float = 0.1,
                         data_seed: int | None = None) -> SourceData:
    """Regression on a random teacher: x ~ N(0, I_d), y = teacher(x) + noise_std · N(0, I_out); y float (n, out).

    The teacher is ``teacher_params(data_seed, input_dim, output_dim, teacher=..., hidden_widths=...)``
    evaluated by ``teacher_forward(..., activation)``; recover it from ``info["generator"]``.
    """
    del data_dir, download
    num_examples = check_int(num_examples, "num_examples", minimum=1, allow_bool=False)
    input_dim = check_int(input_dim, "input_dim", minimum=1, allow_bool=False)
    output_dim = check_int(output_dim, "output_dim", minimum=1, allow_bool=False)
    noise_std = check_float(noise_std, "noise_std", minimum=0.0, strict=True)
    if activation not in TEACHER_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(TEACHER_ACTIVATIONS)}; got {activation!r}")
    seed_used = _data_seed(seed, data_seed)
    layers = teacher_params(seed_used, input_dim, output_dim, teacher=teacher, hidden_widths=hidden_widths)
    rng = _generator(seed_used, _TEACHER_STREAM, 1)
    x = rng.standard_normal((num_examples, input_dim))
    y = teacher_forward(layers, x, activation) + noise_std * rng.standard_normal((num_examples, output_dim))
    info = {
        "source": f"synthetic teacher-student regression ({teacher} teacher)",
        "generator": {"num_examples": num_examples, "input_dim": input_dim, "output_dim": output_dim,
                      "teacher": teacher, "hidden_widths": [int(w) for w in hidden_widths] if teacher == "mlp" else [],
                      "activation": activation, "noise_std": noise_std, "data_seed": seed_used},
        "teacher_function": "jaxnn.data.teacher_forward(jaxnn.data.teacher_params(data_seed, input_dim, "
                            "output_dim, teacher=teacher, hidden_widths=hidden_widths), x, activation)",
    }
    return SourceData(x=x, y=y, num_classes=None, task="regression", info=info)


def quadratic_eigenvalues(input_dim: int, *, condition_number: float = 100.0, max_eigenvalue: float = 1.0) -> np.ndarray:
    """Geometric spectrum λ_i = max_eigenvalue · condition_number^(−i/(d−1)), i = 0..d−1 (descending)."""
    input_dim = check_int(input_dim, "input_dim", minimum=1, allow_bool=False)
    condition_number = check_float(condition_number, "condition_number", minimum=1.0, strict=True)
    max_eigenvalue = check_float(max_eigenvalue, "max_eigenvalue", minimum=0.0, exclusive_minimum=True, strict=True)
    if input_dim == 1:
        return np.array([max_eigenvalue])
    return max_eigenvalue * condition_number ** (-np.arange(input_dim) / (input_dim - 1))


def _haar_orthogonal(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A Haar-random orthogonal matrix: QR of a Gaussian matrix with the signs of diag(R) folded into Q."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def load_quadratic(*, data_dir=None, seed: int = 0, download: bool = True, num_examples: int = 256,
                   input_dim: int = 10, output_dim: int = 1, eigenvalues: Sequence[float] | None = None,
                   condition_number: float = 100.0, max_eigenvalue: float = 1.0, noise_std: float = 0.0,
                   whiten: bool = True, rotate: bool = True, data_seed: int | None = None) -> SourceData:
    """Linear-regression data whose squared loss is an exact quadratic with a chosen Hessian spectrum.

    x = z diag(√λ) Uᵀ with U Haar-random orthogonal (identity if ``rotate=False``) and z standard normal,
    whitened (``whiten=True``) so that zᵀz/n = I exactly over the generated pool; hence XᵀX/n = U diag(λ) Uᵀ
    exactly and the Hessian of `quadratic_loss` is kron(U diag(λ) Uᵀ, I_out). λ = ``eigenvalues`` (d
    non-negative numbers) or the geometric `quadratic_eigenvalues` (``condition_number``,
    ``max_eigenvalue``). y = x w* + noise_std · N(0, 1) with w* ~ N(0, 1) of shape (d, out); with no noise
    w* is the exact minimiser. See the module docstring for the loss conventions.
    """
    del data_dir, download
    num_examples = check_int(num_examples, "num_examples", minimum=1, allow_bool=False)
    input_dim = check_int(input_dim, "input_dim", minimum=1, allow_bool=False)
    output_dim = check_int(output_dim, "output_dim", minimum=1, allow_bool=False)
    noise_std = check_float(noise_std, "noise_std", minimum=0.0, strict=True)
    if eigenvalues is None:
        spectrum = quadratic_eigenvalues(input_dim, condition_number=condition_number, max_eigenvalue=max_eigenvalue)
    else:
        spectrum = np.asarray(eigenvalues, dtype=np.float64)
        if spectrum.shape != (input_dim,):
            raise ValueError(f"eigenvalues must have shape (input_dim,)=({input_dim},); got shape {spectrum.shape}")
        if not np.all(np.isfinite(spectrum)) or np.any(spectrum < 0):
            raise ValueError(f"eigenvalues must be finite and >= 0 (they form a covariance); got {spectrum.tolist()}")
    if whiten and num_examples < input_dim:
        raise ValueError(
            f"num_examples must be >= input_dim={input_dim} to whiten the inputs exactly; got {num_examples}"
        )
    seed_used = _data_seed(seed, data_seed)
    rng = _generator(seed_used, _QUADRATIC_STREAM)
    z = rng.standard_normal((num_examples, input_dim))
    if whiten:
        q, r = np.linalg.qr(z)
        z = math.sqrt(num_examples) * q * np.sign(np.diag(r))
    rotation = _haar_orthogonal(rng, input_dim) if rotate else np.eye(input_dim)
    x = (z * np.sqrt(spectrum)) @ rotation.T
    w_star = rng.standard_normal((input_dim, output_dim))
    y = x @ w_star + noise_std * rng.standard_normal((num_examples, output_dim))
    info = {
        "source": "synthetic quadratic (linear regression with a chosen input second-moment spectrum)",
        "generator": {"num_examples": num_examples, "input_dim": input_dim, "output_dim": output_dim,
                      "noise_std": noise_std, "whiten": bool(whiten), "rotate": bool(rotate),
                      "data_seed": seed_used},
        "eigenvalues": sorted(spectrum.tolist(), reverse=True),
        "hessian": "loss 1/(2n) sum_i ||x_i w - y_i||^2 over w of shape (d, out) has Hessian "
                   "kron(X^T X / n, I_out) (jaxnn.data.quadratic_hessian); exactly kron(U diag(eigenvalues) U^T, I_out) "
                   "on the whole generated pool when whiten=True",
        "teacher_weights": w_star.tolist() if w_star.size <= 4096 else None,
    }
    return SourceData(x=x, y=y, num_classes=None, task="regression", info=info)


def quadratic_loss(w, batch):
    """L(w) = 1/(2n) Σ_i ||x_i w − y_i||² for w of shape (d, out) and a batch (x (n, d), y (n, out)).

    Exact quadratic in w with Hessian `quadratic_hessian(x, out)` = kron(XᵀX/n, I_out). Pure and jit-able.
    """
    x, y = batch
    residual = jnp.matmul(x, w) - y
    return 0.5 * jnp.sum(residual**2) / x.shape[0]


def quadratic_hessian(x, output_dim: int = 1) -> np.ndarray:
    """Closed-form Hessian of `quadratic_loss` at any w: kron(XᵀX/n, I_out), shape (d·out, d·out), float64.

    Indices follow w flattened row-major (w[i, j] -> i·out + j).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (n, d) matrix; got shape {x.shape}")
    output_dim = check_int(output_dim, "output_dim", minimum=1, allow_bool=False)
    return np.kron(x.T @ x / x.shape[0], np.eye(output_dim))


def quadratic_minimizer(x, y) -> np.ndarray:
    """argmin_w `quadratic_loss` = (XᵀX)⁺ Xᵀ y (least squares, float64), shape (d, out)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (n, d) and (n, out) with the same n; got {x.shape} and {y.shape}")
    return np.linalg.lstsq(x, y, rcond=None)[0]
