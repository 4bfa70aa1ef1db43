"""Models by name (``model: resnet20`` plus ``model_kwargs`` in a config), initialisation and parameter counts.

Registered names:

* ``mlp`` — :class:`~jaxnn.models.MLP`; hidden widths as ``features=[...]`` or ``width`` (default 128) and
  ``depth`` (number of hidden layers, default 2; 0 is a linear model).
* ``lenet`` — :class:`~jaxnn.models.LeNet`.
* ``vgg_small`` — :class:`~jaxnn.models.VGGSmall`.
* ``rnn``, ``lstm``, ``gru`` — :class:`~jaxnn.models.RecurrentClassifier` with that cell (``recurrent`` takes
  ``cell``).
* ``transformer`` — :class:`~jaxnn.models.TransformerClassifier`; ``transformer_lm`` —
  :class:`~jaxnn.models.TransformerLM`, whose ``vocab_size`` is the data set's ``num_classes`` (its tokens).
* ``seq2seq`` — :class:`~jaxnn.models.Seq2Seq`, the encoder–decoder with attention.
* ``nnx_mlp``, ``nnx_lenet`` — the Flax NNX twins of ``mlp`` and ``lenet`` (:mod:`jaxnn.models.nnx`).
* ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110`` — :class:`~jaxnn.models.CifarResNet`
  with that depth; ``plain20`` ... ``plain110`` the same without shortcuts; ``resnet`` and ``plain`` take
  ``depth`` (6n+2) as a required kwarg.

Every other kwarg is a field of the model class (see its docstring), e.g.
``get_model("mlp", num_classes=10, width=128, depth=2, activation="tanh", kernel_init="glorot_normal")``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.runtime import quick_jit
from jaxnn.models.layers import default_param_dtype
from jaxnn.models.lenet import LeNet
from jaxnn.models.mlp import MLP
from jaxnn.models.recurrent import RecurrentClassifier
from jaxnn.models.resnet import RESNET_DEPTHS, CifarResNet
from jaxnn.models.seq2seq import Seq2Seq
from jaxnn.models.transformer import TransformerClassifier, TransformerLM
from jaxnn.models.vgg import VGGSmall
from jaxnn.validation import check_int

PyTree = Any


def _mlp_features_from_width_and_depth(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``width``/``depth`` -> ``features = (width,) * depth``; conflicting with an explicit ``features`` raises."""
    width = kwargs.pop("width", None)
    depth = kwargs.pop("depth", None)
    if "features" in kwargs:
        if width is not None or depth is not None:
            raise ValueError(
                "get_model('mlp'): give either features=[...] or width/depth, not both; "
                f"got features={kwargs['features']!r}, width={width!r}, depth={depth!r}"
            )
        return kwargs
    width = 128 if width is None else check_int(width, "get_model('mlp'): width", allow_bool=False)
    depth = 2 if depth is None else depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"get_model('mlp'): depth (number of hidden layers) must be an int >= 0; got {depth!r}")
    return {**kwargs, "features": (width,) * depth}


