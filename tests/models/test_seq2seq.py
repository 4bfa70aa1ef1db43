"""The encoder–decoder with attention against a numpy forward pass, its causality and padding, and its decoding:
beam search against an exhaustive search, beam size 1 against greedy decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import data, models
from jaxnn.data import sequences
from jaxnn.train import create_train_state, fit


def _model_and_params(dtype=jnp.float64, **fields):
    fields = {"num_classes": 7, "cell": "elman", "embed_dim": 3, "hidden": 4, **fields}
    model = models.Seq2Seq(**fields, param_dtype=dtype)
    params, _ = models.init_model(model, jax.random.key(1), (2, 5))
    # non-zero biases, so a wrong bias path shows
    params = jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)
    return model, params


def _numpy_forward(p, x, attention):
    """The module docstring's equations for the Elman cell, one example at a time, in float64 numpy."""
    p = jax.tree.map(np.asarray, p)
    out = []
    for source, decoder_input in np.asarray(x):
        n = int(np.sum(source != 0))
        h, encoded = np.zeros(4), []
        for token in source[:n]:
            e = p["embed_source"]["embedding"][token]
            h = np.tanh(e @ p["encoder"]["i"]["kernel"] + p["encoder"]["i"]["bias"] + h @ p["encoder"]["h"]["kernel"])
            encoded.append(h)
        encoded = np.array(encoded)
        rows = []
        for token in decoder_input:
            e = p["embed_target"]["embedding"][token]
            h = np.tanh(e @ p["decoder"]["i"]["kernel"] + p["decoder"]["i"]["bias"] + h @ p["decoder"]["h"]["kernel"])
            if attention is None:
                top = h
            else:
                if attention == "dot":
                    scores = encoded @ h
                elif attention == "general":
                    scores = encoded @ (h @ p["score"]["kernel"])
                else:
                    scores = np.array([np.tanh(h @ p["score_query"]["kernel"] + s @ p["score_key"]["kernel"])
                                       @ p["score"]["kernel"][:, 0] for s in encoded])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                context = weights @ encoded
                top = np.tanh(np.concatenate([context, h]) @ p["combine"]["kernel"] + p["combine"]["bias"])
            rows.append(top @ p["head"]["kernel"] + p["head"]["bias"])
        out.append(rows)
    return np.array(out)


def _batch():
    # sources of lengths 5, 2 and 1 (padding 0 after their end), decoder inputs starting with <bos> = 1
    return np.array([[[3, 4, 5, 6, 3], [1, 3, 4, 5, 6]],
                     [[6, 5, 0, 0, 0], [1, 5, 6, 2, 0]],
                     [[4, 0, 0, 0, 0], [1, 4, 2, 0, 0]]], np.int32)


@pytest.mark.parametrize("attention", ["dot", "general", "additive", None])
def test_logits_equal_the_equations_in_numpy(attention, x64):
    model, params = _model_and_params(attention=attention)
    logits = model.apply({"params": params}, _batch())
    assert logits.shape == (3, 5, 7)
    np.testing.assert_allclose(logits, _numpy_forward(params, _batch(), attention), rtol=1e-12, atol=1e-12)


def test_a_position_sees_no_later_decoder_input_and_the_padding_is_ignored(x64):
    model, params = _model_and_params(cell="lstm", attention="general")
    x = _batch()
    logits = model.apply({"params": params}, x)
    later = x.copy()
    later[:, 1, 3:] = 6  # change the decoder input from position 3 on
    changed = model.apply({"params": params}, later)
    np.testing.assert_array_equal(logits[:, :3], changed[:, :3])
    assert np.abs(logits[:, 3:] - changed[:, 3:]).max() > 1e-6
    wider = np.zeros((3, 2, 8), np.int32)  # the same sources and decoder inputs padded to 8
    wider[:, :, :5] = x
    np.testing.assert_allclose(model.apply({"params": params}, wider)[:, :5], logits, rtol=1e-12, atol=1e-12)
    _, sown = model.apply({"params": params}, x, mutable=["intermediates"])
    weights = np.asarray(sown["intermediates"]["attention"][0])
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-12)
    assert np.all(weights[1, :, 2:] == 0) and np.all(weights[2, :, 1:] == 0)  # padded source positions


