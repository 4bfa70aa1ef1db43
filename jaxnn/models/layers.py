"""Building blocks shared by the models: their shared fields (checked and resolved in one place), normalisation
choice, parameter dtype, input checks, pooling.

Normalisation (``norm``):

* ``None`` — no normalisation layer.
* ``"batch"`` — batch norm (Ioffe & Szegedy 2015): y = γ (x − μ_B)/sqrt(σ²_B + ε) + β with μ_B, σ²_B the
  mean and the biased variance over the batch axis (and the spatial axes for conv features), per feature
  (channel). Train mode uses the batch statistics and updates the running averages
  r ← 0.9·r + 0.1·(batch statistic) (collection ``'batch_stats'``; the running variance averages the
  biased batch variance, where torch averages the unbiased one); eval mode uses the running averages.
  ε = 1e-5.
* ``"layer"`` — layer norm (Ba et al. 2016): the same formula with μ, σ² over all non-batch axes of each
  example (for conv features: height, width and channels), with a per-channel γ, β. No state.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from jaxnn.models.activations import resolve_activation
from jaxnn.models.initializers import Initializer, resolve_initializer
from jaxnn.validation import check_choice, check_float, check_int, check_kwargs_mapping

NORMALIZATIONS: tuple[str | None, ...] = (None, "batch", "layer")
"""Valid values of a model's ``norm``."""

BATCH_NORM_MOMENTUM = 0.9
"""Running-average decay: r ← momentum·r + (1 − momentum)·batch statistic (torch momentum 0.1)."""

NORM_EPSILON = 1e-5
"""ε added to the variance in batch and layer norm."""


class ReadsTokens:
    """Mixin of the models that read token ids from a ``vocab_size`` table: ``input_vocab_size`` is what ``fit``
    checks the data's ids against (None: the model reads float features)."""

    @property
    def input_vocab_size(self) -> int | None:
        return self.vocab_size


def token_ids(x: Any, vocab_size: int, owner: str) -> jax.Array:
    """``x`` as int32 token ids (batch, time), after checking its shape and (when concrete) that every id is in
    [0, vocab_size); each problem named in one line that starts with ``owner``."""
    if jnp.ndim(x) != 2:
        raise ValueError(f"{owner}: x: expected token ids of shape (batch, time), got shape {jnp.shape(x)}")
    if not isinstance(x, jax.core.Tracer) and jnp.size(x) and (jnp.min(x) < 0 or jnp.max(x) >= vocab_size):
        raise ValueError(f"{owner}: x: expected token ids in [0, {vocab_size}) (vocab_size), got ids in "
                         f"[{int(jnp.min(x))}, {int(jnp.max(x))}]")
    return jnp.asarray(x).astype(jnp.int32)


def default_param_dtype() -> jnp.dtype:
    """The default float dtype: float32, or float64 when ``jax_enable_x64`` is on."""
    return jnp.result_type(float)


def resolve_param_dtype(param_dtype: Any) -> jnp.dtype:
    """A model's ``param_dtype``: ``None`` means :func:`default_param_dtype` (decided at init/apply time)."""
    return default_param_dtype() if param_dtype is None else jnp.dtype(param_dtype)


def check_param_dtype(param_dtype: Any, owner: str) -> None:
    """Raise ``ValueError`` unless ``param_dtype`` is None or a floating dtype."""
    if param_dtype is None:
        return
    try:
        dtype = jnp.dtype(param_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{owner}: param_dtype must be None (the default float dtype) or a floating dtype; "
            f"got {param_dtype!r}"
        )


_BATCH_NORM_AXIS: contextvars.ContextVar = contextvars.ContextVar("jaxnn_batch_norm_axis", default=None)


@contextlib.contextmanager
def batch_norm_axis(axis_name: str | None):
    """Batch norm created while tracing inside this context averages its batch statistics over the named mapped
    axis (``shard_map``/``pmap``): the statistics of the global batch, as on one device. Parameters and state are
    the same with or without it."""
    token = _BATCH_NORM_AXIS.set(axis_name)
    try:
        yield
    finally:
        _BATCH_NORM_AXIS.reset(token)


