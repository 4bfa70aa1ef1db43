"""Text data: tokens, the vocabulary file, corpus folders, language-model windows, padded and bucketed batches and the
n-gram baselines (against hand counts), and the generated language's planted relations."""

import math

import numpy as np
import pytest

from jaxnn import data
from jaxnn.data import language, text


def test_tokens_and_vocabulary_round_trip_through_its_file(tmp_path):
    assert text.tokenize("ab c\n", "char") == ["a", "b", " ", "c", "\n"]
    assert text.tokenize(" the  king\nrules ", "word") == ["the", "king", "rules"]
    vocabulary = text.Vocabulary.build(text.tokenize("abca b\n", "char"))
    assert vocabulary.tokens == ["<pad>", "<unk>", "a", "b", "c", " ", "\n"]  # by count, ties first seen
    vocabulary.save(tmp_path / "vocab.txt")
    again = text.Vocabulary.load(tmp_path / "vocab.txt")
    assert again.tokens == vocabulary.tokens
    np.testing.assert_array_equal(again.encode("cz\n"), [4, text.UNK, 6])
    assert again.decode(again.encode("b a")) == "b a"
    with pytest.raises(ValueError, match=r"Vocabulary.encode: expected tokens of the vocabulary \(7 tokens\), got "
                                         r"\['z'\]"):
        again.encode("cz", strict=True)
    with pytest.raises(ValueError, match=r"Vocabulary.decode: expected ids in \[0, 7\), got 9"):
        again.decode([2, 9])
    assert text.Vocabulary.build("aaabbc", max_size=2).tokens == ["<pad>", "<unk>", "a", "b"]
    with pytest.raises(ValueError, match=r"expected each token once, got \['x'\]"):
        text.Vocabulary(["x", "y", "x"])
    with pytest.raises(FileNotFoundError, match="vocabulary file .*missing.txt does not exist"):
        text.Vocabulary.load(tmp_path / "missing.txt")


def test_corpus_folder_problems_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus folder .*nowhere does not exist"):
        text.read_corpus(tmp_path / "nowhere")
    (tmp_path / "train.txt").write_text("hello world\n")
    with pytest.raises(FileNotFoundError, match=r"corpus folder .* lacks test.txt \(a corpus folder holds train.txt, "
                                                r"test.txt\)"):
        text.read_corpus(tmp_path)
    (tmp_path / "test.txt").write_text("  \n")
    with pytest.raises(ValueError, match="corpus file .*test.txt is empty"):
        data.load_dataset("text", corpus="folder", data_dir=str(tmp_path))
    (tmp_path / "test.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="corpus file .*test.txt is not UTF-8 text"):
        text.read_corpus(tmp_path)


def test_folder_corpus_windows_vocabulary_file_and_official_test(tmp_path):
    (tmp_path / "train.txt").write_text("abcabcabcab" * 3)
    (tmp_path / "test.txt").write_text("cbacbacba")
    text.Vocabulary(["<pad>", "<unk>", "c", "b", "a"]).save(tmp_path / "vocab.txt")
    dataset = data.load_dataset("text", corpus="folder", data_dir=str(tmp_path), context=4, val_fraction=0.0)
    assert dataset.info["vocabulary_source"].endswith("vocab.txt") and dataset.num_classes == 5
    assert len(dataset.test) == 2 and dataset.sequence_labels  # (9 − 1) // 4 windows of the official test text
    np.testing.assert_array_equal(dataset.test.x, [[2, 3, 4, 2], [3, 4, 2, 3]])  # c b a c | b a c b
    np.testing.assert_array_equal(dataset.test.y, [[3, 4, 2, 3], [4, 2, 3, 4]])  # shifted by one
    x, y = text.windows(np.arange(10), 3)
    np.testing.assert_array_equal(x, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(y, x + 1)
    with pytest.raises(ValueError, match="windows: expected a text of more than context=9 tokens, got 9"):
        text.windows(np.arange(9), 9)


def test_padded_and_bucketed_batches():
    sequences = [[5] * n for n in (1, 2, 3, 4, 5, 6, 7, 8, 2, 3)]
    ids, lengths = text.pad_sequences(sequences[:3])
    np.testing.assert_array_equal(ids, [[5, 0, 0], [5, 5, 0], [5, 5, 5]])
    np.testing.assert_array_equal(lengths, [1, 2, 3])
    with pytest.raises(ValueError, match=r"pad_sequences: length: expected at least the longest sequence \(3\)"):
        text.pad_sequences(sequences[:3], length=2)
    labels = list(range(10))
    seen = []
    for x, y, batch_lengths in text.bucketed_batches(sequences, labels, 3, [2, 4, 8], seed=1):
        width = x.shape[1]
        assert width in (2, 4, 8) and len(x) <= 3
        assert all({2: 0, 4: 2, 8: 4}[width] < n <= width for n in batch_lengths)  # one bucket per batch
        np.testing.assert_array_equal((x != 0).sum(1), batch_lengths)
        seen.extend(y.tolist())
    assert sorted(seen) == labels  # every sequence once
    per_position = [[1] * n for n in (1, 2, 3)]
    (x, y, _), = text.bucketed_batches(sequences[:3], per_position, 8, [3], shuffle=False)
    np.testing.assert_array_equal(y, [[1, -1, -1], [1, 1, -1], [1, 1, 1]])
    with pytest.raises(ValueError, match="bucketed_batches: sequence 7 has 8 tokens, more than the last boundary 4"):
        next(text.bucketed_batches(sequences, None, 2, [2, 4]))


def test_ngram_perplexities_against_hand_counts():
    # train: predict y from x over 3 tokens; test: the pairs (0 -> 1), (1 -> 2)
    train = data.Split(np.array([[0, 1, 0, 1]], np.int32), np.array([[1, 0, 1, 2]], np.int32))
    test = data.Split(np.array([[0, 1]], np.int32), np.array([[1, 2]], np.int32))
    result = text.ngram_perplexities(train, test, 3, smoothing=1.0)
    unigram = {0: (1 + 1) / 7, 1: (2 + 1) / 7, 2: (1 + 1) / 7}  # counts 1, 2, 1 plus one each, over 4 + 3
    bigram_01 = (2 + 1) / (2 + 3)  # after 0: y = 1 twice
    bigram_12 = (1 + 1) / (2 + 3)  # after 1: y = 0 once, 2 once
    assert result["unigram"] == pytest.approx(math.exp(-(math.log(unigram[1]) + math.log(unigram[2])) / 2))
    assert result["bigram"] == pytest.approx(math.exp(-(math.log(bigram_01) + math.log(bigram_12)) / 2))


def test_generated_language_holds_every_planted_word():
    sentences = language.generate_sentences(3000, seed=0)
    assert language.generate_sentences(3000, seed=0) == sentences
    words = set(" ".join(sentences).split())
    relations = language.analogies()
    assert set(relations) == {"gender", "plural", "capital-country", "country-language"}
    assert {word for rows in relations.values() for row in rows for word in row} <= words
    assert ("king", "queen", "man", "woman") in relations["gender"]
    assert ("paris", "france", "rome", "italy") in relations["capital-country"]
    lines = language.analogies_text().splitlines()
    assert lines[0] == ": gender" and len(lines) == sum(map(len, relations.values())) + len(relations)
    # the pairs differ only in their pronouns: no sentence gives a female noun a male pronoun
    for sentence in sentences:
        tokens = sentence.split()
        if tokens[0] == "the" and tokens[1] in ("queen", "woman", "mother"):
            assert "her" in tokens and "she" in tokens and "his" not in tokens