@dataclasses.dataclass(frozen=True)
class ModelFactory:
    """Registry entry: ``factory(num_classes=..., **kwargs)`` builds ``module(num_classes=..., **fixed, **kwargs)``.

    Attributes:
      name: the registry name (used in error messages).
      module: the Flax module class.
      fixed: fields this entry sets and a caller may not override (e.g. ``depth=20`` for ``resnet20``).
      required: kwargs the caller must give (e.g. ``depth`` for ``resnet``).
      extra_kwargs: kwargs that are not module fields; ``translate`` turns them into fields.
      translate: ``kwargs -> kwargs`` applied before building (e.g. MLP width/depth -> features).
      nnx: the name of an NNX twin in :mod:`jaxnn.models.nnx` (same fields as ``module``) to build instead,
        through :func:`jaxnn.models.nnx.from_nnx` (imported on first use: Flax NNX is not loaded otherwise).
      outputs_field: the module field that receives ``num_classes`` (``vocab_size`` for a language model, whose
        outputs are the data set's tokens).
    """

    name: str
    module: type[nn.Module]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()
    extra_kwargs: tuple[str, ...] = ()
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    nnx: str | None = None
    outputs_field: str = "num_classes"

    def accepted_kwargs(self) -> tuple[str, ...]:
        """The kwargs this entry accepts besides ``num_classes``."""
        fields = [
            f.name
            for f in dataclasses.fields(self.module)
            if f.init and f.name not in ("parent", "name", self.outputs_field) and f.name not in self.fixed
        ]
        return tuple(fields) + self.extra_kwargs

    def __call__(self, *, num_classes: int, **kwargs: Any) -> nn.Module:
        owner = f"get_model({self.name!r})"
        overridden = sorted(set(kwargs) & set(self.fixed))
        if overridden:
            raise TypeError(
                f"{owner}: keyword argument(s) {overridden} are fixed by this registry entry "
                f"({dict(self.fixed)}); use the generic entry (e.g. 'resnet' with depth=...) to change them"
            )
        accepted = self.accepted_kwargs()
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"{owner}: unknown keyword argument(s) {unknown}; accepted: {list(accepted)}")
        missing = [k for k in self.required if k not in kwargs]
        if missing:
            raise TypeError(f"{owner}: missing required keyword argument(s) {missing}")
        if self.translate is not None:
            kwargs = self.translate(dict(kwargs))
        if self.nnx is not None:
            from jaxnn.models import nnx as nnx_models

            return nnx_models.from_nnx(getattr(nnx_models, self.nnx), num_classes=num_classes, **self.fixed, **kwargs)
        return self.module(**{self.outputs_field: num_classes}, **self.fixed, **kwargs)


def _build_registry() -> dict[str, ModelFactory]:
    registry = {
        "mlp": ModelFactory(
            "mlp", MLP, extra_kwargs=("width", "depth"), translate=_mlp_features_from_width_and_depth
        ),
        "lenet": ModelFactory("lenet", LeNet),
        "nnx_mlp": ModelFactory(
            "nnx_mlp", MLP, extra_kwargs=("width", "depth"), translate=_mlp_features_from_width_and_depth, nnx="MLP"
        ),
        "nnx_lenet": ModelFactory("nnx_lenet", LeNet, nnx="LeNet"),
        "recurrent": ModelFactory("recurrent", RecurrentClassifier),
        "rnn": ModelFactory("rnn", RecurrentClassifier, fixed={"cell": "elman"}),
        "lstm": ModelFactory("lstm", RecurrentClassifier, fixed={"cell": "lstm"}),
        "gru": ModelFactory("gru", RecurrentClassifier, fixed={"cell": "gru"}),
        "transformer": ModelFactory("transformer", TransformerClassifier),
        "transformer_lm": ModelFactory("transformer_lm", TransformerLM, outputs_field="vocab_size"),
        "seq2seq": ModelFactory("seq2seq", Seq2Seq),
        "vgg_small": ModelFactory("vgg_small", VGGSmall),
        "resnet": ModelFactory("resnet", CifarResNet, fixed={"plain": False}, required=("depth",)),
        "plain": ModelFactory("plain", CifarResNet, fixed={"plain": True}, required=("depth",)),
    }
    for depth in RESNET_DEPTHS:
        registry[f"resnet{depth}"] = ModelFactory(
            f"resnet{depth}", CifarResNet, fixed={"depth": depth, "plain": False}
        )
        registry[f"plain{depth}"] = ModelFactory(f"plain{depth}", CifarResNet, fixed={"depth": depth, "plain": True})
    return registry


