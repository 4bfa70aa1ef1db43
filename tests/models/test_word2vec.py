"""word2vec: the skip-gram scores, loss and gradient against closed forms, subsampling, windows and noise draws
against their definitions, analogies and neighbours on hand-made vectors, and the planted relations of the
generated language learned from scratch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import models
from jaxnn.data import language, text
from jaxnn.train import Word2VecOptions, train_word2vec
from jaxnn.train import word2vec as w2v


def test_scores_loss_and_gradient_against_closed_forms(x64):
    model = models.SkipGram(vocab_size=6, dim=3, param_dtype=jnp.float64)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = {"words": {"embedding": jax.random.normal(jax.random.key(1), (6, 3))},
              "contexts": {"embedding": jax.random.normal(jax.random.key(2), (6, 3))}}
    batch = jnp.array([[0, 1, 2, 3], [4, 5, 5, 0]])
    v, u = np.asarray(params["words"]["embedding"]), np.asarray(params["contexts"]["embedding"])
    scores = model.apply({"params": params}, batch)
    np.testing.assert_allclose(scores, [[v[0] @ u[j] for j in (1, 2, 3)], [v[4] @ u[j] for j in (5, 5, 0)]],
                               rtol=1e-12)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    s = np.asarray(scores)
    expected = -np.log(sigmoid(s[:, 0])) - np.log(sigmoid(-s[:, 1:])).sum(1)
    np.testing.assert_allclose(models.negative_sampling_loss(scores), expected, rtol=1e-12)
    # d loss_0 / d v_0 = −(1 − σ(s_0)) u_1 + Σ_k σ(s_k) u_k
    grads = jax.grad(lambda p: models.negative_sampling_loss(model.apply({"params": p}, batch[:1]))[0])(params)
    closed = -(1 - sigmoid(s[0, 0])) * u[1] + sigmoid(s[0, 1]) * u[2] + sigmoid(s[0, 2]) * u[3]
    np.testing.assert_allclose(grads["words"]["embedding"][0], closed, rtol=1e-12)
    fresh = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert np.all(fresh["contexts"]["embedding"] == 0) and np.abs(fresh["words"]["embedding"]).max() <= 0.5 / 3


def test_subsampling_windows_and_noise_follow_their_definitions():
    counts = np.array([900, 90, 9, 1, 0])
    keep = w2v.keep_probabilities(counts, 1e-2)
    share = counts[:4] / 1000
    np.testing.assert_allclose(keep[:4], np.minimum(1, (np.sqrt(share / 1e-2) + 1) * 1e-2 / share))
    assert keep[4] == 1 and np.all(w2v.keep_probabilities(counts, 0.0) == 1)
    rng = np.random.default_rng(0)
    stream = rng.choice(4, size=200_000, p=counts[:4] / 1000)
    kept_pairs = w2v.skipgram_pairs(stream, keep, 1, np.random.default_rng(1))
    observed = np.bincount(kept_pairs[:, 0], minlength=4) / np.bincount(stream, minlength=4)
    assert abs(observed[0] / 2 - keep[0]) < 0.01  # a kept token pairs with both neighbours: 2 pairs per token
    ids = np.arange(200_000) % 1000  # distinct neighbours: the distance of a pair is readable
    pairs = w2v.skipgram_pairs(ids, np.ones(1000), 3, np.random.default_rng(2))
    distance = np.abs((pairs[:, 1] - pairs[:, 0] + 500) % 1000 - 500)
    frequency = np.bincount(distance, minlength=4)[1:] / len(ids) / 2
    np.testing.assert_allclose(frequency, [1, 2 / 3, 1 / 3], atol=0.01)  # radius r ~ U{1..3}: P(r ≥ d)
    cdf = w2v.noise_cdf(counts, 0.75)
    draws = np.asarray(w2v.draw_noise(jax.random.key(3), cdf, (400_000,)))
    expected = counts ** 0.75 / (counts ** 0.75).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), expected, atol=0.003)
    assert not np.any(draws == 4)


def test_analogies_and_neighbours_on_hand_made_vectors():
    # 0 man, 1 woman, 2 king, 3 queen, 4 apple: king − man + woman = queen exactly
    vectors = np.array([[1.0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1], [-1, -1, 0.2]])
    questions = np.array([[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2]])
    np.testing.assert_array_equal(models.analogy_predictions(vectors, questions), [3, 1, 2])
    assert models.analogy_accuracy(vectors, questions) == 1.0
    assert models.analogy_accuracy(vectors, [[0, 1, 2, 4]]) == 0.0
    # restricted to the first 3 ids, the answer 3 is out of reach
    assert models.analogy_predictions(vectors, [[0, 1, 2, 3]], restrict=3)[0] != 3
    ids, cosines = models.nearest_neighbours(vectors, [2], k=2)
    assert set(ids[0]) == {0, 3} and cosines[0, 0] == pytest.approx(1 / np.sqrt(2))


def test_reading_analogy_files_skips_unknown_words(tmp_path):
    vocabulary = text.Vocabulary(["king", "queen", "man", "woman"])
    questions, skipped = text.read_analogies(": royal\nKing Queen Man Woman\nking queen man girl\n", vocabulary)
    np.testing.assert_array_equal(questions["royal"], [[2, 3, 4, 5]])
    assert skipped == 1
    (tmp_path / "q.txt").write_text("king queen man woman\n")
    with pytest.raises(ValueError, match="analogy line 1: expected four words after a ': section' line"):
        text.read_analogies(tmp_path / "q.txt", vocabulary)
    with pytest.raises(FileNotFoundError, match="analogy file .*none.txt does not exist"):
        text.read_analogies(tmp_path / "none.txt", vocabulary)


def test_the_planted_relations_are_learned_from_scratch():
    tokens = text.tokenize(" ".join(language.generate_sentences(30000, seed=1)), "word")
    vocabulary = text.Vocabulary.build(tokens)
    ids = vocabulary.encode(tokens)
    questions, skipped = text.read_analogies(language.analogies_text(), vocabulary)
    assert skipped == 0
    options = Word2VecOptions(dim=32, epochs=1, seed=1, learning_rate=0.03, batch_size=1024)
    untrained = models.SkipGram(len(vocabulary), 32).init(jax.random.key(1), jnp.zeros((1, 7), jnp.int32))
    result = train_word2vec(ids, len(vocabulary), options, progress=False)
    assert result.losses[-1] < 0.7 * 6 * np.log(2)  # at the start (zero output vectors) every pair costs 6·log 2
    for section in ("gender", "capital-country", "country-language"):
        before = models.analogy_accuracy(untrained["params"]["words"]["embedding"], questions[section])
        after = models.analogy_accuracy(result.embeddings, questions[section])
        assert before < 0.2 and after > 0.9, (section, before, after)
    neighbours, _ = models.nearest_neighbours(result.embeddings, [vocabulary.ids["paris"]], k=3)
    assert {vocabulary.tokens[i] for i in neighbours[0]} & {"france", "french"}


def test_bad_word2vec_input_is_named():
    with pytest.raises(ValueError, match=r"train_word2vec: ids: expected token ids in \[0, 3\), got ids in \[0, 5\]"):
        train_word2vec(np.array([0, 5, 1]), 3, progress=False)
    with pytest.raises(ValueError, match="train_word2vec: ids: expected a 1-D integer token stream"):
        train_word2vec(np.zeros((2, 3), np.int32), 3, progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size=512"):
        train_word2vec(np.array([0, 1, 2, 1]), 3, progress=False)
    with pytest.raises(ValueError, match="Word2VecOptions: window: expected an integer >= 1, got 0"):
        Word2VecOptions(window=0)
    with pytest.raises(ValueError, match=r"SkipGram: x: expected ids of shape \(batch, 2 \+ negatives\)"):
        models.SkipGram(5, 2).init(jax.random.key(0), jnp.zeros((3,), jnp.int32))
