"""Text: character and whitespace-word tokens, a vocabulary file, corpus folders, language-model windows, padded
and bucketed batches of variable-length sequences, and the unigram/bigram perplexities a language model must beat.

A corpus folder holds ``train.txt`` and ``test.txt`` (UTF-8; ``vocab.txt``, one token per line, is used when
present). The ``text`` data set (:func:`load_text`) cuts the token stream of each file into windows of
``context + 1`` tokens: ``x`` the first ``context`` and ``y`` the last ``context`` (the next token at every
position), so a causal model trained with ``sequence_cross_entropy`` is a language model and exp(loss) its per-token
perplexity. Without a folder it uses the generated language of :mod:`jaxnn.data.language`.
"""

from __future__ import annotations

import collections
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jaxnn.data import language
from jaxnn.data.dataset import IGNORE_LABEL, SourceData, Split, default_data_dir
from jaxnn.validation import check_choice, check_int

LEVELS = ("char", "word")
SPECIALS = ("<pad>", "<unk>")
PAD, UNK = 0, 1
CORPUS_FILES = ("train.txt", "test.txt")
VOCABULARY_FILE = "vocab.txt"


def tokenize(text: str, level: str = "char") -> list[str]:
    """``text`` as characters (``"char"``, every character, spaces and newlines included) or whitespace-separated
    words (``"word"``)."""
    check_choice(level, "tokenize: level", choices=LEVELS)
    return list(text) if level == "char" else text.split()


class Vocabulary:
    """Token <-> id: ``<pad>`` = 0, ``<unk>`` = 1, then the tokens (most frequent first when built from text)."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tokens[:len(SPECIALS)] != list(SPECIALS):
            tokens = list(SPECIALS) + [token for token in tokens if token not in SPECIALS]
        duplicated = sorted(token for token, count in collections.Counter(tokens).items() if count > 1)
        if duplicated:
            raise ValueError(f"Vocabulary: tokens: expected each token once, got {duplicated[:5]} more than once")
        self.tokens = tokens
        self.ids = {token: index for index, token in enumerate(tokens)}

    @classmethod
    def build(cls, tokens: Iterable[str], *, max_size: int | None = None, min_count: int = 1) -> "Vocabulary":
        """The tokens seen at least ``min_count`` times, by decreasing count (ties in first-seen order), at most
        ``max_size`` of them (specials not counted)."""
        counts = collections.Counter(tokens)
        kept = [token for token, count in sorted(counts.items(), key=lambda item: -item[1]) if count >= min_count]
        return cls(kept if max_size is None else kept[:max_size])

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "Vocabulary":
        """Read a vocabulary file: one token per line (a character token may be a space; ``\\n`` is written
        ``<newline>``)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise ValueError(f"vocabulary file {path} is empty")
        return cls(["\n" if line == "<newline>" else line for line in lines])

    def save(self, path: str | pathlib.Path) -> None:
        """Write one token per line (see :meth:`load`)."""
        pathlib.Path(path).write_text("".join(("<newline>" if t == "\n" else t) + "\n" for t in self.tokens),
                                      encoding="utf-8")

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Iterable[str], *, strict: bool = False) -> np.ndarray:
        """int32 ids; a token outside the vocabulary becomes ``<unk>``, or with ``strict`` is refused by name."""
        tokens = list(tokens)
        ids = [self.ids.get(token, UNK) for token in tokens]
        if strict and UNK in ids:
            unknown = sorted({token for token in tokens if token not in self.ids})
            raise ValueError(f"Vocabulary.encode: expected tokens of the vocabulary ({len(self)} tokens), got "
                             f"{unknown[:5]}")
        return np.asarray(ids, np.int32)

    def decode(self, ids: Iterable[int], *, separator: str = "") -> str:
        """The tokens of ``ids`` joined by ``separator`` (``<pad>`` dropped; ids outside the vocabulary refused)."""
        out = []
        for index in np.asarray(list(ids)).tolist():
            if not 0 <= index < len(self):
                raise ValueError(f"Vocabulary.decode: expected ids in [0, {len(self)}), got {index}")
            if index != PAD:
                out.append(self.tokens[index])
        return separator.join(out)


def read_corpus(folder: str | pathlib.Path, files: Sequence[str] = CORPUS_FILES) -> dict[str, str]:
    """The texts of a corpus folder's ``files``; a missing folder or file, or an empty one, is named in one line."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist (it holds {', '.join(files)})")
    texts = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"corpus folder {folder} lacks {name} (a corpus folder holds {', '.join(files)})")
        texts[name] = read_corpus_file(folder / name)
    return texts


def read_corpus_file(path: str | pathlib.Path) -> str:
    """One corpus file's text (UTF-8); a missing, empty or undecodable file is named in one line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty")
    return text


def windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping language-model examples: ``x`` (n, context) and ``y`` (n, context) = x shifted by one."""
    context = check_int(context, "windows: context", allow_bool=False)
    ids = np.asarray(ids, np.int32)
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"windows: expected a text of more than context={context} tokens, got {len(ids)}")
    x = ids[:n * context].reshape(n, context)
    y = ids[1:n * context + 1].reshape(n, context)
    return x, y


def pad_sequences(sequences: Sequence[Sequence[int]], *, length: int | None = None, pad: int = PAD,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n, length) int32, lengths (n,) int32)``: each sequence padded with ``pad`` after its end; ``length``
    (default the longest) shorter than a sequence is refused."""
    lengths = np.asarray([len(s) for s in sequences], np.int32)
    if len(lengths) and lengths.min() < 1:
        raise ValueError(f"pad_sequences: expected non-empty sequences, sequence {int(np.argmin(lengths))} is empty")
    width = int(lengths.max(initial=1)) if length is None else length
    if len(lengths) and width < lengths.max():
        raise ValueError(f"pad_sequences: length: expected at least the longest sequence ({int(lengths.max())}), "
                         f"got {width}")
    out = np.full((len(sequences), width), pad, np.int32)
    for row, sequence in enumerate(sequences):
        out[row, :len(sequence)] = sequence
    return out, lengths


