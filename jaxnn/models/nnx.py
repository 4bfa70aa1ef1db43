"""Flax NNX models through the same engines as the Linen ones.

jaxnn's training, curvature and landscape code calls a model as Linen does (``init``/``apply`` on a variables dict,
``train=``, ``rngs={'dropout': ...}``, ``mutable=['batch_stats']``). :func:`from_nnx` puts an NNX module class behind
that convention with Flax's own bridge (``flax.nnx.bridge.ToLinen``): the NNX module is built from the init key
(so every seed of a population draws its own weights), its ``nnx.Param`` variables become the ``'params'`` collection
and its ``nnx.BatchStat`` ones ``'batch_stats'``, and each call switches it to train or eval mode
(``module.train()``/``module.eval()``: dropout on/off, batch statistics or running averages)::

    class Net(nnx.Module):
        def __init__(self, input_shape, *, rngs):
            self.dense = nnx.Linear(int(np.prod(input_shape)), 10, rngs=rngs)
        def __call__(self, x):
            return self.dense(x.reshape(len(x), -1))

    model = jaxnn.models.from_nnx(Net)            # a class (or any callable) taking rngs=
    state = jaxnn.train.create_train_state(model, optax.adam(1e-3), ds.input_shape, jax.random.key(0))

A class whose ``__init__`` takes ``input_shape`` gets the input's shape without the batch axis (NNX layers need
their input sizes when they are built); one whose ``__call__`` takes ``train`` gets the mode as an argument too. The
parameters sit under ``params['nnx']['module']``.

:class:`MLP` and :class:`LeNet` here are the NNX twins of :class:`jaxnn.models.MLP` and
:class:`jaxnn.models.LeNet`: the same layers, names, initializers and normalisation, so with the same weights they
compute the same function without dropout (the tests train both to the same parameters; with dropout the masks are
drawn differently); the registry has them as ``nnx_mlp`` and ``nnx_lenet``. What finds layers by Linen's method interception sees no layers inside an NNX model: K-FAC (and the
K-FAC preconditioner) raises "found no Dense or 2-D Conv layer", a population refuses per-member dropout rates ("the
model has no dropout layer"), and the per-layer activation statistics are empty (the per-parameter gradient
statistics are there, named ``nnx/module/...``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from jaxnn.models.activations import resolve_activation
from jaxnn.models.initializers import resolve_initializer
from jaxnn.models.layers import (
    _BATCH_NORM_AXIS,
    BATCH_NORM_MOMENTUM,
    NORM_EPSILON,
    NORMALIZATIONS,
    check_image_batch,
    flatten_batch,
    pool_2x2,
    resolve_param_dtype,
)
from jaxnn.validation import WrongTypeError, check_choice, check_float, check_int, check_int_sequence


def _takes(function: Callable, argument: str) -> bool:
    """Whether ``function`` (for a class: its ``__init__``; NNX's metaclass hides the signature) names ``argument``."""
    if isinstance(function, type):
        function = function.__init__
    try:
        return argument in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


class _Mode(nnx.Module):
    """The user's NNX module, switched to train or eval mode on every call."""

    def __init__(self, build: Callable[..., nnx.Module], kwargs: Mapping[str, Any], *, rngs: nnx.Rngs):
        streams = {name: stream for name, stream in vars(rngs).items() if isinstance(stream, nnx.RngStream)}
        if "default" not in streams and "params" in streams:
            # Initialisation brings a 'params' key only, but an nnx.Dropout takes its stream when it is built (the
            # stream is not part of the stored state; training calls bring their own 'dropout' key), and a module
            # may draw weights from rngs() itself: a default stream derived from the init key, so seeds differ.
            keys = {name: stream.key[...] for name, stream in streams.items()}
            rngs = nnx.Rngs(default=jax.random.fold_in(keys["params"], 1), **keys)
        self.module = build(**kwargs, rngs=rngs)
        self.takes_train = _takes(type(self.module).__call__, "train")

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if train:
            self.module.train()
        else:
            self.module.eval()
        return self.module(x, train=train) if self.takes_train else self.module(x)


class FromNNX(nn.Module):
    """A Linen module around an NNX module built by ``build(**kwargs, rngs=...)`` (see the module docstring)."""

    build: Callable[..., nnx.Module]
    kwargs: FrozenDict = FrozenDict()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kwargs = dict(self.kwargs)
        if _takes(self.build, "input_shape"):
            kwargs["input_shape"] = tuple(int(n) for n in x.shape[1:])
        bridge = nnx.bridge.ToLinen(_Mode, kwargs=FrozenDict(build=self.build, kwargs=FrozenDict(kwargs)), name="nnx")
        return bridge(x, train=train)


def from_nnx(build: Callable[..., nnx.Module], **kwargs: Any) -> FromNNX:
    """``build`` (an NNX module class, or a function returning a module, taking ``rngs=``) with ``kwargs`` as a model
    jaxnn trains and analyses like a Linen one (see the module docstring). An instance is refused: its weights
    are drawn already, so seeds could not vary them."""
    if isinstance(build, nnx.Module):
        raise WrongTypeError(f"from_nnx: build: expected an NNX module class (or a function taking rngs=) so that each "
                             f"seed draws its own weights, got an instance of {type(build).__name__}; pass "
                             f"{type(build).__name__} and its arguments: from_nnx({type(build).__name__}, ...)")
    if not callable(build):
        raise WrongTypeError(f"from_nnx: build: expected an NNX module class, got {type(build).__name__}")
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return FromNNX(build, FrozenDict(frozen))


class _Fields:
    """The shared model fields resolved as :class:`jaxnn.models.layers.SharedFields` does for Linen."""

    def __init__(self, owner: str, activation, kernel_init, kernel_init_kwargs, bias_init, bias_init_kwargs, norm,
                 dropout, param_dtype):
        check_choice(norm, f"{owner}: norm", choices=NORMALIZATIONS)
        self.dropout = check_float(dropout, f"{owner}: dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True,
                                   strict=True)
        self.activation = resolve_activation(activation, owner)
        self.kernel_init = resolve_initializer(kernel_init, kernel_init_kwargs, "kernel_init", owner)
        self.bias_init = resolve_initializer(bias_init, bias_init_kwargs, "bias_init", owner)
        self.param_dtype = resolve_param_dtype(param_dtype)
        self.norm = norm

    def dense(self, fan_in: int, fan_out: int, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(fan_in, fan_out, kernel_init=self.kernel_init, bias_init=self.bias_init,
                          param_dtype=self.param_dtype, rngs=rngs)

    def normalization(self, features: int, shape: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module | None:
        """Batch or layer norm over ``features`` for inputs of per-example ``shape`` (as the Linen models)."""
        if self.norm == "batch":
            norm = nnx.BatchNorm(features, momentum=BATCH_NORM_MOMENTUM, epsilon=NORM_EPSILON,
                                 param_dtype=self.param_dtype, use_fast_variance=False,
                                 axis_name=_BATCH_NORM_AXIS.get(), rngs=rngs)
            # nnx.BatchNorm keeps its running statistics in float32 whatever param_dtype is; the Linen models keep
            # them in param_dtype (float64 under x64), and so does the twin.
            norm.mean = nnx.BatchStat(jnp.zeros(features, self.param_dtype))
            norm.var = nnx.BatchStat(jnp.ones(features, self.param_dtype))
            return norm
        if self.norm == "layer":
            return nnx.LayerNorm(features, epsilon=NORM_EPSILON, reduction_axes=tuple(range(-len(shape), 0)),
                                 feature_axes=-1, param_dtype=self.param_dtype, use_fast_variance=False, rngs=rngs)
        return None

    def hidden(self, module: nnx.Module, fan_in: int, widths: Sequence[int], norm_name: str, rngs: nnx.Rngs) -> None:
        """Hidden dense layers ``dense_i`` (with ``{norm_name}_i`` and ``dropout_i``) on ``module``."""
        for i, width in enumerate(widths):
            setattr(module, f"dense_{i}", self.dense(fan_in, width, rngs))
            norm = self.normalization(width, (width,), rngs)
            if norm is not None:
                setattr(module, f"{norm_name}_{i}", norm)
            if self.dropout > 0.0:
                setattr(module, f"dropout_{i}", nnx.Dropout(self.dropout, rngs=rngs))
            fan_in = width

    def run_hidden(self, module: nnx.Module, h: jax.Array, count: int, norm_name: str, train: bool) -> jax.Array:
        for i in range(count):
            h = getattr(module, f"dense_{i}")(h)
            if self.norm is not None:
                h = getattr(module, f"{norm_name}_{i}")(h)
            h = self.activation(h)
            if self.dropout > 0.0:
                h = getattr(module, f"dropout_{i}")(h, deterministic=not train)
        return h


class MLP(nnx.Module):
    """The NNX twin of :class:`jaxnn.models.MLP` (same fields, layer names ``dense_i``, ``norm_i``, ``head``)."""

    def __init__(self, input_shape: Sequence[int], features: Sequence[int], num_classes: int, *,
                 activation="relu", kernel_init="he", kernel_init_kwargs=None, bias_init="zeros",
                 bias_init_kwargs=None, norm: str | None = None, dropout: float = 0.0, param_dtype=None,
                 rngs: nnx.Rngs):
        self.features = check_int_sequence(features, "nnx MLP: features")
        num_classes = check_int(num_classes, "nnx MLP: num_classes", allow_bool=False)
        fan_in = 1
        for size in input_shape:
            fan_in *= int(size)
        self.fields = _Fields("nnx MLP", activation, kernel_init, kernel_init_kwargs, bias_init, bias_init_kwargs,
                              norm, dropout, param_dtype)
        self.fields.hidden(self, fan_in, self.features, "norm", rngs)
        self.head = self.fields.dense(self.features[-1] if self.features else fan_in, num_classes, rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = self.fields.run_hidden(self, flatten_batch(x, "nnx MLP"), len(self.features), "norm", train)
        return self.head(h)


class LeNet(nnx.Module):
    """The NNX twin of :class:`jaxnn.models.LeNet` (same fields and geometry; layers ``conv_i``, ``conv_norm_i``,
    ``dense_i``, ``dense_norm_i``, ``head``)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, conv_features: Sequence[int] = (6, 16),
                 dense_features: Sequence[int] = (120, 84), kernel_size: int = 5, padding: str = "SAME",
                 pool: str = "max", activation="relu", kernel_init="he", kernel_init_kwargs=None,
                 bias_init="zeros", bias_init_kwargs=None, norm: str | None = None, dropout: float = 0.0,
                 param_dtype=None, rngs: nnx.Rngs):
        self.conv_features = check_int_sequence(conv_features, "nnx LeNet: conv_features", allow_empty=False)
        self.dense_features = check_int_sequence(dense_features, "nnx LeNet: dense_features")
        k = self.kernel_size = check_int(kernel_size, "nnx LeNet: kernel_size", allow_bool=False)
        self.padding = check_choice(padding, "nnx LeNet: padding", choices=("SAME", "VALID"))
        self.pool = check_choice(pool, "nnx LeNet: pool", choices=("max", "avg"))
        num_classes = check_int(num_classes, "nnx LeNet: num_classes", allow_bool=False)
        if len(input_shape) != 3:
            raise ValueError(f"nnx LeNet: input_shape: expected (height, width, channels), got {tuple(input_shape)}")
        self.fields = _Fields("nnx LeNet", activation, kernel_init, kernel_init_kwargs, bias_init, bias_init_kwargs,
                              norm, dropout, param_dtype)
        height, width, channels = (int(n) for n in input_shape)
        conv_padding = "VALID" if padding == "VALID" else [(k // 2, (k - 1) // 2)] * 2
        for i, out in enumerate(self.conv_features):
            if padding == "VALID":
                if min(height, width) < k:
                    raise ValueError(f"nnx LeNet: with padding='VALID' conv layer {i} needs inputs of at least "
                                     f"{k}x{k}; its input is {height}x{width}")
                height, width = height - k + 1, width - k + 1
            setattr(self, f"conv_{i}", nnx.Conv(channels, out, (k, k), padding=conv_padding,
                                                kernel_init=self.fields.kernel_init, bias_init=self.fields.bias_init,
                                                param_dtype=self.fields.param_dtype, rngs=rngs))
            norm = self.fields.normalization(out, (height, width, out), rngs)
            if norm is not None:
                setattr(self, f"conv_norm_{i}", norm)
            height, width, channels = -(-height // 2), -(-width // 2), out
        fan_in = height * width * channels
        self.fields.hidden(self, fan_in, self.dense_features, "dense_norm", rngs)
        self.head = self.fields.dense(self.dense_features[-1] if self.dense_features else fan_in, num_classes, rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_image_batch(x, "nnx LeNet")
        h = x
        for i in range(len(self.conv_features)):
            h = getattr(self, f"conv_{i}")(h)
            if self.fields.norm is not None:
                h = getattr(self, f"conv_norm_{i}")(h)
            h = pool_2x2(self.fields.activation(h), self.pool)
        h = self.fields.run_hidden(self, flatten_batch(h, "nnx LeNet"), len(self.dense_features), "dense_norm", train)
        return self.head(h)
