"""LeNet-5-style convolutional network (LeCun et al. 1998)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jaxnn.models.activations import resolve_activation
from jaxnn.models.initializers import resolve_initializer
from jaxnn.models.layers import (
    check_image_batch,
    check_model_fields,
    freeze_fields,
    flatten_batch,
    normalization_layer,
    pool_2x2,
    resolve_param_dtype,
)
from jaxnn.models.validation import (
    check_choice,
    check_positive_int,
    check_positive_int_sequence,
)


class LeNet(nn.Module):
    """conv-pool-conv-pool-dense-dense-dense: per conv stage h ← pool₂ₓ₂(act(norm(conv_k×k(h)))), then
    flatten, hidden dense layers h ← drop(act(norm(W h + b))), and logits = W h + b.

    With the defaults (6 and 16 channels of 5x5, dense 120-84, ``padding="SAME"``) a 28x28x1 image goes
    28 → 14 → 7 (flatten 7·7·16 = 784) and an 8x8x1 digit 8 → 4 → 2 (flatten 64). ``padding="VALID"`` on a
    32x32x1 input is the original LeNet-5 geometry 32 → 28 → 14 → 10 → 5 (flatten 400; 61,706 parameters).
    Forward cost: Σ_conv H·W·k²·c_in·c_out + Σ_dense fan_in·fan_out multiply-adds per example.

    Attributes:
      num_classes: output width.
      conv_features: output channels of the conv stages (default ``(6, 16)``).
      dense_features: hidden dense widths (default ``(120, 84)``).
      kernel_size: conv kernel side (default 5).
      padding: ``"SAME"`` (symmetric zero padding kernel_size//2; any input size ≥ 1) or ``"VALID"``
        (no padding; every conv input must be at least kernel_size on a side).
      pool: ``"max"`` (default) or ``"avg"`` (LeNet-5's subsampling); 2x2 windows, stride 2.
      activation, kernel_init(+_kwargs), bias_init(+_kwargs), param_dtype: as in :class:`MLP`.
      norm: ``None`` (default), ``"batch"`` or ``"layer"``, after every conv and hidden dense layer.
      dropout: inverted-dropout rate after each hidden dense activation (train mode only).
    """

    num_classes: int
    conv_features: Sequence[int] = (6, 16)
    dense_features: Sequence[int] = (120, 84)
    kernel_size: int = 5
    padding: str = "SAME"
    pool: str = "max"
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    kernel_init: str | Callable[..., jax.Array] = "he"
    kernel_init_kwargs: Mapping[str, Any] | None = None
    bias_init: str | Callable[..., jax.Array] = "zeros"
    bias_init_kwargs: Mapping[str, Any] | None = None
    norm: str | None = None
    dropout: float = 0.0
    param_dtype: Any = None

    def __post_init__(self) -> None:
        check_positive_int_sequence(self.conv_features, "conv_features", "LeNet", allow_empty=False)
        check_positive_int_sequence(self.dense_features, "dense_features", "LeNet")
        check_positive_int(self.kernel_size, "kernel_size", "LeNet")
        check_choice(self.padding, "padding", "LeNet", ("SAME", "VALID"))
        check_choice(self.pool, "pool", "LeNet", ("max", "avg"))
        check_model_fields(
            "LeNet",
            num_classes=self.num_classes,
            activation=self.activation,
            kernel_init=self.kernel_init,
            kernel_init_kwargs=self.kernel_init_kwargs,
            bias_init=self.bias_init,
            bias_init_kwargs=self.bias_init_kwargs,
            norm=self.norm,
            dropout=self.dropout,
            param_dtype=self.param_dtype,
        )
        freeze_fields(
            self, sequences=("conv_features", "dense_features"), mappings=("kernel_init_kwargs", "bias_init_kwargs")
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for NHWC images (B, H, W, C); ``train`` selects batch statistics and dropout."""
        check_image_batch(x, "LeNet")
        activation = resolve_activation(self.activation, "LeNet")
        kernel_init = resolve_initializer(self.kernel_init, self.kernel_init_kwargs, "kernel_init", "LeNet")
        bias_init = resolve_initializer(self.bias_init, self.bias_init_kwargs, "bias_init", "LeNet")
        param_dtype = resolve_param_dtype(self.param_dtype)
        k = self.kernel_size
        padding = "VALID" if self.padding == "VALID" else [(k // 2, (k - 1) // 2)] * 2

        h = x
        for i, channels in enumerate(self.conv_features):
            if self.padding == "VALID" and min(h.shape[1], h.shape[2]) < k:
                raise ValueError(
                    f"LeNet: with padding='VALID' conv layer {i} needs inputs of at least {k}x{k}; its input "
                    f"has shape {h.shape} (from x of shape {x.shape}); use padding='SAME' for small images"
                )
            h = nn.Conv(
                channels,
                (k, k),
                padding=padding,
                kernel_init=kernel_init,
                bias_init=bias_init,
                param_dtype=param_dtype,
                name=f"conv_{i}",
            )(h)
            norm = normalization_layer(
                self.norm, train=train, input_ndim=4, param_dtype=param_dtype, name=f"conv_norm_{i}"
            )
            if norm is not None:
                h = norm(h)
            h = pool_2x2(activation(h), self.pool)

        h = flatten_batch(h, "LeNet")
        for i, width in enumerate(self.dense_features):
            h = nn.Dense(
                width, kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype, name=f"dense_{i}"
            )(h)
            norm = normalization_layer(
                self.norm, train=train, input_ndim=2, param_dtype=param_dtype, name=f"dense_norm_{i}"
            )
            if norm is not None:
                h = norm(h)
            h = activation(h)
            if self.dropout > 0.0:
                h = nn.Dropout(self.dropout, deterministic=not train, name=f"dropout_{i}")(h)
        return nn.Dense(
            self.num_classes, kernel_init=kernel_init, bias_init=bias_init, param_dtype=param_dtype, name="head"
        )(h)
