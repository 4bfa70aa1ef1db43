"""The Laplace approximation of a trained network's posterior (MacKay 1992; Ritter et al. 2018; Daxberger et al.
2021, laplace-torch).

Around the trained weights θ* (a MAP estimate under the prior N(0, δ⁻¹I)), the posterior is approximated by
N(θ*, P⁻¹) with the precision P = s·GGN + δI, where GGN is the generalised Gauss-Newton matrix of the mean loss over
the n training examples and s = n (classification: softmax cross-entropy) or n/σ² (regression: Gaussian noise σ,
loss ½‖f − y‖²). ``structure`` says which P:

- ``"full"``: the dense GGN (small models; eigendecomposed once, so every δ costs nothing more);
- ``"diag"``: its exact diagonal;
- ``"kfac"``: its Kronecker factors (:func:`jaxnn.curvature.kfac`, type-2, eigendecomposed per block; the layers
  K-FAC cannot factor keep the exact diagonal);
- ``"last_layer"``: the dense GGN of the last Dense layer's parameters, the rest held at θ*.

The log marginal likelihood log p(D) ≈ log p(D|θ*) − ½δ‖θ*‖² + (d/2) log δ − ½ log det P (d: the parameters in the
posterior) picks δ (:meth:`Laplace.optimize_prior_precision`; weights trained without weight decay are no posterior
mode under any Gaussian prior, and for them the marginal likelihood's δ gives underconfident predictions; in
experiment ``laplace_calibration`` it did so in distribution even for weights trained with weight decay: tune δ on
held-out data instead, ``method="val_nll"``). Predictions linearise the network around θ* (the
"GLM predictive"): f(x) ~ N(f*(x), J(x) P⁻¹ J(x)ᵀ); classes by the probit approximation softmax(f*/√(1 + π/8 ·
diag Σ_f)) or Monte Carlo over f; regression: mean f*, variance diag Σ_f + σ².
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

LIKELIHOODS = ("classification", "regression")
STRUCTURES = ("full", "diag", "kfac", "last_layer")
PRIOR_METHODS = ("marglik", "val_nll")
CHUNK = 256  # examples per compiled predictive call


def _check_precision(value: Any, name: str = "prior_precision") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number > 0, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return value


@dataclasses.dataclass
class Laplace:
    """A fitted Laplace approximation (see the module docstring); build it with :func:`laplace`."""

    predict_fn: Callable
    params: Any
    structure: str
    likelihood: str
    prior_precision: float
    sigma_noise: float
    num_examples: int
    log_likelihood: float  # log p(D | θ*), summed over the training data
    scale: float  # s: n or n/σ²
    curvature: Any  # full / last_layer: (eigenvalues of the GGN, eigenvectors); diag: the diagonal; kfac: a KFAC
    subset: str | None  # last_layer: the layer's name
    layers: tuple = ()  # diag: the Dense / Conv layers whose predictive rows come from inputs and output gradients
    fallback: tuple = ()  # diag: the other modules holding parameters (per-example Jacobians)

    # -- the posterior precision -------------------------------------------------------------------------------------
    def _theta(self) -> jax.Array:
        tree = self.params if self.subset is None else _subtree(self.params, self.subset)
        return ravel_pytree(tree)[0]

    @property
    def num_params(self) -> int:
        return int(self._theta().size)

    def _precision_eigenvalues(self, prior_precision: float) -> np.ndarray:
        if self.structure in ("full", "last_layer"):
            return self.scale * np.asarray(self.curvature[0], np.float64) + prior_precision
        if self.structure == "diag":
            return self.scale * np.asarray(ravel_pytree(self.curvature)[0], np.float64) + prior_precision
        values = [np.ravel(v) for v in self.curvature.eigenvalues().values()]  # blocks (+ the fallback diagonal)
        return self.scale * np.concatenate(values).astype(np.float64) + prior_precision

    def log_det_precision(self, prior_precision: float | None = None) -> float:
        """log det P at ``prior_precision`` (default: the fitted one)."""
        prior = self.prior_precision if prior_precision is None else _check_precision(prior_precision)
        return float(np.sum(np.log(self._precision_eigenvalues(prior))))

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """log p(D) ≈ log p(D|θ*) − ½δ‖θ*‖² + (d/2) log δ − ½ log det P, θ* held fixed."""
        prior = self.prior_precision if prior_precision is None else _check_precision(prior_precision)
        theta = np.asarray(self._theta(), np.float64)
        return float(self.log_likelihood - 0.5 * prior * theta @ theta + 0.5 * theta.size * math.log(prior)
                     - 0.5 * self.log_det_precision(prior))

    def optimize_prior_precision(self, low: float = 1e-4, high: float = 1e4, points: int | None = None, *,
                                 method: str = "marglik", val: tuple | None = None) -> float:
        """Tune δ, set it and return it. ``method="marglik"``: δ maximising the log marginal likelihood (the best of
        ``points`` = 81 log-spaced values on [low, high], refined by golden section between its neighbours; the
        objective costs a sum of logs per δ). ``method="val_nll"``: δ minimising the predictive's negative
        log-likelihood on held-out data ``val`` = (x, y) (classification; ``points`` = 21 values, then 8 golden-section
        steps, each one predictive pass over ``val``) -- for weights that are not a posterior mode under any Gaussian
        prior (trained without weight decay), where the marginal likelihood's δ is known to give underconfident
        predictions."""
        if method not in PRIOR_METHODS:
            raise ValueError(f"method: expected one of {', '.join(PRIOR_METHODS)}, got {method!r}")
        if method == "marglik":
            objective, points, steps = (lambda d: -self.log_marginal_likelihood(d)), points or 81, 60
        else:
            if self.likelihood != "classification":
                raise ValueError("method='val_nll' tunes a classifier's predictive; this is a regression Laplace")
            if not isinstance(val, tuple) or len(val) != 2:
                raise ValueError("method='val_nll': pass the held-out data as val=(x, y)")
            labels = np.asarray(val[1])

            def objective(prior):
                p = np.asarray(self.predictive(val[0], prior_precision=prior), np.float64)
                return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-300, None))))

            points, steps = points or 21, 8
        grid = np.geomspace(_check_precision(low, "low"), _check_precision(high, "high"), points)
        values = [objective(d) for d in grid]
        best = int(np.argmin(values))
        a, b = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, points - 1)])
        ratio = (math.sqrt(5) - 1) / 2
        f = lambda t: objective(math.exp(t))  # noqa: E731
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = f(c), f(d)
        for _ in range(steps):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - ratio * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + ratio * (b - a)
                fd = f(d)
        middle = (a + b) / 2
        self.prior_precision = float(math.exp(middle)) if f(middle) <= values[best] else float(grid[best])
        return self.prior_precision

    # -- the posterior over outputs ------------------------------------------------------------------------------
    @property
    def _static(self) -> tuple:
        return (self.predict_fn, self.structure, self.subset, self.layers, self.fallback)

    def output_covariance(self, x: Any, prior_precision: float | None = None) -> tuple[jax.Array, jax.Array]:
        """(f*(x), J P⁻¹ Jᵀ): the outputs at θ* (B, C) and their linearised posterior covariance (B, C, C), at
        ``prior_precision`` (default: the fitted one); computed in chunks of ``CHUNK`` examples by one compiled
        program."""
        prior = self.prior_precision if prior_precision is None else _check_precision(prior_precision)
        count = int(jax.tree.leaves(x)[0].shape[0])
        size = min(CHUNK, count)
        padded = -(-count // size) * size
        x = jax.tree.map(lambda leaf: jnp.concatenate([jnp.asarray(leaf), jnp.repeat(jnp.asarray(leaf)[-1:],
                                                                                   padded - count, axis=0)]), x)
        dtype = ravel_pytree(self.params)[0].dtype
        parts = [_covariance_chunk(self._static, self.curvature, self.params, jnp.asarray(prior, dtype),
                                   jnp.asarray(self.scale, dtype), jax.tree.map(lambda leaf: leaf[start:start + size], x))
                 for start in range(0, padded, size)]
        return tuple(jnp.concatenate(column)[:count] for column in zip(*parts))

    def predictive(self, x: Any, *, method: str = "probit", samples: int = 100, key: Any = None,
                   prior_precision: float | None = None):
        """Classification: class probabilities (B, C) by the probit approximation (``method="probit"``) or Monte
        Carlo over the linearised outputs (``"mc"``, ``samples`` draws with ``key``). Regression: (mean, variance)
        with the noise σ² added. ``prior_precision``: another δ than the fitted one."""
        if method not in ("probit", "mc"):
            raise ValueError(f"method: expected 'probit' or 'mc', got {method!r}")
        outputs, covariance = self.output_covariance(x, prior_precision)
        if self.likelihood == "regression":
            return outputs, jnp.diagonal(covariance, axis1=1, axis2=2) + self.sigma_noise**2
        if method == "probit":
            variance = jnp.diagonal(covariance, axis1=1, axis2=2)
            return jax.nn.softmax(outputs / jnp.sqrt(1 + math.pi / 8 * variance), axis=-1)
        key = jax.random.PRNGKey(0) if key is None else key
        root = jnp.linalg.cholesky(covariance + 1e-10 * jnp.eye(covariance.shape[-1]))
        noise = jax.random.normal(key, (samples, *outputs.shape), outputs.dtype)
        draws = outputs[None] + jnp.einsum("bij,sbj->sbi", root, noise)
        return jnp.mean(jax.nn.softmax(draws, axis=-1), axis=0)


@functools.partial(jax.jit, static_argnums=0)  # one program per model and structure, for every chunk, δ and refit
def _covariance_chunk(static: tuple, curvature: Any, params: Any, prior: Any, scale: Any, x: Any):
    """(f*(x), J (s·M + δI)⁻¹ Jᵀ) for one chunk of examples; ``static`` = (predict_fn, structure, subset, layers,
    fallback)."""
    predict_fn, structure, subset, layers, fallback = static
    outputs = predict_fn(params, x)
    if structure == "kfac":  # from the layers' inputs and output gradients, no Jacobian formed
        return outputs, curvature.output_gram(predict_fn, x, prior / scale) / scale
    if structure == "diag" and layers:  # the same, in each layer's own basis
        from jaxnn.curvature.kfac import layer_matrix, layer_output_gram

        scaled = jax.tree.map(lambda d: scale * d, curvature)
        blocks = {"/".join(layer.path): (None, None, layer_matrix(scaled, layer)) for layer in layers}
        return outputs, layer_output_gram(predict_fn, params, x, layers, blocks, fallback, scaled, prior)

    def jacobian_rows(xi):  # (C, d): one example's Jacobian in the posterior's parameters
        def f(sub):
            full = sub if subset is None else _replace(params, subset, sub)
            return predict_fn(full, jax.tree.map(lambda leaf: leaf[None], xi))[0]

        jacobian = jax.jacrev(f)(params if subset is None else _subtree(params, subset))
        return jax.vmap(lambda tree: ravel_pytree(tree)[0])(jacobian)

    rows = jax.lax.map(jacobian_rows, x, batch_size=32)  # (B, C, d)
    if structure == "diag":
        return outputs, jnp.einsum("bci,i,bdi->bcd", rows, 1 / (scale * ravel_pytree(curvature)[0] + prior), rows)
    values, vectors = curvature  # full / last_layer: in the GGN's eigenbasis, one product with the eigenvectors
    rotated = rows @ vectors
    return outputs, jnp.einsum("bck,k,bdk->bcd", rotated, 1 / (scale * values + prior), rotated)


def _subtree(tree: Any, name: str) -> Any:
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _replace(tree: Any, name: str, value: Any) -> Any:
    from jaxnn.curvature.kfac import replace_subtree as replace_path

    return replace_path(tree, tuple(name.split("/")), value)


def _ggn_diagonal(predict_fn, output_loss, params, x, y, chunk: int = 32):
    """The exact diagonal of the mean loss's GGN: (1/n) Σ_i Σ_c (J_iᵀ l_ic)², l_ic the columns of the square root of
    example i's output-loss Hessian."""
    from jaxnn.curvature.kfac import output_cotangents

    outputs = predict_fn(params, x)
    columns = jnp.moveaxis(output_cotangents(output_loss, outputs, y, "ggn", None), 0, 1)  # (B, C, ...)

    def one(args):
        xi, ci = args
        _, pull = jax.vjp(lambda p: predict_fn(p, jax.tree.map(lambda leaf: leaf[None], xi))[0], params)
        return jax.tree.map(lambda g: jnp.sum(g**2, axis=0), jax.vmap(lambda c: pull(c)[0])(ci))

    sums = jax.lax.map(one, (x, columns), batch_size=chunk)
    return jax.tree.map(lambda s: jnp.sum(s, axis=0) / x.shape[0], sums)


