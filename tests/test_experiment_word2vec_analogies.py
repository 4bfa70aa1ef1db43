"""word2vec_analogies at smoke size: the recorded accuracies recomputed by brute force from vectors trained again
with the same options (a loop over the vocabulary in numpy, no shared scoring code), the neighbour rule on hand-made
vectors, and a user corpus file and analogy file read in place of the generated ones."""

import numpy as np
import pytest

pytestmark = pytest.mark.experiment


def _brute_force_accuracy(vectors, questions):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    right = 0
    for a, b, c, d in questions:
        best, best_score = None, -np.inf
        for word in range(len(unit)):
            if word in (a, b, c):
                continue
            score = unit[word] @ (unit[b] - unit[a] + unit[c])
            if score > best_score:
                best, best_score = word, score
        right += best == d
    return right / len(questions)


def test_word2vec_analogies_smoke_against_brute_force(tmp_path):
    from jaxnn.experiments import run_experiment, word2vec_analogies as experiment
    from jaxnn.train import Word2VecOptions, train_word2vec

    record = run_experiment("word2vec_analogies", smoke=True, out_dir=tmp_path, progress=False)
    config = record["setting"]
    ids, vocabulary, questions, skipped = experiment.corpus_and_questions(config)
    assert skipped == 0 and record["measured"]["corpus_tokens"] == len(ids)
    every = np.concatenate(list(questions.values()))
    run = record["measured"]["by_negatives"]["5"][0]
    options = Word2VecOptions(dim=config["dim"], window=config["window"], negatives=5, subsample=config["subsample"],
                              batch_size=config["batch_size"], epochs=config["epochs"],
                              learning_rate=config["learning_rate"], seed=run["seed"])
    again = train_word2vec(ids, len(vocabulary), options, progress=False)
    assert run["by_epoch"][-1]["accuracy"] == pytest.approx(_brute_force_accuracy(again.embeddings, every))
    assert (tmp_path / "word2vec_analogies.png").stat().st_size > 0

    vectors = np.array([[1.0, 0], [0.9, 0.1], [0, 1], [-1, 0]])
    assert experiment.neighbour_hits(vectors, np.array([[0, 1], [0, 3], [2, 1]]), 1) == pytest.approx(2 / 3)

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the king and the queen . the man and the woman .\n")
    analogies = tmp_path / "questions-words.txt"
    analogies.write_text(": gender\nking queen man woman\nking queen boy girl\n")
    ids, vocabulary, questions, skipped = experiment.corpus_and_questions(
        {**config, "corpus": str(corpus), "analogies": str(analogies)})
    assert len(ids) == 12 and skipped == 1 and questions["gender"].tolist() == [
        [vocabulary.ids[w] for w in ("king", "queen", "man", "woman")]]