def normalization_layer(
    norm: str | None, *, train: bool, input_ndim: int, param_dtype: Any, name: str | None = None
) -> nn.Module | None:
    """The normalisation module for ``norm`` (see the module docstring), or None for ``norm=None``.

    Must be called inside a compact ``__call__`` (it creates a submodule). ``input_ndim`` is the rank of the
    input including the batch axis: 2 for dense features, 4 for NHWC conv features.
    """
    if norm is None:
        return None
    if norm == "batch":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=NORM_EPSILON,
            param_dtype=param_dtype,
            # two-pass variance E[(x − μ)²] (more accurate than E[x²] − μ²), and running statistics kept in
            # param_dtype so they stay float64 under x64 instead of being forced to float32.
            use_fast_variance=False,
            force_float32_reductions=False,
            axis_name=_BATCH_NORM_AXIS.get(),
            name=name,
        )
    if norm == "layer":
        feature_axes = tuple(range(-(input_ndim - 1), 0))
        return nn.LayerNorm(
            epsilon=NORM_EPSILON,
            reduction_axes=feature_axes,
            feature_axes=-1,
            param_dtype=param_dtype,
            use_fast_variance=False,
            force_float32_reductions=False,
            name=name,
        )
    raise ValueError(f"norm must be one of {list(NORMALIZATIONS)}; got {norm!r}")