def _head_ggn(predict_fn, output_loss, params, x, y, layer) -> np.ndarray | None:
    """The exact GGN block of the last Dense layer when its outputs are the network's: f_i = Wᵀφ_i + b, so the block
    is (1/n) Σ_i φ̃_iφ̃_iᵀ ⊗ H_i (φ̃ = [1, φ] with a bias, H_i the output loss's Hessian), one pass over the data
    instead of one GGN product per parameter. None when something follows the layer (the caller takes the general
    route)."""
    from jaxnn.curvature.kfac import output_cotangents, perturbed_layers

    name = "/".join(layer.path)
    inputs: dict = {}
    with perturbed_layers({name: 0.0}, inputs):
        outputs = predict_fn(params, x)
    features = inputs[name]
    head = _subtree(params, name)
    if set(head) != ({"kernel", "bias"} if layer.has_bias else {"kernel"}) or features.ndim != 2 or outputs.ndim != 2:
        return None
    own = features @ head["kernel"] + (head["bias"] if layer.has_bias else 0)
    if not np.allclose(np.asarray(own), np.asarray(outputs), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(outputs)))):
        return None
    if layer.has_bias:  # ravel order: bias, then the kernel's rows
        features = jnp.concatenate([jnp.ones((features.shape[0], 1), features.dtype), features], axis=1)
    roots = output_cotangents(output_loss, outputs, y, "ggn", None)  # (C, B, C): H_i = Σ_k r_ki r_kiᵀ
    hessians = jnp.einsum("kbc,kbd->bcd", roots, roots)
    features, hessians = np.asarray(features, np.float64), np.asarray(hessians, np.float64)
    width, classes = features.shape[1], outputs.shape[1]
    block = np.zeros((width, classes, width, classes))
    for c in range(classes):  # one (width x width) product per pair of outputs, no (B, width, C, C) intermediate
        for d in range(c, classes):
            block[:, c, :, d] = block[:, d, :, c] = (features * hessians[:, c, d, None]).T @ features
    return block.reshape(width * classes, width * classes) / features.shape[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _layer_signals(predict_fn, output_loss, layers, shapes, params, x, y):
    """Per Dense layer applied to vectors: its inputs with a 1 for the bias (B, i) and its output gradients (C, B, o)
    for each column of the square roots of the examples' output-loss Hessians."""
    from jaxnn.curvature.kfac import output_cotangents, layer_signals

    _, _, a, g = layer_signals(predict_fn, params, x, layers, shapes,
                               lambda outputs: output_cotangents(output_loss, outputs, y, "ggn", None))
    return {n: value[:, 0] for n, value in a.items()}, {n: value[:, :, 0] for n, value in g.items()}


def _dense_network_ggn(predict_fn, output_loss, params, x, y, budget: int = 50_000_000) -> np.ndarray | None:
    """The exact dense GGN of a network whose parameters all sit in Dense layers applied once to vectors, without one
    GGN product per parameter: its (l, m) block is (1/n) Σ_i (ã^l_i ã^mᵀ_i) ⊗ (Σ_c g^l_ic g^mᵀ_ic) (ã the layer's input
    with a 1 for the bias, g_ic its output gradient for column c of the square root of example i's output-loss
    Hessian; one forward and C backward passes of the batch), summed by one matrix product per block with the examples
    as the inner dimension (``budget`` floats per chunk of examples). In ``ravel_pytree(params)`` order. None for
    any other model (the caller takes the general route)."""
    from jaxnn.curvature.kfac import discover_layers, uncovered_modules

    layers, skipped, shapes = discover_layers(predict_fn, params, x)
    names = ["/".join(layer.path) for layer in layers]
    if (not layers or skipped or any(layer.kind != "dense" or len(shapes[n]) != 2 for layer, n in zip(layers, names))
            or uncovered_modules(params, set(names))):
        return None
    a, g = _layer_signals(predict_fn, output_loss, tuple(layers), tuple((n, shapes[n]) for n in names), params, x, y)
    a = {n: np.asarray(value, np.float64) for n, value in a.items()}  # (B, i)
    g = {n: np.asarray(value, np.float64) for n, value in g.items()}  # (C, B, o)
    count = len(next(iter(a.values())))
    # where each joint (row, column) entry of a layer sits in ravel order: bias first, then the kernel's rows
    sizes = [leaf.size for leaf in jax.tree.leaves(params)]
    starts = dict(zip([jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]],
                      np.cumsum([0] + sizes[:-1])))
    order = {}
    for layer, n in zip(layers, names):
        kernel_start = starts[jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in (*layer.path, "kernel")))]
        rows, columns = a[n].shape[1], g[n].shape[2]
        index = kernel_start + np.arange((rows - layer.has_bias) * columns).reshape(-1, columns)
        if layer.has_bias:
            bias_start = starts[jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in (*layer.path, "bias")))]
            index = np.concatenate([index, bias_start + np.arange(columns)[None]], axis=0)
        order[n] = index.ravel()
    total = sum(sizes)
    matrix = np.zeros((total, total))
    for i, l in enumerate(names):
        for m in names[i:]:
            rows_l, rows_m = a[l].shape[1], a[m].shape[1]
            out_l, out_m = g[l].shape[2], g[m].shape[2]
            block = np.zeros((rows_l * rows_m, out_l * out_m))
            chunk = max(1, budget // (rows_l * rows_m + out_l * out_m))
            for start in range(0, count, chunk):
                part = slice(start, start + chunk)
                inputs_outer = (a[l][part, :, None] * a[m][part, None, :]).reshape(-1, rows_l * rows_m)
                gradients_outer = np.einsum("cbo,cbp->bop", g[l][:, part], g[m][:, part]).reshape(-1, out_l * out_m)
                block += inputs_outer.T @ gradients_outer
            block = block.reshape(rows_l, rows_m, out_l, out_m).transpose(0, 2, 1, 3).reshape(rows_l * out_l,
                                                                                                rows_m * out_m)
            matrix[np.ix_(order[l], order[m])] = block / count
            if m != l:
                matrix[np.ix_(order[m], order[l])] = block.T / count
    return matrix


def laplace(predict_fn: Callable, params: Any, data: tuple, *, likelihood: str = "classification",
            structure: str = "kfac", prior_precision: float = 1.0, sigma_noise: float = 1.0,
            max_params: int = 5_000) -> Laplace:
    """Fit the Laplace approximation at ``params`` (θ*, the trained weights) on the training ``data`` = (x, y), all
    of it in one batch. ``predict_fn(params, x)``: the network's outputs (logits for classification; it must run
    Flax modules for ``structure="kfac"`` / ``"last_layer"``). ``prior_precision`` δ > 0 (tune it with
    :meth:`Laplace.optimize_prior_precision`); ``sigma_noise``: the regression noise σ. ``"full"`` is refused above
    ``max_params`` parameters."""
    from jaxnn import curvature, losses
    from jaxnn.curvature.kfac import discover_layers

    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure: expected one of {', '.join(STRUCTURES)}, got {structure!r}")
    prior_precision = _check_precision(prior_precision)
    sigma_noise = _check_precision(sigma_noise, "sigma_noise")
    if not isinstance(data, tuple) or len(data) != 2:
        raise ValueError("data: expected the training set as one batch (x, y)")
    x, y = data
    count = int(jax.tree.leaves(x)[0].shape[0])
    output_loss = losses.batch_mean("softmax_cross_entropy" if likelihood == "classification" else "mse")
    outputs = predict_fn(params, x)
    mean_loss = float(output_loss(outputs, y))
    if likelihood == "classification":
        scale, log_likelihood = float(count), -count * mean_loss
    else:
        dims = int(np.prod(outputs.shape[1:]))
        scale = count / sigma_noise**2
        log_likelihood = -0.5 * count * dims * math.log(2 * math.pi * sigma_noise**2) - scale * mean_loss
    subset = None
    if structure in ("full", "last_layer"):
        if structure == "last_layer":
            layers, _, _ = discover_layers(predict_fn, params, x)
            dense = [layer for layer in layers if layer.kind == "dense"]
            if not dense:
                raise ValueError("structure='last_layer': the model calls no Dense layer")
            subset = "/".join(dense[-1].path)
        from jaxnn.curvature.dense import check_dense_size

        check_dense_size(ravel_pytree(params if subset is None else _subtree(params, subset))[0].size, max_params,
                    f"the {structure} Laplace precision")
        if subset is None:
            matrix = _dense_network_ggn(predict_fn, output_loss, params, x, y)
        else:
            matrix = _head_ggn(predict_fn, output_loss, params, x, y, dense[-1])
        if matrix is None:
            op = curvature.ggn(predict_fn, output_loss, params, data, wrt=subset)
            matrix = np.asarray(curvature.dense_matrix(op, max_params=max_params), np.float64)
        values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
        dtype = ravel_pytree(params)[0].dtype
        fitted = (jnp.asarray(np.clip(values, 0.0, None), dtype), jnp.asarray(vectors, dtype))
    layers, fallback = (), ()
    if structure == "diag":
        fitted = _ggn_diagonal(predict_fn, output_loss, params, x, y)
        from jaxnn.curvature.kfac import uncovered_modules

        layers, skipped, _ = discover_layers(predict_fn, params, x)
        if layers:  # a Flax model: its Dense / Conv layers' predictive rows need no Jacobian
            names = {"/".join(layer.path) for layer in layers}
            fallback = tuple(name for name, _ in skipped) + uncovered_modules(params, names | {n for n, _ in skipped})
    elif structure == "kfac":
        fitted = curvature.kfac(predict_fn, output_loss, params, data, kind="ggn")
    return Laplace(predict_fn, params, structure, likelihood, prior_precision, sigma_noise, count, log_likelihood,
                   scale, fitted, subset, tuple(layers), fallback)


def calibration(probabilities: Any, labels: Any, bins: int = 15) -> dict:
    """NLL, accuracy, the mean top probability (``confidence``: below the accuracy = underconfident) and the expected
    calibration error (``bins`` equal-width bins of the top probability: Σ_b (n_b/n)|accuracy_b − confidence_b|),
    with the per-bin numbers for a reliability diagram."""
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    confidence, predicted = p.max(axis=1), p.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            accuracy_b, confidence_b = float(correct[members].mean()), float(confidence[members].mean())
            ece += members.mean() * abs(accuracy_b - confidence_b)
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                         "accuracy": accuracy_b, "confidence": confidence_b})
    nll = float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-300, None))))
    return {"nll": nll, "accuracy": float(correct.mean()), "confidence": float(confidence.mean()), "ece": float(ece),
            "bins": rows}