MODELS: dict[str, ModelFactory] = _build_registry()
"""Model name -> factory ``(num_classes=..., **kwargs) -> flax.linen.Module`` (see the module docstring)."""


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def get_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with ``num_classes`` outputs and the given fields.

    Raises ``ValueError`` for an unknown name (listing the valid names) or an invalid field value, and
    ``TypeError`` for a kwarg the model does not take (listing those it takes) or a missing required one.
    """
    if not isinstance(name, str):
        raise TypeError(f"get_model: name must be a str; got {name!r}")
    if name not in MODELS:
        raise ValueError(f"get_model: unknown model name {name!r}; valid names: {model_names()}")
    module = MODELS[name](num_classes=num_classes, **kwargs)
    # How it was built, so a run folder written by fit() can name it in config.yaml (see registry_spec).
    object.__setattr__(module, _SPEC_ATTRIBUTE, (name, dict(kwargs)))
    return module


_SPEC_ATTRIBUTE = "_jaxnn_registry_spec"


def registry_spec(module: Any) -> tuple[str, dict] | None:
    """``(name, kwargs)`` of a module built by :func:`get_model` (``num_classes`` apart), else None."""
    return getattr(module, _SPEC_ATTRIBUTE, None)


def _check_key(key: Any) -> None:
    is_typed_key = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    is_raw_key = (
        hasattr(key, "dtype") and hasattr(key, "shape") and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    )
    if not (is_typed_key and key.shape == ()) and not is_raw_key:
        shape = getattr(key, "shape", None)
        dtype = getattr(key, "dtype", type(key).__name__)
        raise TypeError(
            "init_model: key must be a single PRNG key (jax.random.key(seed), or a uint32 array of shape (2,) "
            f"from jax.random.PRNGKey); got {dtype} with shape {shape}"
        )


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape:
        raise ValueError(
            "init_model: input_shape must be a non-empty tuple of positive ints without the batch axis, "
            f"e.g. (28, 28, 1) for images or (64,) for vectors; got {input_shape!r}"
        )
    for size in input_shape:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(
                "init_model: input_shape must be a non-empty tuple of positive ints without the batch axis, "
                f"e.g. (28, 28, 1); got {input_shape!r} (bad entry {size!r})"
            )
    return tuple(int(size) for size in input_shape)


@quick_jit(static_argnums=0)  # runs once per model: compiled for speed of compilation
def _init_variables(model: nn.Module, key: jax.Array, dummy_batch: jax.Array) -> dict[str, PyTree]:
    return model.init({"params": key}, dummy_batch, train=False)


def init_model(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> tuple[PyTree, dict[str, PyTree]]:
    """Initialise ``model`` for inputs of shape ``(batch, *input_shape)``: returns ``(params, model_state)``.

    ``params`` is the ``'params'`` collection; ``model_state`` holds every other collection (e.g.
    ``{'batch_stats': ...}`` with batch norm) or is ``{}``. The parameters are drawn from ``key`` in one compiled
    ``model.init(..., train=False)`` on a zero batch of one example, in float32 (float64 under x64); the
    compiled program is cached per (model configuration, input shape), so further seeds reuse it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_model: model must be a flax.linen.Module (e.g. from get_model); got {model!r}")
    _check_key(key)
    input_shape = _check_input_shape(input_shape)
    dummy_batch = jnp.zeros((1, *input_shape), default_param_dtype())
    try:
        hash(model)
        init = functools.partial(_init_variables, model)  # compiled once per (model config, input shape)
    except TypeError:  # a user module with unhashable fields: compile for this call only
        init = quick_jit(lambda key, batch: model.init({"params": key}, batch, train=False))
    try:
        variables = init(key, dummy_batch)
    except ValueError as error:
        raise ValueError(
            f"init_model: {type(model).__name__} cannot take inputs of shape input_shape={input_shape} "
            f"(batch axis excluded): {error}"
        ) from error
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables


def count_params(params: PyTree) -> int:
    """Number of scalars in a parameter pytree: Σ_leaves prod(leaf.shape).

    Works on arrays and on ``jax.ShapeDtypeStruct`` leaves (e.g. the output of ``jax.eval_shape``), so large
    models can be counted without allocating them.
    """
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if hasattr(leaf, "shape"):
            total += math.prod(leaf.shape)
        elif isinstance(leaf, (int, float, complex, np.number)) and not isinstance(leaf, bool):
            total += 1
        else:
            raise TypeError(
                f"count_params: params leaves must be arrays or numbers; got {type(leaf).__name__} "
                f"at {jax.tree_util.keystr(path)}"
            )
    return int(total)
