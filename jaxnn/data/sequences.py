"""Generated sequence-to-sequence problems with an exact answer: copy, reverse, sort, add two numbers, normalise dates.

Every problem is over one character vocabulary (`VOCABULARY`: ``<pad>``, ``<bos>``, ``<eos>``, the digits, the
lowercase letters and ``+ - / ,`` and space). An example is stored as

* ``x`` (2, L) int32 token ids: row 0 the source, row 1 the decoder's input ``<bos> t_1 … t_n`` (teacher forcing),
  both padded with ``<pad>`` (0) after their end;
* ``y`` (L,) int32 labels ``t_1 … t_n <eos>``, then ``IGNORE_LABEL`` (−1) at padded positions;

so ``y[t]`` is the token that follows the decoder input up to position t, and ``L`` is the longest source or target
(with its ``<eos>``). Sources are drawn without repetition, so the train, validation and test splits share no source.

* ``copy``: ``length`` symbols drawn from the first ``alphabet`` letters, written again (the alignment of a
  translation: answer token i comes from source token i).
* ``reverse``: the same symbols, written backwards.
* ``sort``: the same symbols, sorted.
* ``add``: ``a+b`` with a, b of 1 to ``length`` digits, answered by the decimal sum.
* ``dates``: a date between 1950 and 2049 in one of six spellings ("7 march 1999", "march 7, 1999",
  "7 mar 1999", "07/03/1999" as dd/mm/yyyy, "1999-3-7", "mar 07 1999"), answered in ISO form "1999-03-07".
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

import numpy as np

from jaxnn.data.dataset import IGNORE_LABEL, SourceData
from jaxnn.validation import check_choice, check_int

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz+-/, "
VOCABULARY: tuple[str, ...] = SPECIALS + tuple(CHARACTERS)
"""Token id -> text: three special tokens, then one character each."""
PROBLEMS = ("reverse", "sort", "add", "dates", "copy")  # the order seeds the draws: append new ones

_IDS = {character: index for index, character in enumerate(VOCABULARY)}
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_FIRST_DAY, _DAYS = datetime.date(1950, 1, 1), (datetime.date(2050, 1, 1) - datetime.date(1950, 1, 1)).days


def encode(text: str) -> list[int]:
    """The token ids of ``text`` (characters of `CHARACTERS` only; others are refused by name)."""
    unknown = sorted({character for character in text if character not in _IDS or _IDS[character] < len(SPECIALS)})
    if unknown:
        raise ValueError(f"encode: text: expected characters of {CHARACTERS!r}, got {unknown} in {text!r}")
    return [_IDS[character] for character in text]


def decode(tokens: Sequence[int]) -> str:
    """The text of ``tokens`` up to the first ``<eos>`` (``<bos>`` and ``<pad>`` dropped; ids ≥ the vocabulary
    refused by name)."""
    out = []
    for token in np.asarray(tokens).tolist():
        if token == EOS:
            break
        if not 0 <= token < len(VOCABULARY):
            raise ValueError(f"decode: tokens: expected ids in [0, {len(VOCABULARY)}), got {token}")
        if token >= len(SPECIALS):
            out.append(VOCABULARY[token])
    return "".join(out)


def _symbols(problem: str, length: int, min_length: int, alphabet: int, rng: np.random.Generator):
    size = int(rng.integers(min_length, length + 1))
    symbols = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"[:alphabet]), size))
    answers = {"copy": symbols, "reverse": symbols[::-1], "sort": "".join(sorted(symbols))}
    return symbols, answers[problem]


def _add(length: int, rng: np.random.Generator):
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, length + 1)))) for _ in range(2))
    return f"{a}+{b}", str(a + b)


def _date(rng: np.random.Generator):
    date = _FIRST_DAY + datetime.timedelta(days=int(rng.integers(_DAYS)))
    month = _MONTHS[date.month - 1]
    spellings = (f"{date.day} {month} {date.year}", f"{month} {date.day}, {date.year}",
                 f"{date.day} {month[:3]} {date.year}", f"{date.day:02d}/{date.month:02d}/{date.year}",
                 f"{date.year}-{date.month}-{date.day}", f"{month[:3]} {date.day:02d} {date.year}")
    return spellings[int(rng.integers(len(spellings)))], date.isoformat()


def _space_size(problem: str, length: int, min_length: int, alphabet: int) -> float:
    if problem in ("copy", "reverse", "sort"):
        return float(sum(alphabet ** n for n in range(min_length, length + 1)))
    if problem == "add":
        return float(10 ** length) ** 2
    return float(_DAYS * 6)


def generate_pairs(problem: str, num_examples: int, *, length: int = 10, min_length: int | None = None,
                   alphabet: int = 10, seed: int = 0) -> list[tuple[str, str]]:
    """``num_examples`` (source, answer) text pairs of ``problem`` with distinct sources, drawn from ``seed``."""
    check_choice(problem, "problem", choices=PROBLEMS)
    check_int(num_examples, "num_examples", minimum=1, allow_bool=False)
    check_int(length, "length", minimum=1, allow_bool=False)
    min_length = length if min_length is None else check_int(min_length, "min_length", minimum=1, allow_bool=False)
    if min_length > length:
        raise ValueError(f"min_length: expected at most length={length}, got {min_length}")
    check_int(alphabet, "alphabet", minimum=2, maximum=26, allow_bool=False)
    space = _space_size(problem, length, min_length, alphabet)
    if num_examples > space / 2:
        raise ValueError(f"num_examples: expected at most half of the {space:.0f} distinct {problem} sources "
                         f"(length={length}, min_length={min_length}, alphabet={alphabet}), got {num_examples}")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(PROBLEMS.index(problem),)))
    pairs: dict[str, str] = {}
    while len(pairs) < num_examples:
        if problem in ("copy", "reverse", "sort"):
            source, answer = _symbols(problem, length, min_length, alphabet, rng)
        elif problem == "add":
            source, answer = _add(length, rng)
        else:
            source, answer = _date(rng)
        pairs.setdefault(source, answer)
    return list(pairs.items())


def pairs_to_arrays(pairs: Sequence[tuple[str, str]], *, reverse_source: bool = False,
                    width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (n, 2, L) and ``y`` (n, L) int32 from text pairs (see the module docstring); ``reverse_source`` feeds
    each source backwards (Sutskever et al. 2014; its padding stays at the end). ``width``: L (default: the
    longest source or answer + 1)."""
    sources = [encode(source)[::-1] if reverse_source else encode(source) for source, _ in pairs]
    answers = [encode(answer) + [EOS] for _, answer in pairs]
    needed = max(max(map(len, sources)), max(map(len, answers)))
    width = needed if width is None else width
    if width < needed:
        raise ValueError(f"width: expected at least {needed} (the longest source or answer with <eos>), got {width}")
    x = np.full((len(pairs), 2, width), PAD, np.int32)
    y = np.full((len(pairs), width), IGNORE_LABEL, np.int32)
    for row, (source, answer) in enumerate(zip(sources, answers)):
        x[row, 0, :len(source)] = source
        x[row, 1, :len(answer)] = [BOS] + answer[:-1]
        y[row, :len(answer)] = answer
    return x, y


