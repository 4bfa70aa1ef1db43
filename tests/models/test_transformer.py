"""Attention and Transformers: no gradient flows from future positions under the causal mask (the Jacobian is
exactly zero), self-attention without positions is permutation-equivariant, attention weights are distributions
(and zero on the future), sinusoidal positions against the formula, the Hessian through attention against a dense
eigendecomposition, training on the digits read row by row, and bad input named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import models
from jaxnn import data as data_lib
from jaxnn.models.transformer import _Encoder
from jaxnn.train import create_train_state, fit


def _encoder(causal, positions="learned"):
    return _Encoder(dim=8, depth=2, num_heads=2, mlp_dim=16, positions=positions, max_len=6, causal=causal,
                    dropout=0.0, vocab_size=None, param_dtype=None, owner="test")


def test_no_gradient_flows_from_future_positions(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 3))
    for causal in (True, False):
        encoder = _encoder(causal)
        variables = encoder.init(jax.random.PRNGKey(1), x)
        jacobian = np.asarray(jax.jacobian(lambda v: encoder.apply(variables, v))(x))[0, :, :, 0]  # (T, dim, T, F)
        by_position = np.abs(jacobian).max(axis=(1, 3))  # [t, s]: the largest |d out_t / d x_s|
        future = np.triu(np.ones((6, 6), bool), 1)  # s > t
        if causal:
            assert np.all(by_position[future] == 0.0)  # exactly
            assert by_position[~future].min() > 0
        else:
            assert by_position[future].min() > 1e-3

    lm = models.TransformerLM(vocab_size=11, dim=8, depth=1, num_heads=2, mlp_dim=16, max_len=6)
    tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
    variables = lm.init(jax.random.PRNGKey(0), tokens)
    changed = tokens.at[0, 4:].set(jnp.array([9, 10]))
    a, b = lm.apply(variables, tokens), lm.apply(variables, changed)
    np.testing.assert_array_equal(a[0, :4], b[0, :4])
    assert not np.allclose(a[0, 4:], b[0, 4:])


def test_self_attention_without_positions_is_permutation_equivariant(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3))
    order = np.array([3, 0, 5, 1, 4, 2])
    for positions, equivariant in ((None, True), ("learned", False)):
        encoder = _encoder(causal=False, positions=positions)
        variables = encoder.init(jax.random.PRNGKey(1), x)
        if positions == "learned":  # the table starts near zero: make it matter
            variables = {"params": {**variables["params"],
                                    "positions": jax.random.normal(jax.random.PRNGKey(2), (6, 8))}}
        permuted = np.asarray(encoder.apply(variables, x[:, order]))
        reference = np.asarray(encoder.apply(variables, x))[:, order]
        assert np.allclose(permuted, reference, rtol=1e-12, atol=1e-12) == equivariant


def test_attention_weights_are_distributions_and_zero_on_the_future(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3))
    for causal in (False, True):
        model = models.TransformerClassifier(num_classes=3, dim=8, depth=2, num_heads=2, mlp_dim=16, max_len=6,
                                             causal=causal)
        variables = model.init(jax.random.PRNGKey(1), x)
        _, state = model.apply(variables, x, sow_weights=True, mutable=["intermediates"])
        weights = [np.asarray(w) for w in jax.tree.leaves(state["intermediates"])]
        assert len(weights) == 2 and weights[0].shape == (2, 2, 6, 6)  # (batch, heads, query, key) per block
        for w in weights:
            np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-12)
            assert np.all(w >= 0)
            upper = np.triu(np.ones((6, 6), bool), 1)
            assert np.all(w[..., upper] == 0.0) if causal else w[..., upper].min() > 0


def test_sinusoidal_positions_against_the_formula():
    table = models.sinusoidal_positions(50, 6)
    for p in (0, 7, 49):
        for i in range(3):
            angle = p / 10000 ** (2 * i / 6)
            assert table[p, 2 * i] == pytest.approx(np.sin(angle), abs=1e-15)
            assert table[p, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-15)
    assert models.sinusoidal_positions(4, 5).shape == (4, 5)


def test_the_hessian_through_attention_against_a_dense_eigendecomposition(
        x64, assert_top_hessian_eigenvalues_match_dense):
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.normal(size=(8, 4, 3))), jnp.asarray(rng.integers(0, 3, 8), jnp.int32))
    model = models.get_model("transformer", num_classes=3, dim=4, depth=1, num_heads=2, mlp_dim=4, max_len=4,
                             positions="sinusoidal")
    assert_top_hessian_eigenvalues_match_dense(model, (4, 3), batch)


def test_a_transformer_learns_the_digits_read_row_by_row():
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("transformer", num_classes=10, dim=32, depth=1, num_heads=4, mlp_dim=64, max_len=8)
    state = create_train_state(model, optax.adam(3e-3), digits.input_shape, jax.random.PRNGKey(0))
    result = fit(state, digits, batch_size=64, num_steps=300, log_every=300, eval_every=300, progress=False)
    assert result.history[-1]["val_accuracy"] > 0.9


@pytest.mark.parametrize("causal", [False, True])
def test_a_padded_sequence_is_classified_as_it_is_alone(causal, x64):
    """pad_value: each sequence of a padded batch gets the logits of the same sequence alone and unpadded, no
    attention weight falls on the padding, and without pad_value the padding changes the answer."""
    rng = np.random.default_rng(0)
    lengths = np.array([6, 4, 1])
    ids = rng.integers(1, 9, size=(3, 6))
    ids[np.arange(6)[None] >= lengths[:, None]] = 0
    model = models.get_model("transformer", num_classes=3, dim=8, depth=2, num_heads=2, mlp_dim=16, max_len=6,
                             vocab_size=9, pad_value=0, causal=causal)
    params, _ = models.init_model(model, jax.random.PRNGKey(0), (6,))
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
    padded, state = model.apply({"params": params}, ids, sow_weights=True, mutable=["intermediates"])
    for row, length in enumerate(lengths):
        alone = model.apply({"params": params}, ids[row:row + 1, :length])
        np.testing.assert_allclose(np.asarray(padded)[row], np.asarray(alone)[0], rtol=1e-12, atol=1e-12)
    padding_keys = (np.arange(6)[None] >= lengths[:, None])[:, None, None, :]
    for weights in jax.tree.leaves(state["intermediates"]):  # (batch, heads, query, key)
        assert np.all(np.where(padding_keys, np.asarray(weights), 0.0) == 0.0)
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-12)
    plain = model.clone(pad_value=None)
    assert not np.allclose(np.asarray(plain.apply({"params": params}, ids))[1], np.asarray(padded)[1])
    with pytest.raises(ValueError, match=r"TransformerClassifier: pad_value: expected a token id in \[0, 9\) "
                                         r"\(vocab_size\), got 9"):
        models.get_model("transformer", num_classes=3, vocab_size=9, pad_value=9)


def test_bad_transformer_input_is_named():
    model = models.get_model("transformer", num_classes=3, dim=8, num_heads=2, max_len=4)
    with pytest.raises(ValueError, match=r"TransformerClassifier: x: expected sequences of at most max_len=4 steps "
                                         r"\(the positional table\), got 5"):
        models.init_model(model, jax.random.PRNGKey(0), (5, 3))
    with pytest.raises(ValueError, match="TransformerClassifier: num_heads: expected a divisor of dim=8, got 3"):
        models.get_model("transformer", num_classes=3, dim=8, num_heads=3)
    lm = models.TransformerLM(vocab_size=5, dim=8, num_heads=2)
    with pytest.raises(ValueError, match=r"TransformerLM: x: expected token ids of shape \(batch, time\), got shape "
                                         r"\(1, 3, 2\)"):
        lm.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"TransformerLM: x: expected token ids in \[0, 5\) \(vocab_size\), got ids "
                                         r"in \[0, 7\]"):
        lm.init(jax.random.PRNGKey(0), jnp.array([[0, 7, 1]]))


def test_the_registry_language_model_takes_the_tokens_as_its_vocabulary_and_refuses_other_ids():
    lm = models.get_model("transformer_lm", num_classes=29, dim=8, num_heads=2, max_len=8)
    assert lm == models.TransformerLM(vocab_size=29, dim=8, num_heads=2, max_len=8)
    assert "vocab_size" not in models.MODELS["transformer_lm"].accepted_kwargs()
    dataset = data_lib.load_dataset("text", num_sentences=300, context=8)
    state = create_train_state(models.get_model("transformer_lm", num_classes=20, dim=8, num_heads=2, max_len=8),
                               optax.adam(1e-3), dataset.input_shape, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"token ids out of range in the train split: found ids in \[\d+, 2\d\], the "
                                         r"model reads 20 tokens"):
        fit(state, dataset, loss="sequence_cross_entropy", batch_size=8, num_steps=1, progress=False)


def test_char_transformer_config_beats_the_bigram_baseline(tmp_path):
    from jaxnn import config as config_lib
    from jaxnn.train import train_run

    cfg = config_lib.load_config("char_transformer", overrides=[
        "data.kwargs.num_sentences=1500", "data.kwargs.context=32", "model.kwargs.max_len=32",
        "model.kwargs.dim=32", "model.kwargs.mlp_dim=64", "train.epochs=6", "checkpoint.every_steps=1000"])
    summary, _ = train_run(cfg, run_dir=tmp_path / "run")
    final = summary["final"]
    assert final["test_perplexity"] == pytest.approx(np.exp(final["test_loss"]), rel=1e-9)
    assert final["test_bigram_perplexity"] < final["test_unigram_perplexity"]
    # the bigram model (~6.8 per character on this language) is beaten by a small 2-layer model after ~380 steps
    assert final["test_perplexity"] < 0.8 * final["test_bigram_perplexity"], final