def check_image_batch(x: jax.Array, owner: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a 4-D NHWC batch of images."""
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"{owner}: x must be a batch of NHWC images of shape (batch, height, width, channels); "
            f"got shape {jnp.shape(x)}"
        )


def flatten_batch(x: jax.Array, owner: str) -> jax.Array:
    """Flatten every axis but the leading batch axis: (B, ...) -> (B, prod(...))."""
    if jnp.ndim(x) < 2:
        raise ValueError(
            f"{owner}: x must have a leading batch axis and at least one feature axis, "
            f"e.g. (batch, features) or (batch, height, width, channels); got shape {jnp.shape(x)}"
        )
    return jnp.reshape(x, (x.shape[0], -1))


def pool_2x2(x: jax.Array, kind: str) -> jax.Array:
    """2x2 pooling with stride 2 on NHWC features; odd sizes round up (a partial window at the edge).

    ``kind="max"``: max over the window; ``kind="avg"``: mean over the window's in-bounds entries.
    """
    if kind == "max":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    if kind == "avg":
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
    raise ValueError(f"pool must be one of ['max', 'avg']; got {kind!r}")


def freeze_fields(module: nn.Module, *, sequences: tuple[str, ...] = (), mappings: tuple[str, ...] = ()) -> None:
    """Store list fields as tuples and dict fields as FrozenDicts so the module is hashable (a valid static
    argument of ``jax.jit`` and of Flax transforms). Call in ``__post_init__`` after validation."""
    for field in sequences:
        object.__setattr__(module, field, tuple(getattr(module, field)))
    for field in mappings:
        value = getattr(module, field)
        if value is not None:
            object.__setattr__(module, field, FrozenDict(value))


OPTIONAL_SHARED_FIELDS: dict[str, Any] = {"bias_init": "zeros", "bias_init_kwargs": None, "dropout": 0.0}
"""Shared fields a model may leave out, with the value it then behaves as (CifarResNet: bias-free convs, no dropout).
The others (``num_classes``, ``activation``, ``kernel_init``, ``kernel_init_kwargs``, ``norm``, ``param_dtype``)
every model declares."""


def _shared_field(module: nn.Module, name: str) -> Any:
    if name in OPTIONAL_SHARED_FIELDS:
        return getattr(module, name, OPTIONAL_SHARED_FIELDS[name])
    return getattr(module, name)


def check_shared_fields(module: nn.Module) -> None:
    """Validate the fields every model shares and freeze its initializer kwargs; call in ``__post_init__``.

    Each model declares the fields itself (their order is its constructor's); this is the one place that checks
    them. Errors name the model class, the field, what was expected and what was given.
    """
    owner = type(module).__name__
    check_int(module.num_classes, f"{owner}: num_classes", allow_bool=False)
    resolve_activation(module.activation, owner)
    for argument in ("kernel_init", "bias_init"):
        kwargs = check_kwargs_mapping(_shared_field(module, f"{argument}_kwargs"), f"{owner}: {argument}_kwargs")
        resolve_initializer(_shared_field(module, argument), kwargs, argument, owner)
    check_choice(module.norm, f"{owner}: norm", choices=NORMALIZATIONS)
    check_float(_shared_field(module, "dropout"), f"{owner}: dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True,
                strict=True)
    check_param_dtype(module.param_dtype, owner)
    kwargs_fields = tuple(name for name in ("kernel_init_kwargs", "bias_init_kwargs") if hasattr(module, name))
    freeze_fields(module, mappings=kwargs_fields)


@dataclasses.dataclass(frozen=True)
class SharedFields:
    """A model's shared fields resolved into what its layers take, and the layers built from them.

    Made in ``__call__`` with :meth:`of` rather than stored at construction, so that ``param_dtype=None`` follows
    ``jax_enable_x64`` as it is when the model is initialised or applied.
    """

    activation: Callable[[jax.Array], jax.Array]
    kernel_init: Initializer
    bias_init: Initializer
    param_dtype: jnp.dtype
    norm: str | None
    dropout: float

    @classmethod
    def of(cls, module: nn.Module) -> SharedFields:
        """Resolve the shared fields of ``module`` (already checked by :func:`check_shared_fields`)."""
        owner = type(module).__name__
        return cls(
            activation=resolve_activation(module.activation, owner),
            kernel_init=resolve_initializer(module.kernel_init, module.kernel_init_kwargs, "kernel_init", owner),
            bias_init=resolve_initializer(
                _shared_field(module, "bias_init"), _shared_field(module, "bias_init_kwargs"), "bias_init", owner
            ),
            param_dtype=resolve_param_dtype(module.param_dtype),
            norm=module.norm,
            dropout=_shared_field(module, "dropout"),
        )

    def dense(self, features: int, *, name: str) -> nn.Dense:
        """A dense layer with the model's initializers and parameter dtype."""
        return nn.Dense(
            features, kernel_init=self.kernel_init, bias_init=self.bias_init, param_dtype=self.param_dtype, name=name
        )

    def conv(self, features: int, kernel_size: tuple[int, int], *, name: str, **options: Any) -> nn.Conv:
        """A convolution with the model's initializers and parameter dtype; ``options`` (padding, strides,
        use_bias) go to ``nn.Conv``."""
        return nn.Conv(
            features,
            kernel_size,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            param_dtype=self.param_dtype,
            name=name,
            **options,
        )

    def normalize(self, h: jax.Array, *, train: bool, name: str) -> jax.Array:
        """``h`` through the model's ``norm`` layer (see :func:`normalization_layer`), or ``h`` for ``norm=None``."""
        layer = normalization_layer(self.norm, train=train, input_ndim=h.ndim, param_dtype=self.param_dtype, name=name)
        return h if layer is None else layer(h)

    def hidden_dense(self, h: jax.Array, widths: Sequence[int], *, train: bool, norm_name: str) -> jax.Array:
        """Hidden layers h ← drop(act(norm(W h + b))) on (B, d) features, named ``dense_i``, ``{norm_name}_i`` and
        ``dropout_i``; dropout only when the rate is > 0 (train mode only, rng name ``"dropout"``)."""
        for i, width in enumerate(widths):
            h = self.normalize(self.dense(width, name=f"dense_{i}")(h), train=train, name=f"{norm_name}_{i}")
            h = self.activation(h)
            if self.dropout > 0.0:
                h = nn.Dropout(self.dropout, deterministic=not train, name=f"dropout_{i}")(h)
        return h
