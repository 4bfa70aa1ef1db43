"""Losses against the seeds' worked numbers and closed forms (natural log throughout)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import losses

SCORES = jnp.array([[3.2, 5.1, -1.7]])


def test_multiclass_hinge_worked_example():
    # max(0, 5.1 - 3.2 + 1) + max(0, -1.7 - 3.2 + 1) = 2.9
    assert float(losses.multiclass_hinge(SCORES, jnp.array([0]))[0]) == pytest.approx(2.9, abs=1e-5)


def test_both_multiclass_hinges_on_the_notes_three_images():
    """The notes' sum over classes (Weston-Watkins) gives 2.9, 0, 12.9; optax's max (Crammer-Singer) 2.9, 0, 6.6:
    both against a loop over the classes, in float64, and under their registry names."""
    scores = np.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    labels = np.array([0, 1, 2])
    summed = [sum(max(0.0, s[j] - s[y] + 1.0) for j in range(3) if j != y) for s, y in zip(scores, labels)]
    worst = [max(s[j] + (j != y) for j in range(3)) - s[y] for s, y in zip(scores, labels)]
    np.testing.assert_allclose(summed, [2.9, 0.0, 12.9], atol=1e-12)
    np.testing.assert_allclose(worst, [2.9, 0.0, 6.6], atol=1e-12)
    with jax.enable_x64(True):
        np.testing.assert_allclose(losses.get_loss("weston_watkins_hinge")(jnp.asarray(scores), labels), summed,
                                   atol=1e-12)
        np.testing.assert_allclose(losses.get_loss("crammer_singer_hinge")(jnp.asarray(scores), labels), worst,
                                   atol=1e-12)
        # Δ = 2 adds 1 to each margin that stays violated (cat: one class, frog: two; car none)
        np.testing.assert_allclose(losses.weston_watkins_hinge(jnp.asarray(scores), labels, delta=2.0),
                                   [3.9, 0.0, 14.9], atol=1e-12)
    assert losses.multiclass_hinge is losses.get_loss("crammer_singer_hinge")


def test_softmax_cross_entropy_worked_example_natural_log():
    expected = -3.2 + math.log(math.exp(3.2) + math.exp(5.1) + math.exp(-1.7))
    value = float(losses.softmax_cross_entropy(SCORES, jnp.array([0]))[0])
    assert value == pytest.approx(expected, rel=1e-6)
    assert round(value, 2) == 2.04
    # p = 0.8 on the true class -> -ln 0.8 = 0.223 (not log10 or log2)
    logits = jnp.log(jnp.array([[0.8, 0.2]]))
    assert float(losses.softmax_cross_entropy(logits, jnp.array([0]))[0]) == pytest.approx(0.2231, abs=1e-4)


def test_mse_is_half_squared_norm_per_example():
    out = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    y = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(losses.mean_squared_error(out, y), [0.5 * 5.0, 0.5 * 5.0], rtol=1e-6)


def test_sigmoid_bce_closed_form():
    z, y = 0.3, 1.0
    expected = -math.log(1 / (1 + math.exp(-z)))
    assert float(losses.sigmoid_binary_cross_entropy(jnp.array([[z]]), jnp.array([y]))[0]) == pytest.approx(expected, rel=1e-6)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="softmax_cross_entropy"):
        losses.get_loss("crossentropy")


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(3)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(2)(x)


def test_make_loss_fn_eval_uses_running_stats_train_uses_batch_stats():
    model = TinyBN()
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    y = jnp.array([0, 1] * 4)
    variables = model.init(jax.random.PRNGKey(1), x)
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    # Move running statistics away from the batch's own so the two modes differ.
    state = jax.tree.map(lambda a: a + 0.5, state)
    eval_loss = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state, mode="eval")
    train_loss = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state, mode="train")

    # Oracle: the same network written out by hand.
    def manual(params, stats, use_batch):
        h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
        mean, var = (h.mean(0), h.var(0)) if use_batch else (stats["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["var"])
        h = (h - mean) / jnp.sqrt(var + 1e-5) * params["BatchNorm_0"]["scale"] + params["BatchNorm_0"]["bias"]
        logits = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(8), y])

    assert float(eval_loss(params, (x, y))) == pytest.approx(float(manual(params, state["batch_stats"], False)), rel=1e-5)
    assert float(train_loss(params, (x, y))) == pytest.approx(float(manual(params, state["batch_stats"], True)), rel=1e-5)
    # Differentiable and pure: the gradient is finite and the state is not mutated.
    grads = jax.grad(train_loss)(params, (x, y))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_make_loss_fn_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        losses.make_loss_fn(lambda *a, **k: None, "mse", mode="test")


@pytest.mark.parametrize("name,labels", [("softmax_cross_entropy", np.array([0, 3, 2, 1])),
                                         ("mse", np.arange(20.0).reshape(4, 5) / 7),
                                         ("sigmoid_binary_cross_entropy", (np.arange(20).reshape(4, 5) % 3 == 0))])
def test_batch_mean_hessian_root_squares_to_each_examples_hessian(name, labels):
    """S Sᵀ equals jax.hessian of the per-example loss in the outputs (float64), example by example (one example
    near one-hot: the softmax root's reflection stays stable); the batch mean
    is the registry loss averaged; the same name gives the same function (compiled programs keyed on it are shared)."""
    with jax.enable_x64(True):
        outputs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)) * 2).at[3].set([30.0, 0, 0, -30, 1])
        labels = jnp.asarray(labels)
        output_loss = losses.batch_mean(name)
        assert output_loss is losses.batch_mean(name)
        np.testing.assert_allclose(output_loss(outputs, labels), np.mean(losses.get_loss(name)(outputs, labels)),
                                   rtol=1e-14)
        roots = output_loss.hessian_root(outputs, labels)  # (k, B, C): softmax's Hessian has rank C − 1
        assert roots.shape == (4 if name == "softmax_cross_entropy" else 5, 4, 5)
        for b in range(4):
            hessian = jax.hessian(lambda f: output_loss(f[None], labels[b:b + 1]))(outputs[b])
            np.testing.assert_allclose(roots[:, b].T @ roots[:, b], hessian, atol=1e-13)
        assert not hasattr(losses.batch_mean("multiclass_hinge"), "hessian_root")  # no closed form: K-FAC's eigh


def test_resolve_loss_is_the_one_place_a_name_becomes_a_function():
    assert losses.resolve_loss("mse") is losses.mean_squared_error
    assert losses.resolve_loss(losses.multiclass_hinge) is losses.multiclass_hinge
    with pytest.raises(ValueError, match="valid losses: crammer_singer_hinge"):
        losses.resolve_loss("hinge")
    with pytest.raises(TypeError, match="expected a loss name .* or a function"):
        losses.resolve_loss(3)


def test_sequence_cross_entropy_and_accuracy_skip_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 5))
    labels = np.array([[1, 4, 0, -1], [2, -1, -1, -1], [-1, -1, -1, -1]])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [-(log_p[0, 0, 1] + log_p[0, 1, 4] + log_p[0, 2, 0]) / 3, -log_p[1, 0, 2], 0.0]
    np.testing.assert_allclose(losses.sequence_cross_entropy(jnp.asarray(logits), labels), expected, rtol=1e-5)
    predicted = logits.argmax(-1)
    right = predicted == labels
    expected_accuracy = [right[0, :3].mean(), float(right[1, 0]), 1.0]
    np.testing.assert_allclose(losses.example_accuracy(jnp.asarray(logits), labels), expected_accuracy, rtol=1e-6)
    assert float(losses.accuracy(jnp.asarray(logits), labels)) == pytest.approx(np.mean(expected_accuracy))
    with pytest.raises(ValueError, match=r"sequence_cross_entropy: expected logits \(batch, time, classes\)"):
        losses.sequence_cross_entropy(jnp.asarray(logits[:, 0]), labels[:, 0])
