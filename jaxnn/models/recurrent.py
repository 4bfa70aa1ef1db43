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

Inputs: sequences (B, T, F), or images (B, H, W, C) read row by row (T = H steps of W·C features: the digits are
8 steps of 8 pixels). Variable lengths: ``model.apply(..., lengths=)`` with (B,) ints in [1, T]; steps at and after
a sequence's length are ignored (its final state is the one at its last valid step). ``fit`` does not pass lengths
yet (its batches are (x, y)). Gradient clipping is the optimizer's (``optimizer.clip_norm``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnn.models.layers import resolve_param_dtype
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


class RecurrentClassifier(nn.Module):
    """``num_layers`` recurrent layers of ``hidden`` units (``cell``: "elman", "lstm" or "gru"; see the module
    docstring), then a dense head on the last valid step's hidden state."""

    num_classes: int
    cell: str = "lstm"
    hidden: int = 64
    num_layers: int = 1
    param_dtype: Any = None

    def __post_init__(self) -> None:
        owner = "RecurrentClassifier"
        check_choice(self.cell, f"{owner}: cell", choices=CELLS)
        check_int(self.hidden, f"{owner}: hidden", allow_bool=False)
        check_int(self.num_layers, f"{owner}: num_layers", allow_bool=False)
        check_int(self.num_classes, f"{owner}: num_classes", allow_bool=False)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, lengths: jax.Array | None = None) -> jax.Array:
        """Logits (B, num_classes); ``train`` changes nothing (no dropout or batch norm here)."""
        h = as_sequences(x, "RecurrentClassifier")
        if lengths is not None:
            lengths = jnp.asarray(lengths)
            if lengths.shape != (h.shape[0],):
                raise ValueError(f"RecurrentClassifier: lengths: expected shape ({h.shape[0]},) (one per sequence), "
                                 f"got {lengths.shape}")
            if not isinstance(lengths, jax.core.Tracer) and (lengths.min() < 1 or lengths.max() > h.shape[1]):
                raise ValueError(f"RecurrentClassifier: lengths: expected lengths in [1, {h.shape[1]}] (the time "
                                 f"steps), got {lengths.tolist()}")
        dtype = resolve_param_dtype(self.param_dtype)
        h = h.astype(dtype)
        carry = None
        for layer in range(self.num_layers):
            rnn = nn.RNN(cell_module(self.cell, self.hidden, dtype), return_carry=True)
            carry, h = rnn(h, seq_lengths=lengths)
        last = carry[1] if self.cell == "lstm" else carry  # an LSTM's carry is (c, h)
        return nn.Dense(self.num_classes, param_dtype=dtype, name="head")(last)
