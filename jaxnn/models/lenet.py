"""LeNet-5-style convolutional network (LeCun et al. 1998)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jaxnn.models.layers import (
    SharedFields,
    check_image_batch,
    check_shared_fields,
    flatten_batch,
    freeze_fields,
    pool_2x2,
)
from jaxnn.validation import check_choice, check_int, check_int_sequence


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
        check_int_sequence(self.conv_features, "LeNet: conv_features", allow_empty=False)
        check_int_sequence(self.dense_features, "LeNet: dense_features")
        check_int(self.kernel_size, "LeNet: kernel_size", allow_bool=False)
        check_choice(self.padding, "LeNet: padding", choices=("SAME", "VALID"))
        check_choice(self.pool, "LeNet: pool", choices=("max", "avg"))
        check_shared_fields(self)
        freeze_fields(self, sequences=("conv_features", "dense_features"))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for NHWC images (B, H, W, C); ``train`` selects batch statistics and dropout."""
        check_image_batch(x, "LeNet")
        fields = SharedFields.of(self)
        k = self.kernel_size
        padding = "VALID" if self.padding == "VALID" else [(k // 2, (k - 1) // 2)] * 2

        h = x
        for i, channels in enumerate(self.conv_features):
            if self.padding == "VALID" and min(h.shape[1], h.shape[2]) < k:
                raise ValueError(
                    f"LeNet: with padding='VALID' conv layer {i} needs inputs of at least {k}x{k}; its input "
                    f"has shape {h.shape} (from x of shape {x.shape}); use padding='SAME' for small images"
                )
            h = fields.conv(channels, (k, k), padding=padding, name=f"conv_{i}")(h)
            h = pool_2x2(fields.activation(fields.normalize(h, train=train, name=f"conv_norm_{i}")), self.pool)

        h = flatten_batch(h, "LeNet")
        h = fields.hidden_dense(h, self.dense_features, train=train, norm_name="dense_norm")
        return fields.dense(self.num_classes, name="head")(h)
