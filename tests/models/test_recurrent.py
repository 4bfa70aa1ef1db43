"""Recurrent classifiers: the scanned Elman RNN, LSTM and GRU against the cell equations written out in numpy and
unrolled step by step (float64), variable lengths against the unpadded sequences, the Hessian through the scan
against a dense eigendecomposition, training on the digits read row by row, and bad input named."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import models
from jaxnn import data as data_lib
from jaxnn.train import create_train_state, fit


def _sigmoid(a, xp=np):
    return 1.0 / (1.0 + xp.exp(-a))


def _step(cell, p, x, carry, xp=np):
    """One step of the cell from its equations (the module docstring), on numpy parameters (``xp=jnp``: on jax
    arrays, to differentiate)."""
    def lin(name, v):
        out = v @ p[name]["kernel"]
        return out + p[name]["bias"] if "bias" in p[name] else out

    if cell == "elman":
        h = xp.tanh(lin("i", x) + lin("h", carry))
        return h, h
    if cell == "lstm":
        c, h = carry
        i = _sigmoid(lin("ii", x) + lin("hi", h), xp)
        f = _sigmoid(lin("if", x) + lin("hf", h), xp)
        g = xp.tanh(lin("ig", x) + lin("hg", h))
        o = _sigmoid(lin("io", x) + lin("ho", h), xp)
        c = f * c + i * g
        h = o * xp.tanh(c)
        return (c, h), h
    r = _sigmoid(lin("ir", x) + lin("hr", carry), xp)
    z = _sigmoid(lin("iz", x) + lin("hz", carry), xp)
    n = xp.tanh(lin("in", x) + r * lin("hn", carry))
    h = (1.0 - z) * n + z * carry
    return h, h


def _unrolled_logits(cell, params, x, lengths, layers, xp=np, truncation=None):
    """Each sequence alone, a Python loop over its valid steps, layer after layer, then the head. ``xp=jnp``: in
    jax.numpy, to differentiate; ``truncation``: the state entering steps L − truncation, L − 2·truncation, ...
    (L the sequence's length) passes through stop_gradient (truncated BPTT written out from each sequence's end)."""
    if xp is np:
        params = jax.tree.map(np.asarray, params)
    names = sorted(k for k in params if k != "head")
    logits = []
    for sequence, length in zip(x, lengths):
        h_seq = sequence[:length]
        for layer in range(layers):
            p = params[names[layer]]
            hidden = p[next(iter(p))]["kernel"].shape[1]
            carry = (xp.zeros(hidden), xp.zeros(hidden)) if cell == "lstm" else xp.zeros(hidden)
            outputs = []
            for t, x_t in enumerate(h_seq):
                if truncation is not None and t > 0 and (length - t) % truncation == 0:
                    carry = jax.tree.map(jax.lax.stop_gradient, carry)
                carry, out = _step(cell, p, x_t, carry, xp)
                outputs.append(out)
            h_seq = xp.stack(outputs)
        logits.append(h_seq[-1] @ params["head"]["kernel"] + params["head"]["bias"])
    return xp.stack(logits)


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


def _truncated_loss(cell, params, x, lengths, layers, truncation):
    """Sum of squared logits of the unrolled loop in jax.numpy, with the gradient cut every ``truncation`` steps."""
    return jnp.sum(_unrolled_logits(cell, params, x, lengths, layers, jnp, truncation) ** 2)


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_truncated_bptt_equals_the_unrolled_loop_with_the_gradient_cut_every_k_steps(cell, x64):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 7, 4)))
    lengths = np.array([7, 5, 4])  # cuts before steps 1 and 4, 2, 1
    full = models.get_model("recurrent", num_classes=3, cell=cell, hidden=5, num_layers=2)
    cut = models.get_model("recurrent", num_classes=3, cell=cell, hidden=5, num_layers=2, truncation=3)
    params, _ = models.init_model(full, jax.random.PRNGKey(0), (7, 4))
    cut_params, _ = models.init_model(cut, jax.random.PRNGKey(0), (7, 4))  # the same weights, names and draws
    jax.tree.map(np.testing.assert_array_equal, cut_params, params)

    def loss(model):
        return lambda p: jnp.sum(model.apply({"params": p}, x, lengths=jnp.asarray(lengths)) ** 2)

    # the forward pass is unchanged, to rounding
    np.testing.assert_allclose(loss(cut)(params), loss(full)(params), rtol=1e-13)
    grad_cut = jax.grad(loss(cut))(params)
    oracle = jax.grad(lambda p: _truncated_loss(cell, p, x, lengths, 2, 3))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), grad_cut, oracle)
    # the cut matters (sequence 0 and 1 run past 3 steps), and without it the loop gives the full gradient
    grad_full = jax.grad(loss(full))(params)
    assert not np.allclose(jax.flatten_util.ravel_pytree(grad_cut)[0], jax.flatten_util.ravel_pytree(grad_full)[0])
    no_cut = jax.grad(lambda p: _truncated_loss(cell, p, x, lengths, 2, None))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), grad_full, no_cut)


def test_padding_marked_by_pad_value_gives_each_sequence_its_own_length(x64):
    rng = np.random.default_rng(3)
    lengths = np.array([6, 3, 1])
    ids = rng.integers(1, 9, size=(3, 6))
    ids[np.arange(6)[None] >= lengths[:, None]] = 0
    ids[0, 2] = 0  # a pad id inside a sequence is data: the length stays 6
    tokens = models.get_model("lstm", num_classes=2, hidden=4, vocab_size=9, pad_value=0)
    params, _ = models.init_model(tokens, jax.random.PRNGKey(0), (6,))
    padded = np.asarray(tokens.apply({"params": params}, ids))
    np.testing.assert_array_equal(padded, np.asarray(tokens.apply({"params": params}, ids, lengths=lengths)))
    for row, length in enumerate(lengths):  # each sequence alone, unpadded
        alone = tokens.apply({"params": params}, ids[row:row + 1, :length])
        np.testing.assert_allclose(padded[row], np.asarray(alone)[0], rtol=1e-12)
    # features: a padded step has every feature equal to pad_value; a step with one feature equal to it is data
    x = rng.normal(size=(3, 6, 2))
    x[np.arange(6)[None] >= lengths[:, None]] = -1.0
    x[1, 1, 0] = -1.0
    features = models.get_model("gru", num_classes=2, hidden=4, pad_value=-1.0)
    params, _ = models.init_model(features, jax.random.PRNGKey(0), (6, 2))
    np.testing.assert_array_equal(np.asarray(features.apply({"params": params}, x)),
                                  np.asarray(features.apply({"params": params}, x, lengths=lengths)))


def test_fit_trains_on_padded_token_sequences_through_pad_value():
    """The class is the parity of a sequence's last token; sequences of 2 to 12 tokens padded with id 0 to 12.
    With pad_value the final state is the one after the last token: the LSTM learns it; reading the padding it
    must carry the answer across up to 10 pad steps."""
    rng = np.random.default_rng(4)
    n, width = 1200, 12
    lengths = rng.integers(2, width + 1, n)
    ids = rng.integers(1, 11, size=(n, width)).astype(np.int32)
    ids[np.arange(width)[None] >= lengths[:, None]] = 0
    y = (ids[np.arange(n), lengths - 1] % 2).astype(np.int32)
    train, val = data_lib.Split(ids[:1000], y[:1000]), data_lib.Split(ids[1000:], y[1000:])
    dataset = data_lib.Dataset("last_token_parity", train, val, val, 2, (width,), "classification", {})
    state = create_train_state(models.get_model("lstm", num_classes=2, hidden=16, vocab_size=11, pad_value=0),
                               optax.adam(1e-2), dataset.input_shape, jax.random.PRNGKey(0))
    result = fit(state, dataset, batch_size=50, num_steps=150, log_every=150, eval_every=150, progress=False)
    assert result.history[-1]["val_accuracy"] > 0.95


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
    for bad, error, words in [(float("nan"), ValueError, r"expected a finite number .*got nan"),
                              (True, TypeError, r"expected a number .*got True"),
                              ("0", TypeError, r"expected a number .*got '0'")]:
        with pytest.raises(error, match=r"RecurrentClassifier: pad_value: " + words):
            models.get_model("gru", num_classes=3, pad_value=bad)
    with pytest.raises(ValueError, match=r"RecurrentClassifier: pad_value: expected a token id in \[0, 5\) "
                                         r"\(vocab_size\), got 5"):
        models.get_model("gru", num_classes=3, vocab_size=5, pad_value=5)
    with pytest.raises(ValueError, match=r"RecurrentClassifier: embed_dim=8 needs vocab_size"):
        models.get_model("gru", num_classes=3, embed_dim=8)
    tokens = models.get_model("gru", num_classes=3, vocab_size=5, pad_value=np.int32(0))  # a numpy integer is an id
    token_params, _ = models.init_model(tokens, jax.random.PRNGKey(0), (4,))
    with pytest.raises(ValueError, match=r"RecurrentClassifier: x: expected token ids in \[0, 5\) \(vocab_size\), "
                                         r"got ids in \[0, 7\]"):
        tokens.apply({"params": token_params}, jnp.array([[0, 7, 1, 2]]))
    with pytest.raises(ValueError, match=r"RecurrentClassifier: x: expected token ids of shape \(batch, time\), got "
                                         r"shape \(1, 4, 2\)"):
        tokens.apply({"params": token_params}, jnp.zeros((1, 4, 2), jnp.int32))
