"""K-FAC and EKFAC: Kronecker-factored curvature of any Flax Linen model, with no layer tagging.

Every ``nn.Dense`` and 2-D ``nn.Conv`` the model calls is found by intercepting its modules while it runs
(``flax.linen.intercept_methods``, as :mod:`jaxnn.diagnostics.layers` does). For such a layer, with inputs a (a 1
appended when it has a bias; for a convolution the input patches, Grosse & Martens 2016's KFC) and backpropagated
output gradients g, the curvature block of its parameters is approximated by A ⊗ G with

    A = (1/N) Σ_n (1/T) Σ_t a_nt a_ntᵀ,       G = (1/N) Σ_n Σ_c Σ_t g_nct g_nctᵀ

(T: the positions sharing the weight — 1 for a Dense layer on vectors, the output pixels of a convolution: K-FAC
"expand"). Which g (``kind``): ``"ggn"`` (type-2: one backward pass per column c of the square root of each example's
output-loss Hessian, so that for one example and one Dense layer A ⊗ G *is* the exact GGN block), ``"fisher"`` (one
label per example sampled from the model's predictive distribution with ``key``: the true Fisher's Monte Carlo
estimate) or ``"empirical"`` (the data labels). EKFAC (George et al. 2018) keeps K-FAC's eigenbasis U_A ⊗ U_G and
replaces the eigenvalues s_A ⊗ s_G by the second moments of the per-example gradients in that basis — the best
diagonal in that basis in Frobenius norm, so EKFAC's block error never exceeds K-FAC's.

Parameters of the layers it cannot factor (normalisation, embeddings, other convolutions, a layer called twice) get
the exact diagonal of the same curvature; ``KFAC.fallback`` names them. Kronecker layout: a Dense kernel (d_in, d_out)
and a Conv kernel (kh, kw, c_in, c_out) are read as a (d_in, d_out) matrix W (rows in the kernel's own order), the bias
as one more row, so that the product is A W G.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jaxnn.validation import check_choice, check_params

KFAC_KINDS = ("ggn", "fisher", "empirical")


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: tuple  # module path = the parameters' path
    kind: str  # "dense" or "conv"
    has_bias: bool
    conv: tuple = ()  # (kernel_size, strides, padding, input_dilation, kernel_dilation) for "conv"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KFAC:
    """Kronecker-factored curvature. ``factors``: {layer name: (A, G)}; ``eigen``: {layer name: (s_A, U_A, s_G, U_G)};
    ``corrected``: {layer name: EKFAC eigenvalues (d_in(+1), d_out)} when built with ``ekfac=True``; ``diagonal``: the
    exact diagonal for the parameters of ``fallback`` layers (a pytree like ``params`` with zeros elsewhere)."""

    params: Any
    layers: tuple = dataclasses.field(metadata=dict(static=True))
    factors: dict
    eigen: dict
    corrected: dict | None
    diagonal: Any
    fallback: tuple = dataclasses.field(metadata=dict(static=True))
    kind: str = dataclasses.field(metadata=dict(static=True))
    num_examples: int = dataclasses.field(metadata=dict(static=True))

    @property
    def names(self) -> list[str]:
        return ["/".join(layer.path) for layer in self.layers]

    def _block_values(self, name: str) -> jax.Array:
        if self.corrected is not None:
            return self.corrected[name]
        s_a, _, s_g, _ = self.eigen[name]
        return s_a[:, None] * s_g[None, :]

    def matvec(self, v: Any) -> Any:
        """(K-FAC or EKFAC) v, v a pytree like the parameters."""
        out = jax.tree.map(lambda d, x: d * x, self.diagonal, v)
        for layer, name in zip(self.layers, self.names):
            w = layer_matrix(v, layer)
            if self.corrected is None:
                a, g = self.factors[name]
                product = a @ w @ g
            else:
                _, u_a, _, u_g = self.eigen[name]
                product = u_a @ ((u_a.T @ w @ u_g) * self.corrected[name]) @ u_g.T
            out = _set_joint(out, layer, product)
        return out

    def inverse_matvec(self, v: Any, damping: Any) -> Any:
        """(K + δI)⁻¹ v: per block in its Kronecker eigenbasis, (s + δ)⁻¹ elementwise; the fallback diagonal's
        (d + δ)⁻¹. ``damping`` must be > 0 unless every eigenvalue is positive (checked when it is a number; it may be
        traced, and the operator itself is a pytree, so both can be jit arguments or vmapped)."""
        if (isinstance(damping, (int, float)) and not damping > 0
                and min(float(jnp.min(self._block_values(n))) for n in self.names) <= 0):
            raise ValueError(f"damping: K-FAC has zero eigenvalues; expected damping > 0, got {damping}")
        out = jax.tree.map(lambda d, x: x / (d + damping), self.diagonal, v)
        for layer, name in zip(self.layers, self.names):
            _, u_a, _, u_g = self.eigen[name]
            w = layer_matrix(v, layer)
            out = _set_joint(out, layer, u_a @ ((u_a.T @ w @ u_g) / (self._block_values(name) + damping)) @ u_g.T)
        return out

    def output_gram(self, predict_fn: Callable, x: Any, damping: Any) -> jax.Array:
        """(B, C, C): J_b (K + δI)⁻¹ J_bᵀ for every example b of ``x``, J_b the Jacobian of its C (flattened) outputs
        of ``predict_fn(params, x)`` in the parameters -- the Laplace predictive's covariance -- without forming J:
        a factored layer's rows are Σ_t a_t g_ctᵀ (inputs a, output gradients g of output c, from one forward pass
        and C backward passes of the batch), so in the Kronecker eigenbasis a Dense layer costs O(d_in² + C d_out²)
        per example instead of O(C d_in d_out (d_in + d_out)); the fallback parameters by their per-example
        Jacobian and diagonal. Examples must not interact in ``predict_fn`` (eval-mode normalisation)."""
        layers, _, _ = discover_layers(predict_fn, self.params, x)
        if tuple(layers) != tuple(self.layers):
            raise ValueError("output_gram: predict_fn calls other layers than the ones this K-FAC was built on")
        blocks = {name: (self.eigen[name][1], self.eigen[name][3], self._block_values(name)) for name in self.names}
        return layer_output_gram(predict_fn, self.params, x, self.layers, blocks, self.fallback, self.diagonal,
                                 damping)

    def eigenvalues(self) -> dict:
        """{layer name: all eigenvalues of its block, descending}, the fallback parameters' diagonal entries under
        "fallback"."""
        out = {name: np.sort(np.asarray(self._block_values(name)).ravel())[::-1] for name in self.names}
        if self.fallback:
            leaves = [np.ravel(d) for name in self.fallback
                      for d in jax.tree.leaves(_subtree(self.diagonal, tuple(name.split("/"))))]
            out["fallback"] = np.sort(np.concatenate(leaves))[::-1]
        return out

    def trace(self) -> float:
        """tr K: Σ_blocks tr(A) tr(G) (EKFAC: Σ of the corrected eigenvalues) + the fallback diagonal's sum."""
        total = sum(float(jnp.sum(self._block_values(name))) for name in self.names)
        return total + sum(float(jnp.sum(d)) for d in jax.tree.leaves(self.diagonal))

    def operator(self, damping: float | None = None):
        """As a :class:`~jaxnn.curvature.CurvatureOperator` for every estimator (Lanczos, trace, density, solve);
        with ``damping``, the damped inverse (K + δI)⁻¹ instead."""
        from jaxnn.curvature.operators import linear_operator

        if damping is None:
            return linear_operator(self.matvec, self.params)
        return linear_operator(lambda v: self.inverse_matvec(v, damping), self.params)

    def report(self) -> dict:
        """Which layers were factored (with their factor sizes) and which fell back to the exact diagonal."""
        return {"kind": self.kind, "ekfac": self.corrected is not None, "num_examples": self.num_examples,
                "factored": {name: {"type": layer.kind, "A": int(self.factors[name][0].shape[0]),
                                    "G": int(self.factors[name][1].shape[0])}
                             for layer, name in zip(self.layers, self.names)},
                "fallback_diagonal": list(self.fallback)}


