"""Argument checks shared by the model modules and factories.

Every check runs on Python values before any tracing and raises an error that names the owner
(``MLP``, ``get_model('resnet')``, ...), the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def check_positive_int(value: Any, argument: str, owner: str) -> int:
    """Return ``value`` if it is an int ≥ 1 (bools are rejected), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {argument} must be a positive int; got {value!r}")
    return value


def check_positive_int_sequence(
    value: Any, argument: str, owner: str, *, allow_empty: bool = True
) -> tuple[int, ...]:
    """Return ``value`` as a tuple if it is a sequence of ints ≥ 1, else raise ``ValueError``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{owner}: {argument} must be a sequence of positive ints; got {value!r}"
        )
    items = tuple(value)
    if not allow_empty and not items:
        raise ValueError(f"{owner}: {argument} must not be empty; got {value!r}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(
                f"{owner}: {argument} must be a sequence of positive ints; "
                f"got {value!r} (bad entry {item!r})"
            )
    return items


def check_choice(value: Any, argument: str, owner: str, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {argument} must be one of {list(choices)}; got {value!r}")
    return value


def check_rate(value: Any, argument: str, owner: str) -> float:
    """Return ``value`` if it is a finite real number in [0, 1), else raise ``ValueError``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 <= value < 1.0
    ):
        raise ValueError(f"{owner}: {argument} must be a float in [0, 1); got {value!r}")
    return float(value)


def check_finite_real(value: Any, argument: str, owner: str, *, positive: bool = False) -> float:
    """Return ``value`` if it is a finite real number (> 0 when ``positive``), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        kind = "a finite positive number" if positive else "a finite number"
        raise ValueError(f"{owner}: {argument} must be {kind}; got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{owner}: {argument} must be a finite positive number; got {value!r}")
    return float(value)


def check_kwargs_mapping(value: Any, argument: str, owner: str) -> dict[str, Any]:
    """Return ``value`` as a dict if it is ``None`` or a mapping with str keys, else raise ``TypeError``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(
            f"{owner}: {argument} must be a mapping of keyword arguments (str keys) or None; "
            f"got {value!r}"
        )
    return dict(value)


def check_name_or_callable(value: Any, argument: str, owner: str) -> str | Callable[..., Any]:
    """Return ``value`` if it is a str (a registry name) or a callable, else raise ``TypeError``."""
    if not (isinstance(value, str) or callable(value)):
        raise TypeError(f"{owner}: {argument} must be a name (str) or a callable; got {value!r}")
    return value
