"""The factored evaluation f(Σ c_j T_j) — linear operations once per basis tree — equals direct evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.landscape.linear_factoring import AFFINE, POINT, LinearFactorization


def _random_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])


def _check_factored_equals_direct(fn, params, batch, state=None, *, atol=1e-11, num_points=4):
    """Oracle: fn evaluated directly at θ(c) = Σ_j c_j T_j, point by point, without any transformation."""
    basis = [params, _random_like(jax.random.key(1), params), _random_like(jax.random.key(2), params)]
    rng = np.random.default_rng(0)
    points = np.concatenate([[[1.0, 0.0, 0.0]], rng.normal(size=(num_points - 1, 3))])
    factorization = LinearFactorization(fn, params, batch, state, num_basis=3, with_state=state is not None)
    extra = () if state is None else (state,)
    points = jnp.asarray(points)

    @jax.jit
    def direct_values():  # plain evaluation at Σ c_j T_j, no transformation
        return [fn(jax.tree.map(lambda a, b, d: c[0] * a + c[1] * b + c[2] * d, *basis), batch, *extra)
                for c in points]

    @jax.jit
    def factored_values():  # one point at a time
        shared = factorization.shared(basis, batch, factorization.consts)
        return [factorization.at_point(shared, c, state) for c in points]

    @jax.jit
    def factored_vmapped():  # vmapped over points, as the grid engine uses it
        shared = factorization.shared(basis, batch, factorization.consts)
        return jax.vmap(lambda c: factorization.at_point(shared, c, state))(points)

    direct, factored, vmapped = direct_values(), factored_values(), factored_vmapped()
    for index in range(len(points)):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=atol),
                     factored[index], direct[index])
        jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u)[index], np.asarray(v), rtol=1e-10,
                                                             atol=atol), vmapped, direct[index])
    return factorization


def _mlp_params(key, sizes):
    keys = jax.random.split(key, len(sizes))
    return [{"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jax.random.normal(k, (b,)) * 0.1}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _mlp_loss(params, batch):
    x, y = batch
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    log_probs = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def test_mlp_first_layer_is_factored_and_values_match(x64):
    params = _mlp_params(jax.random.key(0), [5, 7, 3])
    batch = (jax.random.normal(jax.random.key(3), (6, 5)), jnp.array([0, 1, 2, 0, 1, 2]))
    factorization = _check_factored_equals_direct(_mlp_loss, params, batch)
    counts = factorization.counts()
    # x@W1, broadcast(b1), +b1 are affine; everything after the first relu is per point
    assert counts[AFFINE] >= 3
    assert counts[POINT] > 0


def test_unfactored_mode_and_shared_forward_passes(x64):
    """factor_linear=False: nothing AFFINE beyond the parameters, same values; loss and accuracy of the same
    logits trace the forward pass twice, but it is kept once (common-subexpression elimination)."""
    params = _mlp_params(jax.random.key(0), [5, 7, 3])
    batch = (jax.random.normal(jax.random.key(3), (6, 5)), jnp.array([0, 1, 2, 0, 1, 2]))

    def logits(p, x):
        return jax.nn.relu(x @ p[0]["kernel"] + p[0]["bias"]) @ p[1]["kernel"] + p[1]["bias"]

    def metrics(p, b):
        return {"loss": _mlp_loss(p, b), "accuracy": jnp.mean(jnp.argmax(logits(p, b[0]), -1) == b[1])}

    plain = LinearFactorization(metrics, params, batch, num_basis=3, factor_linear=False)
    assert plain.counts()[AFFINE] == 0
    basis = [params, _random_like(jax.random.key(1), params), _random_like(jax.random.key(2), params)]
    c = jnp.array([1.0, -0.4, 0.9])
    got = jax.jit(lambda: plain.at_point(plain.shared(basis, batch, plain.consts), c))()
    expected = metrics(jax.tree.map(lambda a, b, d: c[0] * a + c[1] * b + c[2] * d, *basis), batch)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-12)
    np.testing.assert_allclose(got["accuracy"], expected["accuracy"], rtol=1e-12)
    dots = [e for e in plain._equations if e.primitive.name == "dot_general"]
    assert len(dots) == 2  # x@W1 and h@W2, once each although logits are traced in both metrics
    single = LinearFactorization(_mlp_loss, params, batch, num_basis=3, factor_linear=False)
    assert len([e for e in single._equations if e.primitive.name == "dot_general"]) == 2


def test_product_of_two_affine_values_is_not_treated_as_linear(x64):
    def quadratic(params, batch):
        return 0.5 * jnp.dot(params["w"], params["w"]) + jnp.sum(params["w"] * batch)

    params = {"w": jnp.arange(4.0)}
    batch = jnp.linspace(-1, 1, 4)
    factorization = _check_factored_equals_direct(quadratic, params, batch)
    kinds = [factorization._kinds[e.outputs[0]] for e in factorization._equations if e.primitive.name == "dot_general"]
    assert kinds == [POINT]


def test_conv_concatenate_pad_select_slice_gather(x64):
    def cnn(params, batch):
        x, index = batch
        h = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"]
        h = jnp.concatenate([h, 2.0 * jnp.ones_like(h)], axis=-1)  # affine with a const piece
        h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=0.5)[:, 1:-1, 1:-1, :]
        h = jnp.where(x[..., :1] > 0, h, -h) / 3.0 - 1.0
        h = jax.lax.dynamic_slice_in_dim(h, 1, 3, axis=1)
        h = h[:, index]  # gather with a CONST index
        return jnp.mean(jnp.tanh(h.reshape(h.shape[0], -1) @ params["dense"]) ** 2)

    params = {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)), "bias": jnp.ones(4),
              "dense": jax.random.normal(jax.random.key(1), (4 * 8, 2))}
    batch = (jax.random.normal(jax.random.key(2), (2, 5, 4, 2)), jnp.int32(2))
    factorization = _check_factored_equals_direct(cnn, params, batch)
    affine_names = {e.primitive.name for e in factorization._equations if factorization._kinds[e.outputs[0]] == AFFINE}
    assert {"conv_general_dilated", "concatenate", "pad", "select_n", "dynamic_slice"} <= affine_names


def test_gather_with_a_nonzero_fill_value_is_not_linear(x64):
    def lookup(params, batch):
        picked = jnp.take(params["w"], batch, axis=0, mode="fill", fill_value=2.0)  # index 5 is out of bounds
        return jnp.sum(jnp.tanh(picked)) + jnp.sum(jnp.take(params["w"], batch, axis=0, mode="fill", fill_value=0.0))

    factorization = _check_factored_equals_direct(lookup, {"w": jnp.arange(3.0) - 1.0}, jnp.array([0, 2, 5]))
    gathers = [factorization._kinds[e.outputs[0]] for e in factorization._equations if e.primitive.name == "gather"]
    assert sorted(gathers) == [AFFINE, POINT]


def test_control_flow_custom_derivatives_and_inner_jit(x64):
    @jax.custom_vjp
    def scaled_sin(x):
        return jnp.sin(x)

    scaled_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))

    @jax.jit
    def layer(w, x):
        return x @ w

    @jax.checkpoint
    def block(h):
        return jnp.tanh(h) * 2.0

    def recurrent(params, batch):
        h = block(scaled_sin(layer(params["w_in"], batch)))

        def step(carry, x_t):
            carry = jnp.tanh(carry @ params["w_rec"] + x_t)
            return carry, carry.sum()

        carry, sums = jax.lax.scan(step, jnp.zeros(h.shape[1:]), h)
        bonus = jax.lax.cond(carry[0] > 0, lambda: jnp.sum(params["w_rec"]), lambda: -1.0)
        return jnp.sum(carry) + jnp.mean(sums) + bonus

    params = {"w_in": jax.random.normal(jax.random.key(0), (3, 4)),
              "w_rec": jax.random.normal(jax.random.key(1), (4, 4)) * 0.3}
    batch = jax.random.normal(jax.random.key(2), (5, 3))
    factorization = _check_factored_equals_direct(recurrent, params, batch)
    # the jitted first layer was inlined and factored
    assert any(e.primitive.name == "dot_general" and factorization._kinds[e.outputs[0]] == AFFINE
               for e in factorization._equations)


def test_state_inputs_are_per_point_and_outputs_may_be_dicts(x64):
    def normalised(params, batch, state):
        h = batch @ params["w"]
        h = (h - state["mean"]) / jnp.sqrt(state["square"] - state["mean"] ** 2 + 1e-3)
        return {"loss": jnp.mean(jax.nn.softplus(h)), "linear": jnp.sum(params["w"]) * 2.0, "const": jnp.sum(batch)}

    params = {"w": jax.random.normal(jax.random.key(0), (3, 2))}
    batch = jax.random.normal(jax.random.key(1), (4, 3))
    state = {"mean": jnp.array([0.1, -0.2]), "square": jnp.array([1.5, 2.0])}
    _check_factored_equals_direct(normalised, params, batch, state)


def test_flax_linen_cnn_through_its_jaxpr(x64):
    flax_linen = pytest.importorskip("flax.linen")

    class TinyCNN(flax_linen.Module):
        @flax_linen.compact
        def __call__(self, x):
            x = flax_linen.Conv(3, (3, 3))(x)
            x = flax_linen.relu(x)
            x = x.reshape(x.shape[0], -1)
            return flax_linen.Dense(4)(x)

    model = TinyCNN()
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 1))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]

    def loss(p, batch):
        logits = model.apply({"params": p}, batch[0])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], axis=1))

    factorization = _check_factored_equals_direct(loss, params, (x, jnp.array([1, 3])))
    assert any(e.primitive.name == "conv_general_dilated" and factorization._kinds[e.outputs[0]] == AFFINE
               for e in factorization._equations)


def test_float32_default_matches_to_float32_precision():
    params = _mlp_params(jax.random.key(0), [5, 7, 3])
    batch = (jax.random.normal(jax.random.key(3), (6, 5)), jnp.array([0, 1, 2, 0, 1, 2]))
    basis = [params, _random_like(jax.random.key(1), params), _random_like(jax.random.key(2), params)]
    factorization = LinearFactorization(_mlp_loss, params, batch, num_basis=3)
    c = jnp.array([1.0, 0.3, -0.7], jnp.float32)
    direct = jax.jit(lambda: _mlp_loss(jax.tree.map(lambda a, b, d: c[0] * a + c[1] * b + c[2] * d, *basis), batch))()
    factored = jax.jit(lambda: factorization.at_point(factorization.shared(basis, batch, factorization.consts), c))()
    assert factored.dtype == jnp.float32
    np.testing.assert_allclose(factored, direct, rtol=1e-5)


@pytest.mark.parametrize("pool, window, strides, sliced", [
    ("max", (2, 2), (2, 2), True), ("avg", (2, 2), (2, 2), True), ("max", (3, 3), (3, 3), True),
    ("max", (3, 3), (2, 2), False), ("max", (4, 4), (4, 4), False)])  # overlapping; 16 > MAX_SLICED_WINDOW
def test_pooling_by_strided_slices_equals_reduce_window(x64, monkeypatch, pool, window, strides, sliced):
    """Non-overlapping pooling runs as the max / sum of strided slices on CPU (odd sizes drop their last rows, as
    VALID pooling does); other windows keep reduce_window. Oracle: flax's pooling on materialised parameters."""
    import flax.linen as nn

    from jaxnn.landscape import linear_factoring

    calls = []
    original = linear_factoring._pool_by_slices
    monkeypatch.setattr(linear_factoring, "_pool_by_slices",
                        lambda eqn, values: calls.append(original(eqn, values)) or calls[-1])
    pooling = nn.max_pool if pool == "max" else nn.avg_pool
    params = {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)), "bias": jnp.arange(4.0) / 10}

    def fn(p, batch):
        h = jax.lax.conv_general_dilated(batch, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(pooling(jnp.tanh(h + p["bias"]), window, strides) ** 2, axis=(1, 2, 3))

    batch = jax.random.normal(jax.random.key(3), (5, 11, 13, 2))
    _check_factored_equals_direct(fn, params, batch)
    assert calls and all((value is not None) == (sliced and jax.default_backend() == "cpu") for value in calls)
