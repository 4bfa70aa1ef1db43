"""The generated sequence problems: every answer checked independently, the stored layout, disjoint splits, and
token data through load_dataset (ints kept, never standardised) and the Dataset checks of sequence labels."""

import datetime

import numpy as np
import pytest

from jaxnn import data
from jaxnn.data import sequences


def _parse_date(text):
    for spelling in ("%d %B %Y", "%B %d, %Y", "%d %b %Y", "%d/%m/%Y", "%Y-%m-%d", "%b %d %Y"):
        try:
            return datetime.datetime.strptime(text, spelling).date()
        except ValueError:
            pass
    raise AssertionError(f"no known spelling: {text!r}")


def test_every_answer_is_right():
    for source, answer in sequences.generate_pairs("reverse", 50, length=7, min_length=2, alphabet=5, seed=3):
        assert answer == source[::-1] and 2 <= len(source) <= 7 and set(source) <= set("abcde")
    for source, answer in sequences.generate_pairs("sort", 50, length=6, seed=3):
        assert answer == "".join(sorted(source)) and len(source) == 6
    for source, answer in sequences.generate_pairs("add", 50, length=3, seed=3):
        a, b = source.split("+")
        assert int(answer) == int(a) + int(b) and max(len(a), len(b)) <= 3
    dates = sequences.generate_pairs("dates", 300, seed=3)
    for source, answer in dates:
        assert _parse_date(source).isoformat() == answer and 1950 <= int(answer[:4]) <= 2049
    assert any("/" in source for source, _ in dates) and any("," in source for source, _ in dates)


def test_layout_reverse_source_and_decode():
    pairs = [("abc", "cba"), ("de", "ed")]
    x, y = sequences.pairs_to_arrays(pairs)
    assert x.shape == (2, 2, 4) and y.shape == (2, 4)  # the longest answer + <eos>
    assert sequences.decode(x[0, 0]) == "abc" and sequences.decode(y[0]) == "cba"
    np.testing.assert_array_equal(x[1, 1], [sequences.BOS, *sequences.encode("ed"), sequences.PAD])
    np.testing.assert_array_equal(y[1], [*sequences.encode("ed"), sequences.EOS, -1])
    for row in range(2):  # the decoder input is <bos> then the labels, one step late
        n = int(np.sum(y[row] >= 0))
        np.testing.assert_array_equal(x[row, 1, 1:n], y[row, :n - 1])
    backwards, _ = sequences.pairs_to_arrays(pairs, reverse_source=True)
    np.testing.assert_array_equal(backwards[1, 0], [*sequences.encode("ed"), 0, 0])
    with pytest.raises(ValueError, match=r"encode: text: expected characters of .*\['!', 'A'\]"):
        sequences.encode("A!")
    with pytest.raises(ValueError, match=r"decode: tokens: expected ids in \[0, 44\), got 50"):
        sequences.decode([5, 50])


def test_load_dataset_keeps_token_ids_and_splits_share_no_source():
    dataset = data.load_dataset("seq2seq", problem="sort", num_examples=400, length=6, seed=2)
    assert dataset.train.x.dtype == np.int32 and dataset.input_shape == (2, 7)
    assert dataset.sequence_labels and dataset.num_classes == len(sequences.VOCABULARY)
    assert dataset.info["standardization"]["applied"] is False
    sources = [set(map(bytes, getattr(dataset, split).x[:, 0])) for split in ("train", "val", "test")]
    assert sum(map(len, sources)) == 400 and len(set.union(*sources)) == 400
    again = data.load_dataset("seq2seq", problem="sort", num_examples=400, length=6, seed=2)
    np.testing.assert_array_equal(again.test.x, dataset.test.x)
    x_dtype, y_dtype = data.pipeline.device_dtypes(dataset.train)
    assert (x_dtype, y_dtype) == (np.int32, np.int32)


def test_bad_options_and_labels_are_named():
    with pytest.raises(ValueError, match="num_examples: expected at most half of the 100 distinct reverse sources"):
        data.load_dataset("seq2seq", problem="reverse", num_examples=60, length=2, alphabet=10)
    with pytest.raises(ValueError, match="problem: expected one of"):
        sequences.generate_pairs("translate", 5)
    with pytest.raises(ValueError, match="min_length: expected at most length=3, got 4"):
        sequences.generate_pairs("reverse", 5, length=3, min_length=4)
    x = np.zeros((4, 2, 3), np.int32)
    split = data.Split(x, np.array([[1, 2, -1]] * 4, np.int32))
    data.Dataset("s", split, split, split, 3, (2, 3), "classification", {})
    bad = data.Split(x, np.array([[1, 2, -2]] * 4, np.int32))
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes=3\) \(or -1 for padding\)"):
        data.Dataset("s", bad, bad, bad, 3, (2, 3), "classification", {})
    flat = data.Split(x, np.array([1, -1, 0, 0], np.int32))
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes=3\); got labels in \[-1, 1\]"):
        data.Dataset("s", flat, flat, flat, 3, (2, 3), "classification", {})
    with pytest.raises(TypeError, match="expected integer token ids with token_inputs=True"):
        data.SourceData(x=x.astype(float), y=np.zeros(4), num_classes=2, task="classification", info={},
                        token_inputs=True)


def test_copy_answers_its_source():
    for source, answer in sequences.generate_pairs("copy", 20, length=5, seed=0):
        assert answer == source and len(source) == 5