def test_beam_search_is_an_exhaustive_search_when_the_beam_holds_every_prefix(x64):
    # 5 tokens (pad, bos, eos and two symbols), answers of 3 positions: 5² = 25 hypotheses hold every 2-token prefix
    model, params = _model_and_params(num_classes=5, hidden=6)
    source = np.array([[3, 4, 3], [4, 0, 0], [3, 3, 0]], np.int32)
    answers, log_probs = models.beam_search(model, params, source, beam_size=25)
    candidates = []
    for tokens in itertools.product(range(5), repeat=3):
        ended = False
        for token in tokens:  # after <eos> only <pad>
            if ended and token != 0:
                break
            ended = ended or token == 2
        else:
            candidates.append(tokens)
    candidates = np.array(candidates, np.int32)
    for row in range(3):
        x = np.repeat(source[row:row + 1], len(candidates), 0)
        scores = np.asarray(models.sequence_log_prob(model, params, x, candidates))
        # a continuation after <eos> is free only through <pad>: score the others as impossible
        free = np.array([all(t == 0 for t in c[list(c).index(2) + 1:]) if 2 in c else True for c in candidates])
        best = candidates[np.argmax(np.where(free, scores, -np.inf))]
        np.testing.assert_array_equal(answers[row], best)
        np.testing.assert_allclose(log_probs[row], np.max(np.where(free, scores, -np.inf)), rtol=1e-12)
    assert not np.array_equal(answers, models.greedy_decode(model, params, source)), \
        "greedy decoding finds the same answers: this model does not exercise the search"


def test_beam_of_one_is_greedy_and_its_log_prob_is_the_teacher_forced_one(x64):
    model, params = _model_and_params(cell="gru", num_classes=7)
    x = _batch()
    greedy = models.greedy_decode(model, params, x)
    answers, log_probs = models.beam_search(model, params, x, beam_size=1)
    np.testing.assert_array_equal(answers, greedy)
    np.testing.assert_allclose(log_probs, models.sequence_log_prob(model, params, x, answers), rtol=1e-12)
    for row in np.asarray(greedy):  # <pad> after the first <eos>
        if 2 in row:
            assert np.all(row[list(row).index(2) + 1:] == 0)


def test_sequence_accuracy_scores_whole_answers():
    labels = np.array([[5, 6, 2, -1], [7, 2, -1, -1]])
    assert models.sequence_accuracy([[5, 6, 2, 0], [7, 2, 0, 0]], labels) == 1.0
    assert models.sequence_accuracy([[5, 6, 2, 9], [7, 9, 2, 0]], labels) == 0.5  # the second ends late
    assert models.sequence_accuracy([[5, 2, 0, 0], [7, 2, 0, 0]], labels) == 0.5  # the first ends early
    with pytest.raises(ValueError, match="sequence_accuracy: answers: expected the labels' shape"):
        models.sequence_accuracy([[5, 6]], labels)