def load_seq2seq(*, data_dir=None, seed: int = 0, download: bool = True, problem: str = "reverse",
                 num_examples: int = 20000, length: int = 10, min_length: int | None = None, alphabet: int = 10,
                 reverse_source: bool = False) -> SourceData:
    """A generated problem (see the module docstring) as a data set of token ids with sequence labels.

    ``length``: symbols per sequence (copy, reverse, sort; ``min_length`` .. ``length``, default all ``length``) or
    most digits per number (add); dates ignore it. ``alphabet``: letters used by copy, reverse and sort. Nothing is read from
    ``data_dir`` nor downloaded."""
    del data_dir, download
    pairs = generate_pairs(problem, num_examples, length=length, min_length=min_length, alphabet=alphabet, seed=seed)
    x, y = pairs_to_arrays(pairs, reverse_source=reverse_source)
    info = {"source": f"generated {problem} problems (jaxnn.data.sequences)", "problem": problem,
            "vocabulary": list(VOCABULARY), "width": int(x.shape[-1]), "reverse_source": bool(reverse_source),
            "layout": "x[:, 0] source, x[:, 1] decoder input (<bos> + answer), y answer + <eos>, -1 padding",
            "mean_answer_tokens": float(np.mean((y >= 0).sum(1))), "log_space_size": math.log(
                _space_size(problem, length, length if min_length is None else min_length, alphabet))}
    return SourceData(x=x, y=y, num_classes=len(VOCABULARY), task="classification", info=info, token_inputs=True)
