"""Recurrent classifiers: the scanned Elman RNN, LSTM and GRU against the cell equations written out in numpy and
unrolled step by step (float64), variable lengths against the unpadded sequences, the Hessian through the scan
against a dense eigendecomposition, training on the digits read row by row, and bad input named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import models
from jaxnn import data as data_lib
from jaxnn.train import create_train_state, fit


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _step(cell, p, x, carry):
    """One step of the cell from its equations (the module docstring), on numpy parameters."""
    def lin(name, v):
        out = v @ p[name]["kernel"]
        return out + p[name]["bias"] if "bias" in p[name] else out

    if cell == "elman":
        h = np.tanh(lin("i", x) + lin("h", carry))
        return h, h
    if cell == "lstm":
        c, h = carry
        i = _sigmoid(lin("ii", x) + lin("hi", h))
        f = _sigmoid(lin("if", x) + lin("hf", h))
        g = np.tanh(lin("ig", x) + lin("hg", h))
        o = _sigmoid(lin("io", x) + lin("ho", h))
        c = f * c + i * g
        h = o * np.tanh(c)
        return (c, h), h
    r = _sigmoid(lin("ir", x) + lin("hr", carry))
    z = _sigmoid(lin("iz", x) + lin("hz", carry))
    n = np.tanh(lin("in", x) + r * lin("hn", carry))
    h = (1.0 - z) * n + z * carry
    return h, h


def _unrolled_logits(cell, params, x, lengths, layers):
    """Each sequence alone, a Python loop over its valid steps, layer after layer, then the head."""
    params = jax.tree.map(np.asarray, params)
    names = sorted(k for k in params if k != "head")
    logits = []
    for sequence, length in zip(x, lengths):
        h_seq = sequence[:length]
        for layer in range(layers):
            p = params[names[layer]]
            hidden = p[next(iter(p))]["kernel"].shape[1]
            carry = (np.zeros(hidden), np.zeros(hidden)) if cell == "lstm" else np.zeros(hidden)
            outputs = []
            for x_t in h_seq:
                carry, out = _step(cell, p, x_t, carry)
                outputs.append(out)
            h_seq = np.stack(outputs)
        logits.append(h_seq[-1] @ params["head"]["kernel"] + params["head"]["bias"])
    return np.stack(logits)


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_the_scan_equals_the_cell_equations_unrolled_with_variable_lengths(cell, x64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 5))
    lengths = np.array([7, 4, 1])
    model = models.get_model("recurrent", num_classes=3, cell=cell, hidden=6, num_layers=2)
    params, _ = models.init_model(model, jax.random.PRNGKey(0), (7, 5))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
    scanned = np.asarray(model.apply({"params": params}, x, lengths=lengths))
    np.testing.assert_allclose(scanned, _unrolled_logits(cell, params, x, lengths, 2), rtol=1e-12, atol=1e-12)
    # the padding after each length is ignored: scrambling it changes nothing; without lengths it is read
    scrambled = x.copy()
    scrambled[1, 4:] = 100.0
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, scrambled, lengths=lengths)), scanned)
    assert not np.allclose(np.asarray(model.apply({"params": params}, x))[1], scanned[1])


def test_the_hessian_through_the_scan_against_a_dense_eigendecomposition(x64,
                                                                          assert_top_hessian_eigenvalues_match_dense):
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.normal(size=(16, 6, 3))), jnp.asarray(rng.integers(0, 3, 16), jnp.int32))
    assert_top_hessian_eigenvalues_match_dense(models.get_model("lstm", num_classes=3, hidden=4), (6, 3), batch)


def test_an_lstm_learns_the_digits_read_row_by_row():
    digits = data_lib.load_dataset("digits", seed=0)
    state = create_train_state(models.get_model("lstm", num_classes=10, hidden=32), optax.adam(3e-3),
                               digits.input_shape, jax.random.PRNGKey(0))
    result = fit(state, digits, batch_size=64, num_steps=300, log_every=300, eval_every=300, progress=False)
    assert result.history[-1]["val_accuracy"] > 0.9


def test_bad_recurrent_input_is_named():
    model = models.get_model("gru", num_classes=3, hidden=4)
    params, _ = models.init_model(model, jax.random.PRNGKey(0), (5, 2))
    with pytest.raises(ValueError, match=r"RecurrentClassifier: x: expected sequences \(batch, time, features\) or "
                                         r"images .*, got shape \(4, 2\)"):
        model.apply({"params": params}, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"RecurrentClassifier: lengths: expected shape \(4,\) \(one per sequence\), "
                                         r"got \(3,\)"):
        model.apply({"params": params}, jnp.zeros((4, 5, 2)), lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"RecurrentClassifier: lengths: expected lengths in \[1, 5\] \(the time "
                                         r"steps\), got \[1, 0, 5, 6\]"):
        model.apply({"params": params}, jnp.zeros((4, 5, 2)), lengths=jnp.array([1, 0, 5, 6]))
    with pytest.raises(ValueError, match=r"RecurrentClassifier: cell: expected one of \['elman', 'lstm', 'gru'\], "
                                         r"got 'rnn'"):
        models.get_model("recurrent", num_classes=3, cell="rnn")
    with pytest.raises(TypeError, match=r"get_model\('lstm'\): keyword argument\(s\) \['cell'\] are fixed"):
        models.get_model("lstm", num_classes=3, cell="gru")