def _subtree(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def replace_subtree(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    return {**tree, path[0]: replace_subtree(tree[path[0]], path[1:], value)}


def layer_matrix(tree: Any, layer: _Layer) -> jax.Array:
    """The layer's parameters in ``tree`` as one (d_in(+1), d_out) matrix: the kernel's rows, then the bias."""
    leaf = _subtree(tree, layer.path)
    kernel = leaf["kernel"].reshape(-1, leaf["kernel"].shape[-1])
    return jnp.concatenate([kernel, leaf["bias"][None]], axis=0) if layer.has_bias else kernel


def _set_joint(tree: Any, layer: _Layer, matrix: jax.Array) -> Any:
    leaf = dict(_subtree(tree, layer.path))
    shape = leaf["kernel"].shape
    if layer.has_bias:
        leaf["bias"] = matrix[-1]
        matrix = matrix[:-1]
    leaf["kernel"] = matrix.reshape(shape)
    return replace_subtree(tree, layer.path, leaf)


def _factorable(module: Any, args: tuple) -> _Layer | str:
    """The layer description when K-FAC can factor this call, else the reason it cannot."""
    import flax.linen as nn  # here, not at import: the curvature engine runs without Flax

    path = tuple(module.path)
    has_bias = bool(getattr(module, "use_bias", False))
    if type(module) is nn.Dense:
        return _Layer(path, "dense", has_bias)
    if type(module) is nn.Conv and len(module.kernel_size) == 2 and args and args[0].ndim == 4:
        if module.feature_group_count != 1 or isinstance(module.padding, str) and module.padding not in ("SAME",
                                                                                                          "VALID"):
            return "grouped or circular convolution"
        strides = module.strides or (1, 1)
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        padding = module.padding
        if isinstance(padding, int):
            padding = ((padding, padding),) * 2
        elif not isinstance(padding, str):
            padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
        dilation = lambda d: (1, 1) if d is None else (d,) * 2 if isinstance(d, int) else tuple(d)  # noqa: E731
        return _Layer(path, "conv", has_bias, (tuple(module.kernel_size), strides, padding,
                                               dilation(module.input_dilation), dilation(module.kernel_dilation)))
    return f"{type(module).__name__} is not a Dense or 2-D Conv layer"


def _patches(x: jax.Array, layer: _Layer) -> jax.Array:
    """(B, T, kh·kw·c_in) input patches of a 2-D convolution, features in the kernel's (kh, kw, c_in) order."""
    kernel_size, strides, padding, input_dilation, kernel_dilation = layer.conv
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel_size, strides, padding, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # features ordered (c_in, kh, kw)
    b, h, w, _ = patches.shape
    patches = patches.reshape(b, h, w, x.shape[-1], *kernel_size).transpose(0, 1, 2, 4, 5, 3)
    return patches.reshape(b, h * w, -1)


def layer_inputs(x: jax.Array, layer: _Layer) -> jax.Array:
    """(B, T, d_in(+1)): the layer's inputs per example and weight-sharing position."""
    rows = _patches(x, layer) if layer.kind == "conv" else x.reshape(x.shape[0], -1, x.shape[-1])
    if layer.has_bias:
        rows = jnp.concatenate([rows, jnp.ones((*rows.shape[:-1], 1), rows.dtype)], axis=-1)
    return rows


def discover_layers(predict_fn: Callable, params: Any, x: Any) -> tuple[tuple, tuple, dict]:
    """(factorable layers in call order, {name: why not} for the other parameterised modules, {name: output shape}).
    Cached per model function and the shapes and dtypes of ``params`` and ``x``: tracing a Flax model costs more than
    a small model's whole K-FAC statistics pass."""
    def signature(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple(jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf)) for leaf in leaves)

    try:
        layers, skipped, shapes = _discover_cached(predict_fn, *signature(params), *signature(x))
    except TypeError as error:  # an unhashable model function: no cache
        if "unhashable" not in str(error):
            raise
        layers, skipped, shapes = _discover_cached.__wrapped__(predict_fn, *signature(params), *signature(x))
    return layers, skipped, dict(shapes)


@functools.lru_cache(maxsize=64)
def _discover_cached(predict_fn: Callable, params_def, params_leaves, x_def, x_leaves) -> tuple[tuple, tuple, dict]:
    import flax.linen as nn

    params = jax.tree.unflatten(params_def, params_leaves)
    x = jax.tree.unflatten(x_def, x_leaves)

    calls: list = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path and _has_params(params, context.module.path):
            calls.append((tuple(context.module.path), _factorable(context.module, args), out.shape
                          if hasattr(out, "shape") else None))
        return out

    with nn.intercept_methods(interceptor):  # a fresh function: a cached trace would skip the interceptor
        jax.eval_shape(lambda p, inputs: predict_fn(p, inputs), params, x)
    counts: dict = {}
    for path, _, _ in calls:
        counts[path] = counts.get(path, 0) + 1
    layers, skipped, shapes = [], {}, {}
    for path, found, shape in calls:
        name = "/".join(path)
        if name in shapes or name in skipped:
            continue
        if counts[path] > 1:
            skipped[name] = f"called {counts[path]} times (shared weights)"
        elif isinstance(found, str):
            skipped[name] = found
        else:
            layers.append(found)
            shapes[name] = shape
    inner = {"/".join(layer.path) for layer in layers}
    skipped = {name: why for name, why in skipped.items() if not any(name.startswith(f + "/") for f in inner)}
    return tuple(layers), tuple(skipped.items()), shapes


def uncovered_modules(params: Any, covered: set) -> tuple:
    """Modules holding parameters that no intercepted call reached (they get the fallback diagonal too)."""
    found: list = []

    def visit(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                visit(prefix + (key,), value)
            return
        module = "/".join(prefix[:-1])
        if not module:
            raise ValueError(f"K-FAC: parameter {prefix[-1]!r} sits at the model's root, outside any layer; wrap it "
                             "in a submodule")
        if not any(module == c or module.startswith(c + "/") for c in covered) and module not in found:
            found.append(module)

    visit((), params)
    return tuple(found)


def _has_params(params: Any, path: tuple) -> bool:
    try:
        leaf = _subtree(params, path)
    except (KeyError, TypeError):
        return False
    return isinstance(leaf, dict) and any(not isinstance(v, dict) for v in leaf.values())


def output_cotangents(output_loss, outputs, y, kind, key):
    """(columns, B, *output shape): per example, the vectors whose backward passes give the curvature's gradients.
    For "ggn" the columns of a square root of the example's output Hessian: in closed form where ``output_loss``
    carries one (``hessian_root``, see :func:`jaxnn.losses.batch_mean`), else from its eigendecomposition."""
    def per_example(f, t):
        return output_loss(f[None], t[None])

    if kind == "ggn":
        root = getattr(output_loss, "hessian_root", None)  # closed form (jaxnn.losses.batch_mean)
        if root is not None and outputs.ndim == 2:
            return root(outputs, y)
        flat = outputs.reshape(outputs.shape[0], -1)
        hessians = jax.vmap(jax.hessian(lambda f, t: per_example(f.reshape(outputs.shape[1:]), t)))(flat, y)
        values, vectors = jnp.linalg.eigh((hessians + jnp.swapaxes(hessians, 1, 2)) / 2)
        roots = vectors * jnp.sqrt(jnp.clip(values, 0.0))[:, None, :]  # (B, C, C): H = L Lᵀ, columns last
        return jnp.moveaxis(roots, 2, 0).reshape(flat.shape[1], *outputs.shape)
    if kind == "fisher":
        labels = jax.random.categorical(key, outputs.reshape(outputs.shape[0], -1))
        return jax.vmap(jax.grad(per_example))(outputs, labels)[None]
    return jax.vmap(jax.grad(per_example))(outputs, y)[None]


def perturbed_layers(perturbations: dict, inputs: dict):
    """A context in which every layer named in ``perturbations`` (module path joined by "/") has
    ``perturbations[name]`` added to its output and its input recorded in ``inputs[name]``: differentiating in a zero
    perturbation gives the layer's output gradients (K-FAC's statistics, per-example gradient norms)."""
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        if context.method_name == "__call__" and name in perturbations:
            inputs[name] = args[0]
            out = out + perturbations[name]
        return out

    return nn.intercept_methods(interceptor)


def _layer_forward(predict_fn: Callable, params: Any, x: Any, layers: tuple, shapes: dict):
    """One forward pass with every layer of ``layers`` intercepted: (outputs, pullback: an output cotangent (B, *output
    shape) -> {name: the layer's output gradient}, {name: the layer's inputs as called})."""
    dtype = jax.tree.leaves(params)[0].dtype
    names = ["/".join(layer.path) for layer in layers]
    zeros = {name: jnp.zeros(shapes[name], dtype) for name in names}

    def forward(perturbations):
        inputs: dict = {}
        with perturbed_layers(perturbations, inputs):
            outputs = predict_fn(params, x)
        return outputs, inputs

    outputs, pullback, inputs = jax.vjp(forward, zeros, has_aux=True)
    return outputs, lambda cotangent: pullback(cotangent)[0], inputs


def layer_signals(predict_fn: Callable, params: Any, x: Any, layers: tuple, shapes: Any,
                  cotangents_of: Callable) -> tuple[Any, Any, dict, dict]:
    """One forward pass of ``predict_fn(params, x)`` with every layer of ``layers`` intercepted, then one backward pass
    per column of ``cotangents_of(outputs)`` (columns, B, *output shape). Returns (outputs, cotangents, {name: the
    layer's inputs a (B, T, d_in(+1))}, {name: its output gradients g (columns, B, T, d_out)}); ``shapes``: (name,
    layer output shape) pairs or a dict. What K-FAC's per-example statistics, its predictive Gram and the Laplace GGN
    share."""
    outputs, pullback, inputs = _layer_forward(predict_fn, params, x, layers, dict(shapes))
    cotangents = cotangents_of(outputs)
    gradients = jax.vmap(pullback)(cotangents)  # {name: (columns, B, *layer output)}
    a, g = {}, {}
    for layer in layers:
        name = "/".join(layer.path)
        a[name] = layer_inputs(inputs[name], layer)
        g[name] = gradients[name].reshape(cotangents.shape[0], a[name].shape[0], a[name].shape[1], -1)
    return outputs, cotangents, a, g


def _gram(rows: jax.Array) -> jax.Array:
    """rowsᵀ rows of a (..., d) array: one matrix product (XLA's CPU einsum over several axes was 1.3-1.6x slower)."""
    rows = rows.reshape(-1, rows.shape[-1])
    return rows.T @ rows


def _batch_statistics(predict_fn, output_loss, params, batch, layers, shapes, kind, key, fallback_paths,
                      per_example_columns: bool = True, unrolled: bool = False):
    """Σ over the batch of every layer's (A, G) sums, the per-example gradients' columns needed by EKFAC (when
    ``per_example_columns``; returning them keeps XLA from fusing them away), and the fallback parameters' exact
    diagonal sum. ``unrolled`` (convolutional models on CPU, see :func:`_unrolled`): the columns' backward passes
    and the per-example passes of the diagonal are written out at the top level of the program instead of in a
    ``lax.scan``/``lax.map``, where XLA:CPU runs backward convolutions several times slower."""
    x, y = batch
    names = ["/".join(layer.path) for layer in layers]
    cotangents_of = lambda outputs: output_cotangents(output_loss, outputs, y, kind, key)  # noqa: E731
    a_sums, g_sums, per_example = {}, {}, {}
    if per_example_columns:  # EKFAC: every column's gradients at once
        _, cotangents, inputs, gradients = layer_signals(predict_fn, params, x, layers, shapes, cotangents_of)
        for name in names:
            per_example[name] = (inputs[name], gradients[name])  # (B, T, d_in+1), (C, B, T, o)
            g_sums[name] = _gram(gradients[name])
    else:  # one column at a time, summed as it goes: (C, B, T, o) never exists (less memory, 5-7 % faster here)
        outputs, pullback, called = _layer_forward(predict_fn, params, x, layers, dict(shapes))
        cotangents = cotangents_of(outputs)
        inputs = {layer_name: layer_inputs(called[layer_name], layer) for layer, layer_name in zip(layers, names)}

        def add_column(sums, cotangent):
            gradients = pullback(cotangent)
            return {name: sums[name] + _gram(gradients[name]) for name in names}, None

        first = pullback(cotangents[0])
        g_sums = {name: _gram(first[name]) for name in names}
        if unrolled:
            for column in range(1, cotangents.shape[0]):
                g_sums, _ = add_column(g_sums, cotangents[column])
        else:
            g_sums, _ = jax.lax.scan(add_column, g_sums, cotangents[1:])
    for name in names:
        a_sums[name] = _gram(inputs[name]) / inputs[name].shape[1]
    diagonal = None
    if fallback_paths:  # exact diagonal: per example, one backward pass per column, in the fallback parameters only
        paths = [tuple(name.split("/")) for name in fallback_paths]

        def example_outputs(subtrees, xi):
            full = params
            for path, subtree in zip(paths, subtrees):
                full = replace_subtree(full, path, subtree)
            return predict_fn(full, jax.tree.map(lambda leaf: leaf[None], xi))[0]

        def squared(xi, ci):
            _, pull = jax.vjp(lambda subtrees: example_outputs(subtrees, xi), [_subtree(params, p) for p in paths])
            grads = jax.vmap(lambda c: pull(c)[0])(ci)  # (columns, ...) per parameter
            return jax.tree.map(lambda leaf: jnp.sum(leaf**2, axis=0), grads)

        per_example_cotangents = jnp.moveaxis(cotangents, 0, 1)
        if unrolled:  # every example's passes vmapped at once: one batched forward and the columns' backward passes
            sums = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), jax.vmap(squared)(x, per_example_cotangents))
        else:
            sums = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0),
                                jax.lax.map(lambda args: squared(*args), (x, per_example_cotangents), batch_size=16))
        diagonal = jax.tree.map(jnp.zeros_like, params)
        for path, subtree in zip(paths, sums):
            diagonal = replace_subtree(diagonal, path, subtree)
    return a_sums, g_sums, per_example, diagonal