def bucketed_batches(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | np.ndarray | None,
                     batch_size: int, boundaries: Sequence[int], *, seed: int = 0, shuffle: bool = True,
                     ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """One epoch of ``(x, y, lengths)`` batches, each from one length bucket and padded to its boundary only.

    Bucket b holds the sequences with ``boundaries[b−1] < len ≤ boundaries[b]`` (a sequence longer than the last
    boundary is refused), so a batch carries at most one bucket's padding and there is one compiled shape per
    bucket. ``labels``: one label per sequence (y (B,)), or one per position (padded with ``IGNORE_LABEL``), or None.
    Every sequence appears once; batches are shuffled across buckets with ``seed``; a bucket's last batch may be
    short."""
    batch_size = check_int(batch_size, "bucketed_batches: batch_size", allow_bool=False)
    boundaries = sorted(check_int(b, "bucketed_batches: boundaries", allow_bool=False) for b in boundaries)
    if not boundaries:
        raise ValueError("bucketed_batches: boundaries: expected at least one length, got none")
    lengths = np.asarray([len(s) for s in sequences])
    if len(lengths) and lengths.max() > boundaries[-1]:
        raise ValueError(f"bucketed_batches: sequence {int(np.argmax(lengths))} has {int(lengths.max())} tokens, "
                         f"more than the last boundary {boundaries[-1]}")
    rng = np.random.default_rng(seed)
    bucket = np.searchsorted(boundaries, lengths)
    plan = []
    for b, width in enumerate(boundaries):
        rows = np.flatnonzero(bucket == b)
        if shuffle:
            rows = rng.permutation(rows)
        plan.extend((width, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))
    order = rng.permutation(len(plan)) if shuffle else range(len(plan))
    for index in order:
        width, rows = plan[index]
        x, batch_lengths = pad_sequences([sequences[r] for r in rows], length=width)
        y = None
        if labels is not None:
            chosen = [labels[r] for r in rows]
            if np.ndim(chosen[0]) == 0:
                y = np.asarray(chosen, np.int32)
            else:
                y, _ = pad_sequences(chosen, length=width, pad=IGNORE_LABEL)
        yield x, y, batch_lengths


def ngram_perplexities(train: Split, test: Split, vocab_size: int, smoothing: float = 1.0) -> dict[str, float]:
    """Per-token test perplexity of a unigram and a bigram model fitted on ``train`` (language-model windows: the
    token to predict is ``y[t]``, the previous one ``x[t]``), add-``smoothing`` (Laplace) estimates over
    ``vocab_size`` tokens: exp(−mean log p(y_t)) and exp(−mean log p(y_t | x_t)). Positions labelled
    ``IGNORE_LABEL`` are skipped."""
    scored = train.y >= 0
    targets, previous = train.y[scored], np.asarray(train.x)[scored]
    unigram = np.bincount(targets, minlength=vocab_size) + smoothing
    unigram = unigram / unigram.sum()
    bigram = np.full((vocab_size, vocab_size), smoothing)
    np.add.at(bigram, (previous, targets), 1)
    bigram /= bigram.sum(1, keepdims=True)
    test_scored = test.y >= 0
    y, x = test.y[test_scored], np.asarray(test.x)[test_scored]
    return {"unigram": float(np.exp(-np.mean(np.log(unigram[y])))),
            "bigram": float(np.exp(-np.mean(np.log(bigram[x, y]))))}


def load_text(*, data_dir=None, seed: int = 0, download: bool = True, corpus: str = "generated",
              level: str = "char", context: int = 64, max_vocab: int | None = None,
              num_sentences: int = 20000) -> SourceData:
    """Language-model windows (see the module docstring) of a text corpus.

    ``corpus``: ``"generated"`` (:mod:`jaxnn.data.language`, ``num_sentences`` sentences from ``seed``; no official
    test set) or ``"folder"`` (``data_dir``, default ``$JAXNN_DATA/text``: train.txt, test.txt, optional vocab.txt;
    test.txt is the official test set). ``level``: ``"char"`` or ``"word"`` tokens. The vocabulary comes from
    vocab.txt, or else from the train text (at most ``max_vocab`` tokens, by frequency); other tokens become
    ``<unk>``. Nothing is downloaded."""
    del download
    check_choice(corpus, "corpus", choices=("generated", "folder"))
    check_choice(level, "level", choices=LEVELS)
    context = check_int(context, "context", minimum=2, allow_bool=False)
    vocabulary_source = "built from the train text"
    if corpus == "generated":
        texts = {"train.txt": " ".join(language.generate_sentences(num_sentences, seed)) + "\n"}
        folder = None
    else:
        folder = pathlib.Path(data_dir) if data_dir is not None else default_data_dir("text")
        texts = read_corpus(folder)
    train_tokens = tokenize(texts["train.txt"], level)
    if folder is not None and (folder / VOCABULARY_FILE).is_file():
        vocabulary = Vocabulary.load(folder / VOCABULARY_FILE)
        vocabulary_source = str(folder / VOCABULARY_FILE)
    else:
        vocabulary = Vocabulary.build(train_tokens, max_size=max_vocab)
    x, y = windows(vocabulary.encode(train_tokens), context)
    x_test = y_test = None
    if "test.txt" in texts:
        x_test, y_test = windows(vocabulary.encode(tokenize(texts["test.txt"], level)), context)
    unknown = float(np.mean(x == UNK))
    info = {"source": "generated language (jaxnn.data.language)" if folder is None else f"corpus folder {folder}",
            "language_model": True, "level": level, "context": context, "vocabulary_size": len(vocabulary),
            "vocabulary_source": vocabulary_source, "train_tokens": len(train_tokens), "unknown_fraction": unknown,
            "vocabulary": vocabulary.tokens if len(vocabulary) <= 2000 else None}
    return SourceData(x=x, y=y, num_classes=len(vocabulary), task="classification", info=info, x_test=x_test,
                      y_test=y_test, token_inputs=True)


def read_analogies(source: str | pathlib.Path, vocabulary: Vocabulary, *, lowercase: bool = True
                   ) -> tuple[dict[str, np.ndarray], int]:
    """Analogy questions in word2vec's ``questions-words.txt`` format (``: section`` lines, then ``a b c d`` lines)
    as ``({section: ids (N, 4)}, skipped)``; a question with a word outside ``vocabulary`` is skipped and counted, as
    word2vec's ``compute-accuracy`` does. ``source``: a file path, or the text itself when it contains a newline."""
    if isinstance(source, pathlib.Path) or "\n" not in str(source):
        path = pathlib.Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"analogy file {path} does not exist")
        source = path.read_text(encoding="utf-8")
    sections: dict[str, list] = {}
    section, skipped = None, 0
    for number, line in enumerate(str(source).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            section = line[1:].strip()
            sections.setdefault(section, [])
            continue
        words = line.lower().split() if lowercase else line.split()
        if len(words) != 4 or section is None:
            raise ValueError(f"analogy line {number}: expected four words after a ': section' line, got {line!r}")
        if all(word in vocabulary.ids for word in words):
            sections[section].append([vocabulary.ids[word] for word in words])
        else:
            skipped += 1
    return {name: np.asarray(rows, np.int32).reshape(-1, 4) for name, rows in sections.items()}, skipped
