"""Activation functions by name, taken from ``jax.nn``.

==============  ==========================================================
name            f(x)
==============  ==========================================================
``relu``        max(x, 0)
``tanh``        tanh(x)
``gelu``        x·Φ(x), Φ the standard normal CDF (exact, erf form; as torch)
``gelu_tanh``   the tanh approximation of gelu (``jax.nn.gelu`` default)
``sigmoid``     1/(1+e^−x)
``elu``         x if x > 0 else e^x − 1
``swish``       x·sigmoid(x)  (alias ``silu``)
``softplus``    log(1 + e^x)
``leaky_relu``  x if x ≥ 0 else 0.01·x
``identity``    x  (a deep linear network)
==============  ==========================================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

Activation = Callable[[jax.Array], jax.Array]

ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "tanh": jax.nn.tanh,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "swish": jax.nn.swish,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "leaky_relu": jax.nn.leaky_relu,
    "identity": jax.nn.identity,
}
"""Activation name -> elementwise function (see the table in the module docstring)."""


def get_activation(name: str) -> Activation:
    """Return the activation registered as ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"get_activation: name must be a str; got {name!r}")
    if name not in ACTIVATIONS:
        raise ValueError(
            f"get_activation: unknown activation name {name!r}; valid names: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def resolve_activation(spec: str | Activation, owner: str) -> Activation:
    """Turn a model's ``activation`` (a registry name or a callable) into a function."""
    if isinstance(spec, str):
        try:
            return get_activation(spec)
        except ValueError as error:
            raise ValueError(f"{owner}: activation={spec!r}: {error}") from None
    if callable(spec):
        return spec
    raise TypeError(
        f"{owner}: activation must be a name (one of {sorted(ACTIVATIONS)}) or a callable; got {spec!r}"
    )
