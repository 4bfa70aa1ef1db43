"""Weight initializers by name, built from ``jax.nn.initializers``.

Every entry of :data:`INITIALIZERS` is a factory ``factory(**kwargs) -> init`` where
``init(key, shape, dtype) -> array`` is a ``jax.nn.initializers.Initializer``. Fans follow the
Flax kernel layouts: a dense kernel is ``(fan_in, fan_out)`` and a conv kernel ``(kh, kw, c_in, c_out)``
has ``fan_in = kh·kw·c_in`` and ``fan_out = kh·kw·c_out``.

The "normal" variance-scaling initializers draw from an untruncated Gaussian, as in LeCun et al. (1998),
Glorot & Bengio (2010) and He et al. (2015) and like ``torch.nn.init.kaiming_normal_``
(``jax.nn.initializers.he_normal`` and friends truncate at two standard deviations instead).

==================  =========================================================  ============
name                distribution                                               kwargs
==================  =========================================================  ============
``lecun``           N(0, 1/fan_in)  (alias ``lecun_normal``)                   —
``lecun_uniform``   U(±sqrt(3/fan_in))                                         —
``glorot_normal``   N(0, 2/(fan_in+fan_out))                                   —
``glorot_uniform``  U(±sqrt(6/(fan_in+fan_out)))                               —
``he``              N(0, 2/fan)  (alias ``he_normal``)                         ``mode``
``he_uniform``      U(±sqrt(6/fan))                                            ``mode``
``orthogonal``      scale · (a uniformly random orthogonal matrix)             ``scale``
``small_normal``    N(0, sigma²)                                               ``sigma``
``constant``        every entry = value                                        ``value``
``zeros``           every entry = 0                                            —
``ones``            every entry = 1                                            —
==================  =========================================================  ============

For ``he``/``he_uniform``, ``mode`` is ``"fan_in"`` (default; preserves forward variance) or
``"fan_out"`` (preserves backward variance, the torchvision ResNet choice).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax

from jaxnn.validation import check_choice, check_float, check_positive_float

Initializer = jax.nn.initializers.Initializer

_FAN_MODES = ("fan_in", "fan_out")


def lecun() -> Initializer:
    """LeCun normal: w ~ N(0, 1/fan_in)."""
    return jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def lecun_uniform() -> Initializer:
    """LeCun uniform: w ~ U(−sqrt(3/fan_in), sqrt(3/fan_in)), variance 1/fan_in."""
    return jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def glorot_normal() -> Initializer:
    """Glorot (Xavier) normal: w ~ N(0, 2/(fan_in+fan_out))."""
    return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def glorot_uniform() -> Initializer:
    """Glorot (Xavier) uniform: w ~ U(±sqrt(6/(fan_in+fan_out)))."""
    return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def he(mode: str = "fan_in") -> Initializer:
    """He (Kaiming) normal: w ~ N(0, 2/fan) with fan = fan_in (default) or fan_out."""
    check_choice(mode, "get_initializer('he'): mode", choices=_FAN_MODES)
    return jax.nn.initializers.variance_scaling(2.0, mode, "normal")


def he_uniform(mode: str = "fan_in") -> Initializer:
    """He (Kaiming) uniform: w ~ U(±sqrt(6/fan)) with fan = fan_in (default) or fan_out."""
    check_choice(mode, "get_initializer('he_uniform'): mode", choices=_FAN_MODES)
    return jax.nn.initializers.variance_scaling(2.0, mode, "uniform")


def orthogonal(scale: float = 1.0) -> Initializer:
    """Orthogonal: the kernel reshaped to (fan_in, fan_out) has orthonormal rows or columns, times scale."""
    scale = check_positive_float(scale, "get_initializer('orthogonal'): scale", strict=True)
    return jax.nn.initializers.orthogonal(scale)


def small_normal(sigma: float = 0.01) -> Initializer:
    """Small Gaussian: w ~ N(0, sigma²), independent of the fans (default sigma = 0.01)."""
    sigma = check_positive_float(sigma, "get_initializer('small_normal'): sigma", strict=True)
    return jax.nn.initializers.normal(stddev=sigma)


def constant(value: float) -> Initializer:
    """Constant: every entry equals ``value`` (required)."""
    value = check_float(value, "get_initializer('constant'): value", strict=True)
    return jax.nn.initializers.constant(value)


def zeros() -> Initializer:
    """Zeros: every entry is 0."""
    return jax.nn.initializers.zeros


def ones() -> Initializer:
    """Ones: every entry is 1."""
    return jax.nn.initializers.ones


INITIALIZERS: dict[str, Callable[..., Initializer]] = {
    "lecun": lecun,
    "lecun_normal": lecun,
    "lecun_uniform": lecun_uniform,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
    "he": he,
    "he_normal": he,
    "he_uniform": he_uniform,
    "orthogonal": orthogonal,
    "small_normal": small_normal,
    "constant": constant,
    "zeros": zeros,
    "ones": ones,
}
"""Initializer name -> factory ``(**kwargs) -> jax.nn.initializers.Initializer``."""


def get_initializer(name: str, **kwargs: Any) -> Initializer:
    """Build the initializer registered as ``name`` with ``kwargs`` (see the table in the module docstring).

    Raises ``ValueError`` for an unknown name (listing the valid names) or an invalid kwarg value and
    ``TypeError`` for a kwarg the initializer does not take (listing those it takes).
    """
    if not isinstance(name, str):
        raise TypeError(f"get_initializer: name must be a str; got {name!r}")
    if name not in INITIALIZERS:
        raise ValueError(
            f"get_initializer: unknown initializer name {name!r}; valid names: {sorted(INITIALIZERS)}"
        )
    factory = INITIALIZERS[name]
    accepted = list(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"get_initializer({name!r}): unexpected keyword argument(s) {unknown}; "
            f"accepted: {accepted if accepted else 'none'}"
        )
    missing = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise TypeError(f"get_initializer({name!r}): missing required keyword argument(s) {missing}")
    return factory(**kwargs)


def resolve_initializer(
    spec: str | Initializer, kwargs: Any, argument: str, owner: str
) -> Initializer:
    """Turn a model's ``<argument>`` (a registry name or an initializer) plus its kwargs into an initializer.

    ``kwargs`` (a mapping or None) are only allowed together with a name.
    """
    if isinstance(spec, str):
        try:
            return get_initializer(spec, **dict(kwargs or {}))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{owner}: {argument}={spec!r}: {error}") from None
    if callable(spec):
        if kwargs:
            raise TypeError(
                f"{owner}: {argument}_kwargs can only be given with a named {argument}; "
                f"got a callable {argument} and {argument}_kwargs={dict(kwargs)!r}"
            )
        return spec
    raise TypeError(
        f"{owner}: {argument} must be an initializer name (one of {sorted(INITIALIZERS)}) or a "
        f"callable init(key, shape, dtype); got {spec!r}"
    )
