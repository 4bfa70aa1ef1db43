"""A small VGG-style network (Simonyan & Zisserman 2015): stacks of 3x3 convolutions and max pooling."""

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
from jaxnn.validation import check_int, check_int_sequence


class VGGSmall(nn.Module):
    """Stages of (conv3x3-norm-act) x convs_per_stage then 2x2 max pool, then flatten, hidden dense layers
    h ← drop(act(norm(W h + b))) and logits = W h + b.

    With the defaults (stages 32-64-128, two convs each, one hidden dense layer of 128) a 32x32x3 image
    becomes 4x4x128 before flattening and an 8x8x1 image 1x1x128 (pooling rounds odd sizes up, so any input
    size works). Forward cost: Σ_conv H·W·9·c_in·c_out + Σ_dense fan_in·fan_out multiply-adds per example.

    Attributes:
      num_classes: output width.
      stage_features: channels of each stage (default ``(32, 64, 128)``).
      convs_per_stage: 3x3 convolutions (SAME padding) per stage (default 2).
      dense_features: hidden dense widths after flattening (default ``(128,)``).
      activation, kernel_init(+_kwargs), bias_init(+_kwargs), param_dtype: as in :class:`MLP`.
      norm: ``None`` (default), ``"batch"`` or ``"layer"``, after every conv and hidden dense layer.
      dropout: inverted-dropout rate after each hidden dense activation (train mode only).
    """

    num_classes: int
    stage_features: Sequence[int] = (32, 64, 128)
    convs_per_stage: int = 2
    dense_features: Sequence[int] = (128,)
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    kernel_init: str | Callable[..., jax.Array] = "he"
    kernel_init_kwargs: Mapping[str, Any] | None = None
    bias_init: str | Callable[..., jax.Array] = "zeros"
    bias_init_kwargs: Mapping[str, Any] | None = None
    norm: str | None = None
    dropout: float = 0.0
    param_dtype: Any = None

    def __post_init__(self) -> None:
        check_int_sequence(self.stage_features, "VGGSmall: stage_features", allow_empty=False)
        check_int(self.convs_per_stage, "VGGSmall: convs_per_stage", allow_bool=False)
        check_int_sequence(self.dense_features, "VGGSmall: dense_features")
        check_shared_fields(self)
        freeze_fields(self, sequences=("stage_features", "dense_features"))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for NHWC images (B, H, W, C); ``train`` selects batch statistics and dropout."""
        check_image_batch(x, "VGGSmall")
        fields = SharedFields.of(self)

        h = x
        for stage, channels in enumerate(self.stage_features):
            for j in range(self.convs_per_stage):
                h = fields.conv(channels, (3, 3), padding=[(1, 1), (1, 1)], name=f"stage{stage}_conv{j}")(h)
                h = fields.activation(fields.normalize(h, train=train, name=f"stage{stage}_norm{j}"))
            h = pool_2x2(h, "max")

        h = flatten_batch(h, "VGGSmall")
        h = fields.hidden_dense(h, self.dense_features, train=train, norm_name="dense_norm")
        return fields.dense(self.num_classes, name="head")(h)
