"""Per-layer statistics against a hand-written forward pass (float64): activation moments, dead ReLUs, saturated
tanh units, gradient norms and update ratios; the fit callback; unknown layers named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import data as data_lib, losses, models
from jaxnn.diagnostics import LayerStatisticsCallback, layer_statistics
from jaxnn.train import create_train_state, fit


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits", seed=0)


def _state(activation="relu", tx=None, seed=0, **kwargs):
    model = models.get_model("mlp", num_classes=10, width=8, depth=2, activation=activation, **kwargs)
    return create_train_state(model, tx or optax.sgd(0.1), (64,), jax.random.PRNGKey(seed))


def _by_name(rows):
    return {row["name"]: row for row in rows}


def test_statistics_equal_a_hand_written_forward_pass(digits, x64):
    state = _state()
    x, y = digits.train.x[:100].reshape(100, -1).astype(np.float64), digits.train.y[:100]
    p = jax.tree.map(np.asarray, state.params)
    z0 = x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    a0 = np.maximum(z0, 0)
    z1 = a0 @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    a1 = np.maximum(z1, 0)
    logits = a1 @ p["head"]["kernel"] + p["head"]["bias"]
    stats = layer_statistics(state, (x, y))
    rows = _by_name(stats.activations)
    assert list(rows) == ["dense_0", "dense_1", "head"] and stats.saturation is None
    for name, reads, out in (("dense_0", x, z0), ("dense_1", a0, z1), ("head", a1, logits)):
        np.testing.assert_allclose([rows[name]["mean"], rows[name]["std"], rows[name]["output_std"]],
                                   [reads.mean(), reads.std(), out.std()], rtol=1e-12)
        assert rows[name]["zero_fraction"] == pytest.approx(np.mean(reads == 0), abs=1e-15)
        assert rows[name]["dead_fraction"] == pytest.approx(np.mean(np.all(reads == 0, axis=0)), abs=1e-15)
        assert sum(rows[name]["histogram"]["counts"]) == reads.size

    tx = optax.adam(1e-3)
    state = state.replace(opt_state=tx.init(state.params), tx=tx)
    stats = layer_statistics(state, (x, y))
    loss_fn = losses.make_loss_fn(state.apply_fn, "softmax_cross_entropy", state.model_state)
    grads = jax.grad(loss_fn)(state.params, (jnp.asarray(x), jnp.asarray(y)))
    updates, _ = tx.update(grads, state.opt_state, state.params)
    gradient_rows = _by_name(stats.gradients)
    for layer in ("dense_0", "dense_1", "head"):
        name = f"{layer}/kernel"
        np.testing.assert_allclose(gradient_rows[name]["grad_norm"], np.linalg.norm(grads[layer]["kernel"]),
                                   rtol=1e-12)
        np.testing.assert_allclose(gradient_rows[name]["update_ratio"], np.linalg.norm(updates[layer]["kernel"])
                                   / np.linalg.norm(p[layer]["kernel"]), rtol=1e-10)
    assert gradient_rows["dense_0/bias"]["update_ratio"] is None  # zero-initialised: no ratio to a zero norm
    assert stats.scalars()["grad_norm/head/kernel"] == gradient_rows["head/kernel"]["grad_norm"]


def test_dead_relus_and_saturated_tanh_units_are_counted_and_flagged(digits, x64):
    x, y = digits.train.x[:64].reshape(64, -1).astype(np.float64), digits.train.y[:64]
    state = _state()
    params = jax.tree.map(np.array, state.params)
    params["dense_0"]["bias"][:4] = -1e3  # 4 of 8 units can never fire
    stats = layer_statistics(state.replace(params=params), (x, y))
    assert _by_name(stats.activations)["dense_1"]["dead_fraction"] == 0.5
    assert any(flag.startswith("dense_1: 50% of the units it reads are dead") for flag in stats.flags)

    state = _state("tanh")
    params = jax.tree.map(np.array, state.params)
    params["dense_0"]["kernel"] *= 30.0  # N(0, large) init: tanh units pinned at +-1
    stats = layer_statistics(state.replace(params=params), (x, y))
    assert stats.saturation == "tanh"
    expected = np.mean(np.abs(np.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])) > 0.99)
    saturated = _by_name(stats.activations)["dense_1"]["saturated_fraction"]
    assert saturated == pytest.approx(expected, abs=1e-15) and saturated > 0.9
    assert any("saturated" in flag and flag.startswith("dense_1") for flag in stats.flags)
    clean = layer_statistics(_state("tanh"), (x, y))
    assert not any("saturated" in flag for flag in clean.flags)


def test_convolutions_and_unknown_layers(digits):
    model = models.get_model("lenet", num_classes=10)
    state = create_train_state(model, optax.sgd(0.1), (8, 8, 1), jax.random.PRNGKey(0))
    x = digits.train.x[:16].reshape(-1, 8, 8, 1)
    stats = layer_statistics(state, (x, digits.train.y[:16]))
    assert [row["name"] for row in stats.activations][:2] == ["conv_0", "conv_1"]
    assert stats.activations[1]["shape"][-1] == 6  # conv_1 reads conv_0's 6 channels (dead units: channels)
    only = layer_statistics(state, (x, digits.train.y[:16]), layers=["conv_1"])
    assert [row["name"] for row in only.activations] == ["conv_1"]
    assert {row["name"] for row in only.gradients} == {"conv_1/kernel", "conv_1/bias"}
    with pytest.raises(ValueError, match="no layer named 'dense_9'; this model's layers: conv_0, conv_1, dense_0"):
        layer_statistics(state, (x, digits.train.y[:16]), layers=["dense_9"])


def test_callback_logs_every_k_steps(digits):
    state = create_train_state(models.get_model("mlp", num_classes=10, width=8, depth=1), optax.sgd(0.1),
                               digits.input_shape, jax.random.PRNGKey(0))
    callback = LayerStatisticsCallback(every_k_steps=5)
    fit(state, digits, batch_size=32, num_steps=12, callbacks=[callback], progress=False, log_every=5)
    assert [h["step"] for h in callback.history] == [5, 10]
    assert {"act_std/head", "dead/head", "grad_norm/dense_0/kernel", "update_ratio/head/kernel"} <= set(
        callback.history[0])
    with pytest.raises(ValueError, match="every_k_steps"):
        LayerStatisticsCallback(every_k_steps=0)


def test_layers_come_in_call_order_past_ten(digits):
    """A compiled program returns a dict with sorted keys (dense_10 before dense_2): the report keeps call order."""
    model = models.get_model("mlp", num_classes=10, width=4, depth=12)
    state = create_train_state(model, optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(0))
    stats = layer_statistics(state, (digits.train.x[:8], digits.train.y[:8]))
    assert [row["name"] for row in stats.activations] == [f"dense_{i}" for i in range(12)] + ["head"]
    assert [row["name"] for row in stats.gradients][::2] == [f"dense_{i}/bias" for i in range(12)] + ["head/bias"]


def test_small_updates_are_flagged_during_training_only():
    """A finished run's last updates are small by design (a decayed schedule): `jaxnn diagnose` flags only updates
    far above ~1e-3 of the weights; during training both sides are flagged."""
    from jaxnn.diagnostics.layers import _flags

    rows = [{"name": f"dense_{i}/kernel", "grad_norm": 1.0, "param_norm": 1.0, "update_ratio": ratio}
            for i, ratio in enumerate((1e-6, 1e-3, 1e-1))]
    during = _flags([], rows, None)
    after = _flags([], rows, None, flag_small_updates=False)
    assert [f.split(":")[0] for f in during] == ["dense_0/kernel", "dense_2/kernel"]
    assert "too low" in during[0] and "too high" in during[1]
    assert [f.split(":")[0] for f in after] == ["dense_2/kernel"]
