"""A recurrent encoder–decoder with attention (``Seq2Seq``), its greedy and beam-search decoding, and the
exact-sequence accuracy of a decoding.

Inputs follow :mod:`jaxnn.data.sequences`: ``x`` (B, 2, L) token ids, row 0 the source and row 1 the decoder input
(``<bos>`` then the answer, teacher forcing), both padded with ``<pad>`` = 0; the logits (B, L, num_classes) at
position t predict the answer's token t. The model (Sutskever et al. 2014; attention as Luong et al. 2015, global,
after the recurrence and without input feeding):

* encoder: an LSTM/GRU/Elman layer over the embedded source, run to each source's own length; its final state
  starts the decoder;
* decoder: the same kind of layer over the embedded decoder input, so position t sees the answer before t only;
* attention (``attention`` = "dot", "general" or "additive"): per decoder state h_t and encoder state s_j, a score
  h_tᵀ s_j ("dot"), h_tᵀ W s_j ("general") or vᵀ tanh(W₁ h_t + W₂ s_j) ("additive", the score of Bahdanau et al.
  2015), softmax over the source's real positions, context c_t = Σ_j a_tj s_j and h̃_t = tanh(W_c [c_t; h_t]);
  with ``attention=None`` h̃_t = h_t (the source reaches the decoder only through the encoder's final state);
* logits = W_o h̃_t + b.

The attention weights are sown as ``intermediates/attention`` (B, L, L) (``model.apply(..., mutable=
["intermediates"])``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.models.layers import resolve_param_dtype
from jaxnn.models.recurrent import CELLS, cell_module
from jaxnn.validation import check_choice, check_int

ATTENTIONS = ("dot", "general", "additive", None)
"""Valid values of :attr:`Seq2Seq.attention`."""


def _tokens(x: jax.Array, owner: str) -> tuple[jax.Array, jax.Array]:
    if jnp.ndim(x) != 3 or x.shape[1] != 2:
        raise ValueError(f"{owner}: x: expected token ids of shape (batch, 2, length) (row 0 the source, row 1 the "
                         f"decoder input), got shape {jnp.shape(x)}")
    x = jnp.asarray(x).astype(jnp.int32)
    return x[:, 0], x[:, 1]


class Seq2Seq(nn.Module):
    """Encoder–decoder over token ids (see the module docstring). ``num_classes``: the answer vocabulary;
    ``vocab_size``: the source vocabulary (default ``num_classes``); ``cell``: "lstm", "gru" or "elman";
    ``pad_id``, ``bos_id``, ``eos_id``: the special tokens (those of :mod:`jaxnn.data.sequences` by default)."""

    num_classes: int
    vocab_size: int | None = None
    cell: str = "lstm"
    embed_dim: int = 32
    hidden: int = 64
    attention: str | None = "general"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    param_dtype: Any = None

    @property
    def input_vocab_size(self) -> tuple[int, int]:
        """The token ids the model reads, per row of ``x``: the source's in [0, vocab_size), the decoder input's in
        [0, num_classes)."""
        return (self.num_classes if self.vocab_size is None else self.vocab_size, self.num_classes)

    def __post_init__(self) -> None:
        owner = "Seq2Seq"
        check_int(self.num_classes, f"{owner}: num_classes", minimum=2, allow_bool=False)
        if self.vocab_size is not None:
            check_int(self.vocab_size, f"{owner}: vocab_size", minimum=2, allow_bool=False)
        check_choice(self.cell, f"{owner}: cell", choices=CELLS)
        check_int(self.embed_dim, f"{owner}: embed_dim", allow_bool=False)
        check_int(self.hidden, f"{owner}: hidden", allow_bool=False)
        check_choice(self.attention, f"{owner}: attention", choices=ATTENTIONS)
        for name in ("pad_id", "bos_id", "eos_id"):
            check_int(getattr(self, name), f"{owner}: {name}", minimum=0, maximum=self.num_classes - 1,
                      allow_bool=False)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (B, L, num_classes); ``train`` changes nothing (no dropout or batch norm here)."""
        source, decoder_input = _tokens(x, "Seq2Seq")
        dtype = resolve_param_dtype(self.param_dtype)
        source_vocab = self.num_classes if self.vocab_size is None else self.vocab_size
        real = source != self.pad_id
        lengths = jnp.maximum(real.sum(1), 1)
        embedded = nn.Embed(source_vocab, self.embed_dim, param_dtype=dtype, name="embed_source")(source)
        carry, encoded = nn.RNN(cell_module(self.cell, self.hidden, dtype, "encoder"), return_carry=True)(
            embedded, seq_lengths=lengths)
        target = nn.Embed(self.num_classes, self.embed_dim, param_dtype=dtype, name="embed_target")(decoder_input)
        h = nn.RNN(cell_module(self.cell, self.hidden, dtype, "decoder"))(target, initial_carry=carry)
        if self.attention is not None:
            if self.attention == "dot":
                scores = jnp.einsum("btd,bsd->bts", h, encoded)
            elif self.attention == "general":
                scores = jnp.einsum("btd,bsd->bts", nn.Dense(self.hidden, use_bias=False, param_dtype=dtype,
                                                             name="score")(h), encoded)
            else:
                query = nn.Dense(self.hidden, use_bias=False, param_dtype=dtype, name="score_query")(h)
                key = nn.Dense(self.hidden, use_bias=False, param_dtype=dtype, name="score_key")(encoded)
                scores = nn.Dense(1, use_bias=False, param_dtype=dtype, name="score")(
                    jnp.tanh(query[:, :, None] + key[:, None]))[..., 0]
            scores = jnp.where(real[:, None, :], scores, jnp.finfo(scores.dtype).min)
            weights = jax.nn.softmax(scores, axis=-1)
            self.sow("intermediates", "attention", weights)
            context = jnp.einsum("bts,bsd->btd", weights, encoded)
            h = jnp.tanh(nn.Dense(self.hidden, param_dtype=dtype, name="combine")(
                jnp.concatenate([context, h], axis=-1)))
        return nn.Dense(self.num_classes, param_dtype=dtype, name="head")(h)