def layer_output_gram(predict_fn: Callable, params: Any, x: Any, layers: tuple, blocks: dict, fallback: tuple,
                      diagonal: Any, damping: Any) -> jax.Array:
    """(B, C, C): J_b (M + δI)⁻¹ J_bᵀ per example for a curvature M that is block diagonal over ``layers``, each
    block diagonal in a Kronecker basis: ``blocks[name] = (U_A or None, U_G or None, values (i, o))`` (None: the
    identity, i.e. an exact diagonal in the layer's (d_in(+1), d_out) layout), plus the ``diagonal`` (a pytree like
    params) on the ``fallback`` modules' parameters. No Jacobian is formed for the layers: their rows are Σ_t a_t g_ctᵀ
    from one forward pass and C backward passes of the batch."""
    _, _, shapes = discover_layers(predict_fn, params, x)

    def unit_columns(outputs):  # one column per output: the gradients of each output alone
        count, classes = outputs.shape[0], int(np.prod(outputs.shape[1:]))
        eye = jnp.broadcast_to(jnp.eye(classes, dtype=outputs.dtype)[:, None, :], (classes, count, classes))
        return eye.reshape(classes, *outputs.shape)

    outputs, _, inputs, gradients = layer_signals(predict_fn, params, x, layers, shapes, unit_columns)
    count, classes = outputs.shape[0], int(np.prod(outputs.shape[1:]))
    gram = jnp.zeros((count, classes, classes), outputs.dtype)
    for layer in layers:
        name = "/".join(layer.path)
        u_a, u_g, values = blocks[name]
        a, g = inputs[name], gradients[name]  # (B, T, i), (C, B, T, o)
        a = a if u_a is None else a @ u_a
        g = g if u_g is None else g @ u_g
        inverse = 1 / (values + damping)  # (i, o)
        if a.shape[1] == 1:  # rank one per example: Σ_ij a_i² g_ci g_dj / (m_ij + δ)
            weights = (a[:, 0] ** 2) @ inverse  # (B, o)
            gram = gram + jnp.einsum("cbo,bo,dbo->bcd", g[:, :, 0], weights, g[:, :, 0])
        else:
            rows = jnp.einsum("bti,cbto->cbio", a, g)
            gram = gram + jnp.einsum("cbio,io,dbio->bcd", rows, inverse, rows)
    if fallback:
        paths = [tuple(name.split("/")) for name in fallback]
        held = {name: _subtree(params, path) for name, path in zip(fallback, paths)}
        flat_diagonal = jax.flatten_util.ravel_pytree(
            {name: _subtree(diagonal, path) for name, path in zip(fallback, paths)})[0]

        def example_outputs(sub, xi):
            full = params
            for name, path in zip(fallback, paths):
                full = replace_subtree(full, path, sub[name])
            return predict_fn(full, jax.tree.map(lambda leaf: leaf[None], xi)).reshape(-1)

        def rows_of(xi):
            jacobian = jax.jacrev(example_outputs)(held, xi)
            return jax.vmap(lambda tree: jax.flatten_util.ravel_pytree(tree)[0])(jacobian)

        rows = jax.lax.map(rows_of, x, batch_size=32)  # (B, C, d_fallback)
        gram = gram + jnp.einsum("bci,i,bdi->bcd", rows, 1 / (flat_diagonal + damping), rows)
    return gram


