"""Word embeddings: the skip-gram model with negative sampling (Mikolov et al. 2013), its loss, nearest neighbours
and analogies.

Skip-gram scores a (word, context) pair by the dot product of the word's input vector v_w and the context's output
vector u_c. Negative sampling trains it to tell each observed pair from K pairs with contexts drawn from a noise
distribution: per pair, −log σ(u_cᵀ v_w) − Σ_k log σ(−u_kᵀ v_w). A batch ``x`` (B, 2 + K) holds the word, the
observed context and the K noise contexts; :class:`SkipGram` returns the B × (1 + K) scores.

Analogies (a : b :: c : ?) are answered as word2vec's ``compute-accuracy`` does (3CosAdd): the word whose unit input
vector has the largest cosine with v̂_b − v̂_a + v̂_c, a, b and c excluded.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.models.layers import ReadsTokens, resolve_param_dtype
from jaxnn.validation import check_int


class SkipGram(ReadsTokens, nn.Module):
    """Input vectors ``words`` and output vectors ``contexts`` (vocab_size × dim each; word2vec's initialisation:
    inputs uniform in ±0.5/dim, outputs zero). ``x`` (B, 2 + K) ids -> scores (B, 1 + K) = v_{x[:, 0]}ᵀ u_{x[:, j]}."""

    vocab_size: int
    dim: int = 64
    param_dtype: Any = None

    def __post_init__(self) -> None:
        check_int(self.vocab_size, "SkipGram: vocab_size", minimum=2, allow_bool=False)
        check_int(self.dim, "SkipGram: dim", allow_bool=False)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if jnp.ndim(x) != 2 or x.shape[1] < 2:
            raise ValueError(f"SkipGram: x: expected ids of shape (batch, 2 + negatives) (word, context, noise "
                             f"contexts), got shape {jnp.shape(x)}")
        dtype = resolve_param_dtype(self.param_dtype)
        x = jnp.asarray(x).astype(jnp.int32)
        bound = 0.5 / self.dim
        words = nn.Embed(self.vocab_size, self.dim, param_dtype=dtype, name="words",
                         embedding_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))
        contexts = nn.Embed(self.vocab_size, self.dim, param_dtype=dtype, name="contexts",
                            embedding_init=nn.initializers.zeros)
        return jnp.einsum("bd,bkd->bk", words(x[:, 0]), contexts(x[:, 1:]))


def negative_sampling_loss(scores: jax.Array, labels: Any = None) -> jax.Array:
    """Per pair (B,): −log σ(s_0) − Σ_{k≥1} log σ(−s_k), scores (B, 1 + K) with the observed context first
    (``labels`` unused: the layout is the label)."""
    del labels
    return -jax.nn.log_sigmoid(scores[:, 0]) - jnp.sum(jax.nn.log_sigmoid(-scores[:, 1:]), axis=1)


def unit_rows(embeddings: Any) -> np.ndarray:
    """Each row divided by its Euclidean norm (a zero row stays zero)."""
    embeddings = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def nearest_neighbours(embeddings: Any, queries: Any, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (Q, k), cosines (Q, k))``: the k rows most similar (cosine) to each query row, itself excluded."""
    unit = unit_rows(embeddings)
    queries = np.asarray(queries, np.int64)
    k = check_int(k, "nearest_neighbours: k", maximum=len(unit) - 1, allow_bool=False)
    cosines = unit[queries] @ unit.T
    cosines[np.arange(len(queries)), queries] = -np.inf
    ids = np.argsort(-cosines, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(cosines, ids, axis=1)


def analogy_predictions(embeddings: Any, questions: Any, *, restrict: int | None = None) -> np.ndarray:
    """For each question row (a, b, c, ·) of ids, the id maximising cos(v, v̂_b − v̂_a + v̂_c) over the vocabulary
    (its first ``restrict`` ids when given, as word2vec's ``compute-accuracy`` restricts to frequent words), with a,
    b and c excluded."""
    unit = unit_rows(embeddings)
    questions = np.asarray(questions, np.int64).reshape(-1, 4)
    candidates = unit if restrict is None else unit[:restrict]
    target = unit[questions[:, 1]] - unit[questions[:, 0]] + unit[questions[:, 2]]
    scores = target @ candidates.T
    for column in range(3):
        inside = questions[:, column] < len(candidates)
        scores[np.flatnonzero(inside), questions[inside, column]] = -np.inf
    return np.argmax(scores, axis=1)


def analogy_accuracy(embeddings: Any, questions: Any, *, restrict: int | None = None) -> float:
    """The fraction of question rows (a, b, c, d) whose :func:`analogy_predictions` is d (nan for no questions)."""
    questions = np.asarray(questions, np.int64).reshape(-1, 4)
    if len(questions) == 0:
        return float("nan")
    return float(np.mean(analogy_predictions(embeddings, questions, restrict=restrict) == questions[:, 3]))
