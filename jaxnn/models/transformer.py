"""Attention and small Transformers: a pre-LN encoder (``TransformerClassifier``) and a decoder-only language model
(``TransformerLM``), on Flax's own multi-head attention (``nn.MultiHeadDotProductAttention``, ``nn.make_causal_mask``).

Attention (Vaswani et al. 2017), per head: A = softmax(Q Kᵀ/√d_head + M) V with Q, K, V linear in the inputs and M
−∞ where a position may not look (the future, with ``causal``); the heads are concatenated and projected. A block
(pre-LN): h ← h + MHA(LN(h)), h ← h + W₂ gelu(W₁ LN(h)). Positions: ``"learned"`` (a table of ``max_len`` vectors),
``"sinusoidal"`` (PE[p, 2i] = sin(p/10000^{2i/d}), PE[p, 2i+1] = cos(p/10000^{2i/d})) or ``None`` (then an encoder is
permutation-equivariant until its pooling). Cost per example and block: ~4·T·d² (projections) + 2·T²·d (scores and
mixing) + 2·T·d·mlp_dim multiply-adds.

Inputs: the classifier reads float sequences (B, T, F) (or images row by row: T = H steps of W·C features) through
a dense embedding, or token ids (B, T) through a table when ``vocab_size`` is set; the language model reads token
ids and returns next-token logits (B, T, vocab_size) (train it with labels = the inputs shifted by one). Token ids
are cast to int32 (initialisation feeds zeros). The classifier's ``pad_value`` marks padding after each sequence's
end (a token id, or the value every feature of a padded step takes; as the recurrent models read it): no position
attends to the padding and the mean pools the valid positions only, so a padded sequence is classified as it is
alone; without it every position counts. ``dropout`` also drops attention weights, with Flax's default of one mask shared across the batch and heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.models.layers import ReadsTokens, resolve_param_dtype, token_ids
from jaxnn.models.recurrent import as_sequences, check_pad_value, lengths_from_padding
from jaxnn.validation import check_choice, check_float, check_int

POSITIONS = ("learned", "sinusoidal", None)
"""Valid values of the models' ``positions``."""


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """(length, dim) float64: PE[p, 2i] = sin(p·ω_i), PE[p, 2i+1] = cos(p·ω_i), ω_i = 10000^(−2i/dim)."""
    position = np.arange(length)[:, None]
    frequency = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    table = np.zeros((length, dim))
    table[:, 0::2] = np.sin(position * frequency)
    table[:, 1::2] = np.cos(position * frequency)[:, : dim // 2]
    return table


class TransformerBlock(nn.Module):
    """h ← h + MHA(LN(h), mask); h ← h + W₂ gelu(W₁ LN(h)) (pre-LN; dropout after each branch in train mode)."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    param_dtype: Any = None

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array | None, train: bool = False,
                 sow_weights: bool = False) -> jax.Array:
        dtype = resolve_param_dtype(self.param_dtype)
        attention = nn.MultiHeadDotProductAttention(self.num_heads, param_dtype=dtype, dropout_rate=self.dropout,
                                                    deterministic=not train, name="attention")
        a = attention(nn.LayerNorm(param_dtype=dtype, name="norm_attention")(h), mask=mask, sow_weights=sow_weights)
        h = h + nn.Dropout(self.dropout, deterministic=not train)(a)
        m = nn.LayerNorm(param_dtype=dtype, name="norm_mlp")(h)
        m = nn.Dense(self.mlp_dim, param_dtype=dtype, name="mlp_in")(m)
        m = nn.Dense(h.shape[-1], param_dtype=dtype, name="mlp_out")(nn.gelu(m))
        return h + nn.Dropout(self.dropout, deterministic=not train)(m)


class _Encoder(nn.Module):
    """Embedding, positions, ``depth`` blocks and a final LayerNorm: (B, T, dim) features per position."""

    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    positions: str | None
    max_len: int
    causal: bool
    dropout: float
    vocab_size: int | None
    param_dtype: Any
    owner: str
    pad_value: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, sow_weights: bool = False) -> jax.Array:
        dtype = resolve_param_dtype(self.param_dtype)
        if self.vocab_size is not None:
            h = nn.Embed(self.vocab_size, self.dim, param_dtype=dtype, name="embed")(
                token_ids(x, self.vocab_size, self.owner))
        else:
            h = nn.Dense(self.dim, param_dtype=dtype, name="embed")(as_sequences(x, self.owner).astype(dtype))
        length = h.shape[1]
        if self.positions is not None and length > self.max_len:
            raise ValueError(f"{self.owner}: x: expected sequences of at most max_len={self.max_len} steps (the "
                             f"positional table), got {length}")
        if self.positions == "learned":
            table = self.param("positions", nn.initializers.normal(0.02), (self.max_len, self.dim), dtype)
            h = h + table[:length]
        elif self.positions == "sinusoidal":
            h = h + jnp.asarray(sinusoidal_positions(length, self.dim), dtype)
        mask = nn.make_causal_mask(jnp.zeros(h.shape[:2])) if self.causal else None
        if self.pad_value is not None:
            valid = valid_positions(x, self.pad_value, self.owner, self.vocab_size is not None)
            mask = nn.combine_masks(mask, nn.make_attention_mask(jnp.ones_like(valid), valid))
        for i in range(self.depth):
            h = TransformerBlock(self.num_heads, self.mlp_dim, self.dropout, self.param_dtype,
                                 name=f"block_{i}")(h, mask, train, sow_weights)
        return nn.LayerNorm(param_dtype=dtype, name="norm")(h)


def valid_positions(x: jax.Array, pad_value: float, owner: str, tokens: bool) -> jax.Array:
    """(B, T) bool: the positions before each sequence's length (one past its last step that is not padding);
    ``tokens``: ``x`` holds token ids, compared as the embedding reads them (int32)."""
    steps = jnp.asarray(x).astype(jnp.int32) if tokens else as_sequences(x, owner)
    lengths = lengths_from_padding(jnp.asarray(steps), pad_value)
    return jnp.arange(steps.shape[1])[None] < lengths[:, None]


def _encode(module, x: jax.Array, train: bool, sow_weights: bool, causal: bool, vocab_size: int | None,
            name: str, pad_value: float | None = None) -> jax.Array:
    """The :class:`_Encoder` of a Transformer model's fields, as its submodule ``name`` (inside its ``__call__``)."""
    owner = type(module).__name__
    return _Encoder(module.dim, module.depth, module.num_heads, module.mlp_dim, module.positions, module.max_len,
                    causal, module.dropout, vocab_size, module.param_dtype, owner, pad_value,
                    name=name)(x, train, sow_weights)


def _check_fields(module, owner: str) -> None:
    check_int(module.dim, f"{owner}: dim", allow_bool=False)
    check_int(module.depth, f"{owner}: depth", allow_bool=False)
    check_int(module.num_heads, f"{owner}: num_heads", allow_bool=False)
    if module.dim % module.num_heads:
        raise ValueError(f"{owner}: num_heads: expected a divisor of dim={module.dim}, got {module.num_heads}")
    check_int(module.mlp_dim, f"{owner}: mlp_dim", allow_bool=False)
    check_choice(module.positions, f"{owner}: positions", choices=POSITIONS)
    check_int(module.max_len, f"{owner}: max_len", allow_bool=False)
    check_float(module.dropout, f"{owner}: dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True, strict=True)


class TransformerClassifier(ReadsTokens, nn.Module):
    """A pre-LN Transformer encoder over the sequence, mean-pooled over time, then a dense head (see the module
    docstring). ``vocab_size``: read token ids (B, T) instead of float features; ``causal``: each position attends
    to itself and the past only."""

    num_classes: int
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    positions: str | None = "learned"
    max_len: int = 128
    causal: bool = False
    dropout: float = 0.0
    vocab_size: int | None = None
    pad_value: float | None = None
    param_dtype: Any = None

    def __post_init__(self) -> None:
        _check_fields(self, "TransformerClassifier")
        check_int(self.num_classes, "TransformerClassifier: num_classes", allow_bool=False)
        check_pad_value(self.pad_value, self.vocab_size, "TransformerClassifier")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, sow_weights: bool = False) -> jax.Array:
        h = _encode(self, x, train, sow_weights, self.causal, self.vocab_size, "encoder", self.pad_value)
        if self.pad_value is None:
            pooled = h.mean(1)
        else:
            valid = valid_positions(x, self.pad_value, "TransformerClassifier", self.vocab_size is not None)[..., None]
            pooled = jnp.sum(jnp.where(valid, h, 0), axis=1) / jnp.sum(valid, axis=1).astype(h.dtype)
        return nn.Dense(self.num_classes, param_dtype=resolve_param_dtype(self.param_dtype), name="head")(pooled)


class TransformerLM(ReadsTokens, nn.Module):
    """A decoder-only (causal) Transformer language model: token ids (B, T) -> next-token logits (B, T, vocab)."""

    vocab_size: int
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    positions: str | None = "learned"
    max_len: int = 128
    dropout: float = 0.0
    param_dtype: Any = None

    def __post_init__(self) -> None:
        _check_fields(self, "TransformerLM")
        check_int(self.vocab_size, "TransformerLM: vocab_size", allow_bool=False)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, sow_weights: bool = False) -> jax.Array:
        h = _encode(self, x, train, sow_weights, True, self.vocab_size, "decoder")
        return nn.Dense(self.vocab_size, param_dtype=resolve_param_dtype(self.param_dtype), name="head")(h)