_statistics = jax.jit(_batch_statistics, static_argnums=(0, 1, 4, 5, 6, 8, 9, 10))  # once per model and batch shape


def _unrolled(layers: tuple) -> bool:
    """The rule of :func:`jaxnn.runtime.prefers_python_loops`, read from the layers found: on CPU, a model with a
    convolution has its statistics' loops written out (XLA:CPU runs backward convolutions 10-30x slower inside a
    compiled loop; ResNet-20's statistics at batch 256 on 2 cores: 54 s in loops, 8.8 s written out)."""
    return jax.default_backend() == "cpu" and any(layer.kind == "conv" for layer in layers)


@jax.jit
def _factors_and_eigen(a_total: dict, g_total: dict, count: int) -> tuple[dict, dict]:
    """The mean factors and their eigendecompositions (eigenvalues clipped at 0), in one program. The sums are
    decomposed, not the means (the eigenvalues scaled after): when the means are both outputs and LAPACK's inputs
    XLA copies them first, 13-20 % of this program for 512-wide layers on this CPU."""
    factors = {name: (a_total[name] / count, g_total[name] / count) for name in a_total}
    eigen = {}
    for name in a_total:
        s_a, u_a = jnp.linalg.eigh(a_total[name])
        s_g, u_g = jnp.linalg.eigh(g_total[name])
        eigen[name] = (jnp.clip(s_a / count, 0.0), u_a, jnp.clip(s_g / count, 0.0), u_g)
    return factors, eigen


