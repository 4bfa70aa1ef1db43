"""Multilayer perceptron."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jaxnn.models.layers import SharedFields, check_shared_fields, flatten_batch, freeze_fields
from jaxnn.validation import check_int_sequence


class MLP(nn.Module):
    """Fully connected network: h₀ = flatten(x), h_{i+1} = drop(act(norm(W_i h_i + b_i))), logits = W_L h_L + b_L.

    Forward cost: Σ_i fan_in_i · fan_out_i multiply-adds per example. Inputs of any shape (B, ...) are
    flattened to (B, d).

    Attributes:
      features: hidden-layer widths, e.g. ``(32,)`` for d-32-num_classes; ``()`` is a linear model.
      num_classes: output width (classes for logits, or regression targets).
      activation: name in :data:`jaxnn.models.ACTIVATIONS` (``"relu"``, ``"tanh"``, ``"gelu"``, ...) or a callable.
      kernel_init, kernel_init_kwargs: weight initializer name in :data:`jaxnn.models.INITIALIZERS` plus its
        kwargs (e.g. ``"small_normal"``, ``{"sigma": 0.1}``), or an ``init(key, shape, dtype)`` callable.
      bias_init, bias_init_kwargs: the same for the biases (default zeros).
      norm: ``None``, ``"batch"`` or ``"layer"``, applied after each hidden linear layer (not the output).
      dropout: inverted-dropout rate after each hidden activation (train mode only; rng name ``"dropout"``);
        kept units are scaled by 1/(1 − dropout).
      param_dtype: parameter dtype; ``None`` = float32, or float64 under ``jax_enable_x64``.
    """

    features: Sequence[int]
    num_classes: int
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    kernel_init: str | Callable[..., jax.Array] = "he"
    kernel_init_kwargs: Mapping[str, Any] | None = None
    bias_init: str | Callable[..., jax.Array] = "zeros"
    bias_init_kwargs: Mapping[str, Any] | None = None
    norm: str | None = None
    dropout: float = 0.0
    param_dtype: Any = None

    def __post_init__(self) -> None:
        check_int_sequence(self.features, "MLP: features")
        check_shared_fields(self)
        freeze_fields(self, sequences=("features",))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for inputs (B, ...); ``train`` selects batch statistics and dropout."""
        fields = SharedFields.of(self)
        h = fields.hidden_dense(flatten_batch(x, "MLP"), self.features, train=train, norm_name="norm")
        return fields.dense(self.num_classes, name="head")(h)
