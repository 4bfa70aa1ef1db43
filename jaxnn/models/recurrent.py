"""Recurrent classifiers: an Elman RNN, an LSTM or a GRU (Flax's cells, scanned over time by ``nn.RNN``).

One layer, per time step t (Flax's cells; σ the logistic function, ⊙ elementwise):

* ``"elman"``: h_t = tanh(W_i x_t + W_h h_{t−1} + b)
* ``"lstm"``:  i, f, o = σ(W_i· x_t + W_h· h_{t−1} + b·), g = tanh(W_ig x_t + W_hg h_{t−1} + b_g),
  c_t = f ⊙ c_{t−1} + i ⊙ g, h_t = o ⊙ tanh(c_t)
* ``"gru"``:   r, z = σ(W_i· x_t + W_h· h_{t−1} + b·), n = tanh(W_in x_t + b_in + r ⊙ (W_hn h_{t−1} + b_hn)),
  h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

Layers stack (the hidden sequence of one is the input of the next); the logits are W h_T + b from the last layer's
hidden state at each sequence's last valid step. Cost per example: T · num_layers cell steps, each
(gates) · hidden · (fan_in + hidden) multiply-adds (gates: 1 Elman, 4 LSTM, 3 GRU).

Inputs: sequences (B, T, F), images (B, H, W, C) read row by row (T = H steps of W·C features: the digits are
8 steps of 8 pixels), or token ids (B, T) through an embedding table when ``vocab_size`` is set.

Variable lengths: steps at and after a sequence's length are ignored (its final state is the one at its last valid
step). Either ``model.apply(..., lengths=)`` with (B,) ints in [1, T], or — the way ``fit``'s (x, y) batches carry
them — padding after each sequence's end marked by ``pad_value``: a token id, or for features a value that every
feature of a padded step equals (Keras's ``Masking``). A sequence's length is then one past its last step that is
not padding (at least 1), so padding inside a sequence counts as data.

Truncated backpropagation through time: ``truncation=k`` cuts the gradient every k steps counted back from each
sequence's end (the state carried into steps L − k, L − 2k, ... of a sequence of length L is ``stop_gradient``-ed),
so the loss on the final state reaches the last k steps of every sequence, whatever its length; the forward pass is
unchanged. Gradient clipping is the optimizer's (``optimizer.clip_norm``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.models.layers import ReadsTokens, resolve_param_dtype, token_ids
from jaxnn.validation import check_choice, check_int

CELLS = ("elman", "lstm", "gru")
"""Valid values of :attr:`RecurrentClassifier.cell`."""


def cell_module(cell: str, hidden: int, param_dtype: Any, name: str | None = None) -> nn.RNNCellBase:
    """Flax's cell for ``cell`` with ``hidden`` units (Flax's initializers: LeCun-normal input kernels, orthogonal
    recurrent kernels, zero biases), named ``name`` in its parent (Flax's automatic name when None)."""
    if cell == "elman":
        return nn.SimpleCell(hidden, param_dtype=param_dtype, name=name)
    if cell == "lstm":
        return nn.LSTMCell(hidden, param_dtype=param_dtype, name=name)
    return nn.GRUCell(hidden, param_dtype=param_dtype, name=name)


def as_sequences(x: jax.Array, owner: str) -> jax.Array:
    """(B, T, F) as given; images (B, H, W, C) as (B, H, W·C) rows; anything else refused."""
    if jnp.ndim(x) == 4:
        return jnp.reshape(x, (x.shape[0], x.shape[1], -1))
    if jnp.ndim(x) != 3:
        raise ValueError(f"{owner}: x: expected sequences (batch, time, features) or images (batch, height, width, "
                         f"channels), got shape {jnp.shape(x)}")
    return x


def lengths_from_padding(x: jax.Array, pad_value: float) -> jax.Array:
    """(B,) int32: one past each sequence's last step that is not padding (at least 1). ``x``: token ids (B, T), or
    features (B, T, F) where a padded step has every feature equal to ``pad_value``."""
    padded = x == pad_value if x.ndim == 2 else jnp.all(x == pad_value, axis=-1)
    steps = jnp.arange(1, x.shape[1] + 1)
    return jnp.maximum(jnp.max(jnp.where(padded, 0, steps), axis=1), 1).astype(jnp.int32)


def check_pad_value(pad_value: Any, vocab_size: int | None, owner: str) -> None:
    """A model's ``pad_value``: None, a number, and with ``vocab_size`` a token id in [0, vocab_size)."""
    if pad_value is None:
        return
    if isinstance(pad_value, (bool, np.bool_)) or not isinstance(pad_value, numbers.Real):
        raise TypeError(f"{owner}: pad_value: expected a number (a token id, or the value of a padded step's "
                        f"features), got {pad_value!r}")
    if not math.isfinite(pad_value):
        raise ValueError(f"{owner}: pad_value: expected a finite number (x == pad_value must be able to hold), got "
                         f"{pad_value!r}")
    if vocab_size is not None and (int(pad_value) != pad_value or not 0 <= pad_value < vocab_size):
        raise ValueError(f"{owner}: pad_value: expected a token id in [0, {vocab_size}) (vocab_size), got "
                         f"{pad_value!r}")


class TruncatedCell(nn.RNNCellBase):
    """``cell`` with its incoming state passed through ``stop_gradient`` at the steps flagged in its input's last
    feature (1: cut before this step); the other features are the cell's input. The wrapped cell keeps its own
    parameters and names (this module has none)."""

    cell: nn.RNNCellBase

    def __call__(self, carry, inputs):
        x, cut = inputs[..., :-1], inputs[..., -1:] > 0
        carry = jax.tree.map(lambda c: jnp.where(cut, jax.lax.stop_gradient(c), c), carry)
        return self.cell(carry, x)

    def initialize_carry(self, rng, input_shape):
        return self.cell.initialize_carry(rng, input_shape[:-1] + (input_shape[-1] - 1,))

    @property
    def num_feature_axes(self) -> int:
        return self.cell.num_feature_axes


def truncation_cuts(batch: int, steps: int, lengths: jax.Array | None, truncation: int) -> jax.Array:
    """(B, T) 1.0 before the steps t > 0 where (length − t) is a multiple of ``truncation``: each sequence's last
    ``truncation`` steps form one segment, the ones before it the next, and so on back to its start (the first
    segment is the short one), so every sequence gets the same last ``truncation`` steps of gradient whatever its
    length."""
    t = jnp.arange(steps)[None]
    length = jnp.full((batch, 1), steps) if lengths is None else jnp.asarray(lengths)[:, None]
    return ((t > 0) & ((length - t) % truncation == 0)).astype(jnp.float32)


class RecurrentClassifier(ReadsTokens, nn.Module):
    """``num_layers`` recurrent layers of ``hidden`` units (``cell``: "elman", "lstm" or "gru"; see the module
    docstring), then a dense head on the last valid step's hidden state. ``vocab_size``: read token ids through an
    embedding of ``embed_dim`` (default ``hidden``) units; ``pad_value``: what marks padding after a sequence's end;
    ``truncation``: truncated BPTT every that many steps (None: full backpropagation)."""

    num_classes: int
    cell: str = "lstm"
    hidden: int = 64
    num_layers: int = 1
    vocab_size: int | None = None
    embed_dim: int | None = None
    pad_value: float | None = None
    truncation: int | None = None
    param_dtype: Any = None

    def __post_init__(self) -> None:
        owner = "RecurrentClassifier"
        check_choice(self.cell, f"{owner}: cell", choices=CELLS)
        check_int(self.hidden, f"{owner}: hidden", allow_bool=False)
        check_int(self.num_layers, f"{owner}: num_layers", allow_bool=False)
        check_int(self.num_classes, f"{owner}: num_classes", allow_bool=False)
        for field in ("vocab_size", "embed_dim", "truncation"):
            if getattr(self, field) is not None:
                check_int(getattr(self, field), f"{owner}: {field}", allow_bool=False)
        if self.embed_dim is not None and self.vocab_size is None:
            raise ValueError(f"{owner}: embed_dim={self.embed_dim} needs vocab_size (the embedding reads token ids)")
        check_pad_value(self.pad_value, self.vocab_size, owner)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, lengths: jax.Array | None = None) -> jax.Array:
        """Logits (B, num_classes); ``train`` changes nothing (no dropout or batch norm here)."""
        owner = "RecurrentClassifier"
        dtype = resolve_param_dtype(self.param_dtype)
        if self.vocab_size is not None:
            ids = token_ids(x, self.vocab_size, owner)
            if lengths is None and self.pad_value is not None:
                lengths = lengths_from_padding(ids, self.pad_value)
            h = nn.Embed(self.vocab_size, self.embed_dim or self.hidden, param_dtype=dtype, name="embed")(ids)
        else:
            h = as_sequences(x, owner)
            if lengths is None and self.pad_value is not None:
                lengths = lengths_from_padding(h, self.pad_value)
        if lengths is not None:
            lengths = jnp.asarray(lengths)
            if lengths.shape != (h.shape[0],):
                raise ValueError(f"RecurrentClassifier: lengths: expected shape ({h.shape[0]},) (one per sequence), "
                                 f"got {lengths.shape}")
            if not isinstance(lengths, jax.core.Tracer) and (lengths.min() < 1 or lengths.max() > h.shape[1]):
                raise ValueError(f"RecurrentClassifier: lengths: expected lengths in [1, {h.shape[1]}] (the time "
                                 f"steps), got {lengths.tolist()}")
        h = h.astype(dtype)
        carry = None
        for layer in range(self.num_layers):
            cell = cell_module(self.cell, self.hidden, dtype)
            if self.truncation is None or self.truncation >= h.shape[1]:
                carry, h = nn.RNN(cell, return_carry=True)(h, seq_lengths=lengths)
            else:  # one scan whatever the truncation; the cut flags travel as a last input feature
                cuts = truncation_cuts(h.shape[0], h.shape[1], lengths, self.truncation).astype(h.dtype)
                carry, h = nn.RNN(TruncatedCell(cell), return_carry=True)(
                    jnp.concatenate([h, cuts[..., None]], axis=-1), seq_lengths=lengths)
        last = carry[1] if self.cell == "lstm" else carry  # an LSTM's carry is (c, h)
        return nn.Dense(self.num_classes, param_dtype=dtype, name="head")(last)