_zeros_like = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree))


def kfac(predict_fn: Callable, output_loss: Callable, params: Any, data: Any, *, kind: str = "ggn",
         ekfac: bool = False, key: Any = None) -> KFAC:
    """Kronecker-factored curvature of ``predict_fn(params, x)`` (it must run Flax Linen modules; their Dense and
    2-D Conv layers are found by interception) under ``output_loss(outputs, y)`` (the batch-mean loss, as for
    :func:`jaxnn.curvature.ggn`), over ``data``: one batch (x, y) or a list of batches. ``kind``: "ggn" (type-2,
    exact output-Hessian square roots), "fisher" (labels sampled with ``key``) or "empirical". ``ekfac``: also the
    eigenvalue correction (one more pass over the data). Raises ValueError naming the modules it found when the
    model has no Dense or 2-D Conv layer."""
    kind = check_choice(kind, "kind", choices=KFAC_KINDS)
    params = check_params(params)
    batches = [data] if isinstance(data, tuple) else list(data)
    if not batches or any(not isinstance(b, tuple) or len(b) != 2 for b in batches):
        raise ValueError("data: expected one batch (x, y) or a list of (x, y) batches")
    if kind == "fisher" and key is None:
        raise ValueError("kind='fisher' samples labels from the model: pass key=jax.random.key(...)")
    layers, skipped, shapes_one = discover_layers(predict_fn, params, batches[0][0])
    if not layers:
        found = ", ".join(f"{name} ({why})" for name, why in skipped) or "no parameterised module"
        raise ValueError(f"K-FAC found no Dense or 2-D Conv layer to factor; the model calls: {found}")
    names = ["/".join(layer.path) for layer in layers]
    fallback_paths = tuple(name for name, _ in skipped) + uncovered_modules(params, set(names) | {n for n, _ in skipped})
    count = sum(int(np.shape(jax.tree.leaves(b[0])[0])[0]) for b in batches)
    keys = jax.random.split(key, len(batches)) if key is not None else [None] * len(batches)
    a_total, g_total, diagonal_total, per_batch = {}, {}, None, []
    for batch, batch_key in zip(batches, keys):
        size = int(np.shape(jax.tree.leaves(batch[0])[0])[0])
        shapes = tuple((name, (size, *shapes_one[name][1:])) for name in names)
        a_sums, g_sums, per_example, diagonal = _statistics(predict_fn, output_loss, params, batch, layers, shapes,
                                                           kind, batch_key, fallback_paths, ekfac, _unrolled(layers))
        for name in names:
            a_total[name] = a_total.get(name, 0) + a_sums[name]
            g_total[name] = g_total.get(name, 0) + g_sums[name]
        if diagonal is not None:
            diagonal_total = diagonal if diagonal_total is None else jax.tree.map(jnp.add, diagonal_total, diagonal)
        per_batch.append(per_example)
    factors, eigen = _factors_and_eigen(a_total, g_total, count)
    corrected = None
    if ekfac:
        corrected = {}
        for name in names:
            _, u_a, _, u_g = eigen[name]
            total = 0
            for per_example in per_batch:
                a, g = per_example[name]
                # per-example, per-column gradient Σ_t a_t g_tᵀ in the Kronecker eigenbasis, squared
                projected = jnp.einsum("bti,cbto,ij,op->cbjp", a, g, u_a, u_g)
                total = total + jnp.sum(projected**2, axis=(0, 1))
            corrected[name] = total / count
    if diagonal_total is None:
        diagonal = _zeros_like(params)
    else:
        diagonal = jax.tree.map(lambda d: d / count, diagonal_total)
        for layer in layers:  # a fallback module may hold a factored layer: its parameters are in its block only
            diagonal = replace_subtree(diagonal, layer.path, jax.tree.map(jnp.zeros_like, _subtree(diagonal, layer.path)))
    return KFAC(params, layers, factors, eigen, corrected, diagonal, fallback_paths, kind, count)