def _check_decoding(model, source, owner: str) -> jax.Array:
    if not isinstance(model, Seq2Seq):
        raise TypeError(f"{owner}: model: expected a Seq2Seq, got {type(model).__name__}")
    source = jnp.asarray(source)
    if source.ndim == 3 and source.shape[1] == 2:  # a batch x: its source row
        source = source[:, 0]
    if source.ndim != 2 or not jnp.issubdtype(source.dtype, jnp.integer):
        raise ValueError(f"{owner}: source: expected integer token ids of shape (batch, length) or a batch x of "
                         f"shape (batch, 2, length), got {source.dtype} of shape {source.shape}")
    vocab = model.num_classes if model.vocab_size is None else model.vocab_size
    if source.size and not isinstance(source, jax.core.Tracer) and (source.min() < 0 or source.max() >= vocab):
        raise ValueError(f"{owner}: source: expected token ids in [0, {vocab}) (the source vocabulary), got ids in "
                         f"[{int(source.min())}, {int(source.max())}]")
    return source.astype(jnp.int32)


def _decoder_input(tokens: jax.Array, bos_id: int) -> jax.Array:
    """<bos> followed by the answer tokens so far (the last one dropped): (..., L) -> (..., L)."""
    bos = jnp.full(tokens.shape[:-1] + (1,), bos_id, tokens.dtype)
    return jnp.concatenate([bos, tokens[..., :-1]], axis=-1)


def greedy_decode(model: Seq2Seq, params: Any, source: jax.Array, model_state: Any = None) -> jax.Array:
    """The answer (B, L) int32 the model gives when each step takes its most likely token: ``<eos>`` ends an
    answer and ``<pad>`` follows it. ``source``: (B, L) token ids or a batch ``x`` (B, 2, L). L model calls."""
    source = _check_decoding(model, source, "greedy_decode")
    return _greedy(model, params, dict(model_state or {}), source)


@functools.partial(jax.jit, static_argnums=0)
def _greedy(model, params, model_state, source):
    variables = {"params": params, **model_state}
    length = source.shape[1]

    def step(t, tokens):
        x = jnp.stack([source, _decoder_input(tokens, model.bos_id)], axis=1)
        logits = jax.lax.dynamic_index_in_dim(model.apply(variables, x), t, axis=1, keepdims=False)
        done = jnp.any((tokens == model.eos_id) & (jnp.arange(length) < t), axis=1)
        token = jnp.where(done, model.pad_id, jnp.argmax(logits, -1).astype(tokens.dtype))
        return tokens.at[:, t].set(token)

    return jax.lax.fori_loop(0, length, step, jnp.full_like(source, model.pad_id))