def test_bad_input_is_named(x64):
    model, params = _model_and_params()
    with pytest.raises(ValueError, match=r"Seq2Seq: x: expected token ids of shape \(batch, 2, length\)"):
        model.apply({"params": params}, np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match=r"greedy_decode: source: expected token ids in \[0, 7\)"):
        models.greedy_decode(model, params, np.array([[3, 9, 0]]))
    with pytest.raises(ValueError, match="greedy_decode: source: expected integer token ids"):
        models.greedy_decode(model, params, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Seq2Seq: attention: expected one of"):
        models.Seq2Seq(num_classes=7, attention="luong")
    with pytest.raises(ValueError, match="Seq2Seq: eos_id: expected at most 6"):
        models.Seq2Seq(num_classes=7, eos_id=7)
    assert (models.Seq2Seq(7).pad_id, models.Seq2Seq(7).bos_id, models.Seq2Seq(7).eos_id) == (
        sequences.PAD, sequences.BOS, sequences.EOS)


def test_fit_learns_to_reverse_and_greedy_decoding_answers_held_out_strings():
    dataset = data.load_dataset("seq2seq", problem="reverse", num_examples=3000, length=5, alphabet=6,
                                val_fraction=0.0, test_fraction=0.1)
    assert set(map(bytes, dataset.test.x[:, 0])).isdisjoint(map(bytes, dataset.train.x[:, 0]))
    model = models.get_model("seq2seq", num_classes=dataset.num_classes, hidden=32, embed_dim=16)
    state = create_train_state(model, optax.adam(1e-2), dataset.input_shape, jax.random.key(0))
    untrained = models.sequence_accuracy(models.greedy_decode(model, state.params, dataset.test.x), dataset.test.y)
    result = fit(state, dataset, loss="sequence_cross_entropy", batch_size=64, num_steps=400, progress=False)
    trained = models.greedy_decode(model, result.state.params, dataset.test.x)
    accuracy = models.sequence_accuracy(trained, dataset.test.y)
    assert untrained < 0.05 and accuracy > 0.9, (untrained, accuracy)
    right = int(np.flatnonzero(np.all((np.asarray(trained) == dataset.test.y) | (dataset.test.y < 0), axis=1))[0])
    assert sequences.decode(trained[right]) == sequences.decode(dataset.test.x[right, 0])[::-1]


def test_shipped_config_trains_and_reports_the_decoded_accuracy(tmp_path):
    from jaxnn import config as config_lib
    from jaxnn.train import load_run, train_run

    cfg = config_lib.load_config("seq2seq_reverse", overrides=[
        "data.kwargs.num_examples=1500", "data.kwargs.length=4", "train.epochs=1", "model.kwargs.hidden=16",
        "checkpoint.every_steps=1000", "train.log_every=10"])
    summary, _ = train_run(cfg, run_dir=tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    answers = models.greedy_decode(loaded.model, loaded.state.params, loaded.dataset.test.x)
    assert summary["final"]["test_sequence_accuracy"] == models.sequence_accuracy(answers, loaded.dataset.test.y)
    # an exact answer has every teacher-forced token right, so it cannot beat the token accuracy
    assert 0 <= summary["final"]["test_sequence_accuracy"] <= summary["final"]["test_accuracy"]
    dataset = loaded.dataset
    state = create_train_state(loaded.model, optax.adam(1e-3), dataset.input_shape, jax.random.key(0))
    with pytest.raises(ValueError, match="sequence labels .* need loss 'sequence_cross_entropy'"):
        fit(state, dataset, loss="softmax_cross_entropy", batch_size=8, num_steps=1, progress=False)


def test_fit_checks_each_row_against_its_own_vocabulary():
    # a source vocabulary of 5 under an answer vocabulary of 10: source id 7 is out of range though 7 < 10
    x = np.array([[[3, 7, 0], [1, 4, 2]]] * 4, np.int32)
    split = data.Split(x, np.array([[4, 2, -1]] * 4, np.int32))
    dataset = data.Dataset("s", split, split, split, 10, (2, 3), "classification", {})
    model = models.Seq2Seq(num_classes=10, vocab_size=5)
    state = create_train_state(model, optax.adam(1e-3), dataset.input_shape, jax.random.key(0))
    with pytest.raises(ValueError, match=r"token ids out of range in the train split \(row 0 of each example\): "
                                         r"found ids in \[0, 7\], the model reads 5 tokens there"):
        fit(state, dataset, loss="sequence_cross_entropy", batch_size=4, num_steps=1, progress=False)