class KfacPreconditionerState(NamedTuple):
    count: jax.Array  # int32: updates done
    factors: dict  # {layer: (A, G)}: running averages of the statistics
    eigen: dict  # {layer: (s_A, U_A, s_G, U_G)} of the factors at the last inversion
    key: jax.Array  # for the sampled labels of kind "fisher"


def _slots(params: Any) -> dict:
    """{layer name: (rows of A, rows of G)} for every parameter dict holding a 2-D (Dense) or 4-D (2-D Conv) kernel:
    the layers K-FAC may factor, known from the parameters alone (the model is only seen at the first update)."""
    slots: dict = {}

    def visit(prefix, node):
        if not isinstance(node, dict):
            return
        kernel = node.get("kernel")
        if kernel is not None and not isinstance(kernel, dict) and np.ndim(kernel) in (2, 4):
            slots["/".join(prefix)] = (int(np.prod(np.shape(kernel)[:-1])) + ("bias" in node), int(np.shape(kernel)[-1]))
        for key, value in node.items():
            visit(prefix + (key,), value)

    visit((), params)
    return slots


def kfac_preconditioner(*, damping: float = 1e-3, decay: float = 0.95, statistics_every: int = 1,
                        inverse_every: int = 10, kind: str = "fisher", seed: int = 0):
    """K-FAC as an optax transformation: every factored layer's gradient W becomes (A ⊗ G + δI)⁻¹W (in the Kronecker
    eigenbasis), the other parameters' gradients pass unchanged; chain it before the step, e.g.
    ``optax.chain(kfac_preconditioner(), optax.sgd(lr, momentum=0.9))``. Its ``update`` needs the batch and the model:
    ``tx.update(grads, state, params, batch=(x, y), predict_fn=..., output_loss=...)`` (``jaxnn train`` passes them
    for ``optimizer.name: kfac``; in a per-device step, ``axis_name=`` all-reduces the statistics over the devices).
    The factors are running averages (``decay``) of one batch's statistics, refreshed
    every ``statistics_every`` updates; their eigendecompositions every ``inverse_every`` (Martens & Grosse 2015).
    ``kind``: "fisher" (labels sampled from the model: the true Fisher, K-FAC's own choice), "empirical" or "ggn"."""
    import optax

    kind = check_choice(kind, "kind", choices=KFAC_KINDS)
    for value, name in ((statistics_every, "statistics_every"), (inverse_every, "inverse_every")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    # checked where they are numbers: swept in a population, they are traced
    if isinstance(damping, (int, float)) and not damping > 0 or isinstance(decay, (int, float)) and not 0 <= decay < 1:
        raise ValueError(f"damping must be > 0 and decay in [0, 1); got damping={damping}, decay={decay}")

    def init(params):
        dtype = jax.tree.leaves(params)[0].dtype
        slots = _slots(params)
        factors = {name: (jnp.eye(a, dtype=dtype), jnp.eye(g, dtype=dtype)) for name, (a, g) in slots.items()}
        eigen = {name: (jnp.ones(a, dtype), jnp.eye(a, dtype=dtype), jnp.ones(g, dtype), jnp.eye(g, dtype=dtype))
                 for name, (a, g) in slots.items()}
        return KfacPreconditionerState(jnp.zeros((), jnp.int32), factors, eigen, jax.random.PRNGKey(seed))

    def update(updates, state, params=None, *, batch=None, predict_fn=None, output_loss=None, axis_name=None,
               **extra):
        del extra
        if params is None or batch is None or predict_fn is None or output_loss is None:
            raise ValueError("kfac_preconditioner: update needs params, batch=(x, y), predict_fn=(params, x) -> outputs "
                             "and output_loss=(outputs, y) -> mean loss")
        layers, _, shapes = discover_layers(predict_fn, params, batch[0])
        layers = tuple(layer for layer in layers if "/".join(layer.path) in state.factors)
        names = ["/".join(layer.path) for layer in layers]
        key, sample_key = jax.random.split(state.key)

        def refreshed(factors):
            a_sums, g_sums, _, _ = _batch_statistics(predict_fn, output_loss, params, batch, layers,
                                                     tuple((n, shapes[n]) for n in names), kind, sample_key, ())
            count = jax.tree.leaves(batch[0])[0].shape[0]
            if axis_name is not None:  # a per-device step: the statistics of the whole batch are the devices' sums
                a_sums, g_sums, count = jax.lax.psum((a_sums, g_sums, count), axis_name)
            weight = jnp.where(state.count == 0, 0.0, decay)  # the first statistics replace the identity start
            new = dict(factors)
            for name in names:
                a, g = factors[name]
                new[name] = (weight * a + (1 - weight) * a_sums[name] / count,
                             weight * g + (1 - weight) * g_sums[name] / count)
            return new

        factors = jax.lax.cond(state.count % statistics_every == 0, refreshed, lambda f: dict(f), state.factors)

        def inverted(factors):
            out = dict(state.eigen)
            for name in names:
                s_a, u_a = jnp.linalg.eigh(factors[name][0])
                s_g, u_g = jnp.linalg.eigh(factors[name][1])
                out[name] = (jnp.clip(s_a, 0.0), u_a, jnp.clip(s_g, 0.0), u_g)
            return out

        eigen = jax.lax.cond(state.count % inverse_every == 0, inverted, lambda f: dict(state.eigen), factors)
        for layer, name in zip(layers, names):
            s_a, u_a, s_g, u_g = eigen[name]
            w = layer_matrix(updates, layer)
            preconditioned = u_a @ ((u_a.T @ w @ u_g) / (s_a[:, None] * s_g[None, :] + damping)) @ u_g.T
            updates = _set_joint(updates, layer, preconditioned)
        return updates, KfacPreconditionerState(state.count + 1, factors, eigen, key)

    return optax.GradientTransformationExtraArgs(init, update)