def beam_search(model: Seq2Seq, params: Any, source: jax.Array, *, beam_size: int = 4, model_state: Any = None,
                length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Beam search: ``(answers (B, L) int32, log_probs (B,))``, the best of ``beam_size`` hypotheses kept per step.

    At step t every live hypothesis is extended by every token, a finished one (it emitted ``<eos>``) only by
    ``<pad>`` at no cost, and the ``beam_size`` highest total log-probabilities stay. The answer is the final
    hypothesis with the highest log p / ((5 + n)/6)^length_penalty (n its tokens with ``<eos>``; Wu et al. 2016;
    0 ranks by log p); ``log_probs`` is its log p. ``beam_size=1`` is :func:`greedy_decode`; a beam of at least
    V^(L−1) hypotheses is an exhaustive search. L model calls on B·beam_size sequences."""
    source = _check_decoding(model, source, "beam_search")
    beam_size = check_int(beam_size, "beam_search: beam_size", allow_bool=False)
    return _beam(model, params, dict(model_state or {}), source, beam_size, float(length_penalty))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _beam(model, params, model_state, source, beam_size, length_penalty):
    variables = {"params": params, **model_state}
    batch, length = source.shape
    vocab = model.num_classes
    sources = jnp.repeat(source, beam_size, axis=0)
    neg_inf = jnp.array(-jnp.inf, jnp.result_type(float))
    only_pad = jnp.where(jnp.arange(vocab) == model.pad_id, 0.0, neg_inf)

    def step(t, carry):
        tokens, scores, finished = carry  # (B, K, L), (B, K), (B, K)
        x = jnp.stack([sources, _decoder_input(tokens.reshape(batch * beam_size, length), model.bos_id)], axis=1)
        logits = jax.lax.dynamic_index_in_dim(model.apply(variables, x), t, axis=1, keepdims=False)
        log_p = jax.nn.log_softmax(logits.astype(scores.dtype), -1).reshape(batch, beam_size, vocab)
        log_p = jnp.where(finished[..., None], only_pad, log_p)
        top, index = jax.lax.top_k((scores[..., None] + log_p).reshape(batch, beam_size * vocab), beam_size)
        parent, token = index // vocab, (index % vocab).astype(tokens.dtype)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, t].set(token)
        finished = jnp.take_along_axis(finished, parent, axis=1) | (token == model.eos_id)
        return tokens, top, finished

    start = (jnp.full((batch, beam_size, length), model.pad_id, source.dtype),
             jnp.where(jnp.arange(beam_size) == 0, 0.0, neg_inf)[None].repeat(batch, 0).astype(neg_inf.dtype),
             jnp.zeros((batch, beam_size), bool))
    tokens, scores, _ = jax.lax.fori_loop(0, length, step, start)
    count = jnp.sum(tokens != model.pad_id, axis=-1)  # answer tokens with <eos>
    ranked = scores / ((5.0 + count) / 6.0) ** length_penalty if length_penalty else scores
    best = jnp.argmax(ranked, axis=1)
    return (jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0],
            jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0])


def sequence_log_prob(model: Seq2Seq, params: Any, x: jax.Array, answers: jax.Array, model_state: Any = None):
    """log p(answer | source) (B,) under teacher forcing: Σ over the answer's tokens up to and with its ``<eos>``."""
    source = _check_decoding(model, x, "sequence_log_prob")
    answers = jnp.asarray(answers, jnp.int32)
    decoder = _decoder_input(answers, model.bos_id)
    logits = model.apply({"params": params, **dict(model_state or {})}, jnp.stack([source, decoder], axis=1))
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), answers[..., None], axis=-1)[..., 0]
    ended = answers == model.eos_id
    ended_before = jnp.cumsum(ended, axis=1) - ended
    return jnp.sum(jnp.where(ended_before == 0, log_p, 0.0), axis=1)


def sequence_accuracy(answers: Any, labels: Any) -> float:
    """Fraction of examples whose decoded ``answers`` (B, L) match ``labels`` (B, L; −1 at padding) at every
    labelled position, the ``<eos>`` included (a longer or shorter answer is wrong)."""
    answers, labels = np.asarray(answers), np.asarray(labels)
    if answers.shape != labels.shape:
        raise ValueError(f"sequence_accuracy: answers: expected the labels' shape {labels.shape}, got {answers.shape}")
    return float(np.mean(np.all((answers == labels) | (labels < 0), axis=1)))
