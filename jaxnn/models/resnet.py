"""CIFAR ResNet-(6n+2) (He et al. 2016, "Deep Residual Learning", section 4.2) and its plain counterpart.

Architecture: a 3x3 conv with w filters (w = ``base_width`` = 16), then three stages of n basic blocks with
w, 2w, 4w filters on feature maps of size s, s/2, s/4 (the first block of stages 2 and 3 has stride 2),
global average pooling and a dense layer: 6n + 2 weighted layers. Shortcuts are parameter-free identities
(option A): when a block halves the map and doubles the channels, the shortcut takes every second pixel
and zero-pads the new channels. Hence the plain network (no shortcuts) has exactly the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnn.models.layers import SharedFields, check_image_batch, check_shared_fields, normalization_layer
from jaxnn.validation import check_int

RESNET_DEPTHS = (20, 32, 44, 56, 110)
"""The depths of He et al. (2016), Table 6; any 6n + 2 (n ≥ 1) is accepted."""


def resnet_blocks_per_stage(depth: Any, owner: str = "CifarResNet") -> int:
    """n for a CIFAR ResNet of depth 6n + 2 (e.g. 20 -> 3, 110 -> 18); other depths raise ``ValueError``."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"{owner}: depth must be an int of the form 6n+2 with n >= 1 (8, 14, 20, 26, 32, 44, 56, 110, ...); "
            f"got {depth!r}"
        )
    return (depth - 2) // 6


def option_a_shortcut(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Parameter-free shortcut (He et al. 2016, option A): x[:, ::stride, ::stride, :] with the channels
    zero-padded from c to ``features`` (⌊(features−c)/2⌋ zero channels before, the rest after). Identity
    when stride = 1 and c = features."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"option_a_shortcut: features must be >= the input channels {x.shape[-1]}; got {features}"
        )
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nn.Module):
    """y = act(norm₂(conv₂(act(norm₁(conv₁(x))))) + shortcut(x)), or without ``+ shortcut(x)`` when ``plain``.

    conv₁ is 3x3 with ``stride``, conv₂ 3x3 with stride 1; both have ``features`` filters, symmetric zero
    padding 1 and no bias. The shortcut is :func:`option_a_shortcut`.
    """

    features: int
    stride: int
    plain: bool
    norm: str | None
    activation: Callable[[jax.Array], jax.Array]
    kernel_init: Callable[..., jax.Array]
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv(h: jax.Array, stride: int, name: str) -> jax.Array:
            return nn.Conv(
                self.features,
                (3, 3),
                strides=(stride, stride),
                padding=[(1, 1), (1, 1)],
                use_bias=False,
                kernel_init=self.kernel_init,
                param_dtype=self.param_dtype,
                name=name,
            )(h)

        def norm(h: jax.Array, name: str) -> jax.Array:
            layer = normalization_layer(
                self.norm, train=train, input_ndim=4, param_dtype=self.param_dtype, name=name
            )
            return h if layer is None else layer(h)

        h = self.activation(norm(conv(x, self.stride, "conv1"), "norm1"))
        h = norm(conv(h, 1, "conv2"), "norm2")
        if not self.plain:
            h = h + option_a_shortcut(x, self.features, self.stride)
        return self.activation(h)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): conv3x3(w) → norm → act → 3 stages × n :class:`BasicBlock` (w, 2w, 4w filters)
    → global average pool → dense(num_classes).

    ResNet-20 (n = 3, w = 16) with batch norm has 269,722 parameters. Forward cost per example on an s×s
    image: ≈ 9·s²·w²·6n multiply-adds (every stage costs about the same; ≈ 41M for ResNet-20 on 32x32).

    Attributes:
      num_classes: output width.
      depth: 6n + 2 (20, 32, 44, 56, 110, ...; see :func:`resnet_blocks_per_stage`).
      plain: drop the shortcuts (the "plain" networks of He et al.); same parameters.
      norm: ``"batch"`` (default), ``"layer"`` or ``None``. Convolutions never have biases, so ``norm=None``
        removes exactly the normalisation parameters (and the ``batch_stats`` state).
      base_width: filters of the first stage, w (default 16); stages have w, 2w, 4w.
      activation: as in :class:`MLP` (default relu).
      kernel_init, kernel_init_kwargs: initializer of every conv and the dense kernel (default ``"he"``,
        N(0, 2/fan_in)); the dense bias starts at zero.
      param_dtype: parameter dtype; ``None`` = float32, or float64 under ``jax_enable_x64``.
    """

    num_classes: int
    depth: int = 20
    plain: bool = False
    norm: str | None = "batch"
    base_width: int = 16
    activation: str | Callable[[jax.Array], jax.Array] = "relu"
    kernel_init: str | Callable[..., jax.Array] = "he"
    kernel_init_kwargs: Mapping[str, Any] | None = None
    param_dtype: Any = None

    def __post_init__(self) -> None:
        resnet_blocks_per_stage(self.depth)
        if not isinstance(self.plain, bool):
            raise ValueError(f"CifarResNet: plain must be a bool; got {self.plain!r}")
        check_int(self.base_width, "CifarResNet: base_width", allow_bool=False)
        check_shared_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for NHWC images (B, H, W, C); ``train`` selects batch statistics."""
        check_image_batch(x, "CifarResNet")
        blocks = resnet_blocks_per_stage(self.depth)
        fields = SharedFields.of(self)

        h = fields.conv(self.base_width, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False, name="stem_conv")(x)
        h = fields.activation(fields.normalize(h, train=train, name="stem_norm"))
        for stage, multiplier in enumerate((1, 2, 4)):
            for block in range(blocks):
                h = BasicBlock(
                    features=self.base_width * multiplier,
                    stride=2 if stage > 0 and block == 0 else 1,
                    plain=self.plain,
                    norm=self.norm,
                    activation=fields.activation,
                    kernel_init=fields.kernel_init,
                    param_dtype=fields.param_dtype,
                    name=f"stage{stage + 1}_block{block}",
                )(h, train)
        h = jnp.mean(h, axis=(1, 2))
        return fields.dense(self.num_classes, name="head")(h)  # no bias_init field: the bias starts at zero
