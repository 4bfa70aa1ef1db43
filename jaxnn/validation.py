"""Argument checks shared by the whole package (data, models, curvature, landscape, training), and
:func:`merge_options`, the one way a function takes an options object and the same options as keywords.

One convention for every check: ``check_something(value, name, *, options...)``. ``name`` is the whole label printed
first — an argument (``"k"``), a leaf (``"metric_fns['acc']"``) or an owner and an argument
(``"MLP: features"``, ``f"{owner}: {argument}"``) — and every message reads ``"{name}: expected <what>, got <what was
given>"``. A check returns the value it accepted, converted where that is its job (an int, a float, a tuple, a pytree
of jax arrays cast to the reference dtypes).

Which error: a value of the wrong kind (a str for an int, a bool where ``allow_bool=False``, a non-mapping for
keyword arguments, an integer dtype for parameters, a non-callable for a function) raises :class:`WrongTypeError`; a
value of the right kind that is out of range or of the wrong shape or structure raises ``ValueError``.
``WrongTypeError`` is a ``TypeError`` *and* a ``ValueError``: TypeError is the right class for a wrong type (the
curvature and landscape rule, kept), and ValueError is kept because the model constructors' public API raised
ValueError for any bad argument and its tests rely on it (``get_model(name, num_classes="10" / True / None / 2.0)``
and ``get_initializer("small_normal", sigma="0.1" / True)``). So a ``pytest.raises``/``except`` for either class
still catches what it did; an ``except ValueError`` now also catches the wrong types of the data, curvature and
landscape checks (the CLI reports them as one line, exit status 2, where they were tracebacks), and an
``except TypeError`` the models' (the sweep's dropout probe re-raises those). Integers and reals are taken as
``operator.index``/``numbers.Real`` do: numpy integers and floats pass (before the merge the model checks wanted
Python ``int``/``float``).

Structure, shape and dtype checks are free inside ``jit`` and never synchronise with the device; the value checks
(:func:`check_finite_tree`, :func:`check_direction`) pull one scalar per leaf to the host, once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnn.runtime import quick_jit


class WrongTypeError(TypeError, ValueError):
    """A value of the wrong type: a ``TypeError``, and a ``ValueError`` too (see the module docstring)."""


def _got(value: Any) -> str:
    """``str '10'``: the given value's type and repr, for a wrong-type message."""
    return f"{type(value).__name__} {value!r}"


# ----------------------------------------------------------------------------------------------- pytree helpers


def leaf_paths(tree: Any) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf (``'<root>'`` for a bare array)."""
    paths_and_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) or "<root>" for path, _ in paths_and_leaves]


def num_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in jax.tree.leaves(params)))


@quick_jit
def _nonfinite_counts_and_norm(leaves: list) -> tuple[list, jax.Array]:
    counts = [jnp.sum(~jnp.isfinite(leaf)) if jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.int32(0)
              for leaf in leaves]
    floating = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    norm = jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in floating)) if floating else jnp.float32(0)
    return counts, norm


def _in_host_memory(leaf: Any) -> bool:
    """A numpy value, or a jax array whose every shard this process holds in CPU memory (numpy reads it in place)."""
    if isinstance(leaf, (np.ndarray, np.generic, int, float)):
        return True
    return (isinstance(leaf, jax.Array) and leaf.is_fully_addressable
            and all(device.platform == "cpu" for device in leaf.devices()))


def nonfinite_counts_and_norm(tree: Any) -> tuple[list[int], float]:
    """Per-leaf number of NaN/inf entries and the Euclidean norm of the floating leaves: in numpy when every leaf
    is in host memory (data batches, parameters on CPU: no program to compile, ~0.3 s each on CPU), else one compiled
    call on the device."""
    leaves = jax.tree.leaves(tree)
    if all(_in_host_memory(leaf) for leaf in leaves):
        arrays = [np.asarray(leaf) for leaf in leaves]
        inexact = [a for a in arrays if np.issubdtype(a.dtype, np.inexact)]
        counts = [int(np.count_nonzero(~np.isfinite(a))) if np.issubdtype(a.dtype, np.inexact) else 0 for a in arrays]
        return counts, float(np.sqrt(sum(float(np.vdot(a, a).real) for a in inexact)))
    counts, norm = _nonfinite_counts_and_norm([jnp.asarray(leaf) for leaf in leaves])
    return [int(c) for c in counts], float(norm)


def key_description(key: jax.Array) -> list[int]:
    """The key's raw bits as a JSON-able list (enough to rebuild it with ``jax.random.wrap_key_data``)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key).reshape(-1)]


# ----------------------------------------------------------------------------------------------- scalars


def check_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None, maximum_name: str = "",
              allow_bool: bool = True) -> int:
    """Return ``value`` as an int in ``[minimum, maximum]`` (anything ``operator.index`` takes: an int, a numpy
    integer, a 0-d integer array); raise naming the bound otherwise.

    With ``allow_bool=False`` a bool (an int subclass) is refused too. ``maximum_name`` names the bound in the
    message (``"k: expected at most num_params=3, got 4"``).
    """
    expected = f"an integer >= {minimum}"
    if not allow_bool and isinstance(value, bool):
        raise WrongTypeError(f"{name}: expected {expected}, got {_got(value)}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise WrongTypeError(f"{name}: expected {expected}, got {_got(value)}") from None
    if as_int < minimum:
        raise ValueError(f"{name}: expected {expected}, got {as_int}")
    if maximum is not None and as_int > maximum:
        bound = f"{maximum_name}={maximum}" if maximum_name else str(maximum)
        raise ValueError(f"{name}: expected at most {bound}, got {as_int}")
    return as_int


def check_int_sequence(value: Any, name: str, *, minimum: int = 1, allow_empty: bool = True) -> tuple[int, ...]:
    """Return ``value`` (a list or tuple, not a str) as a tuple of ints >= ``minimum``; bools are refused.

    With ``allow_empty=False`` an empty sequence is refused too.
    """
    expected = f"a sequence of integers >= {minimum}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise WrongTypeError(f"{name}: expected {expected}, got {_got(value)}")
    items = tuple(value)
    if not allow_empty and not items:
        raise ValueError(f"{name}: expected a non-empty {expected[2:]}, got {value!r}")
    checked = []
    for index, item in enumerate(items):
        try:
            as_int = None if isinstance(item, bool) else operator.index(item)
        except TypeError:
            as_int = None
        if as_int is None:
            raise WrongTypeError(f"{name}: expected {expected}, got {value!r} (entry {index} is {_got(item)})")
        if as_int < minimum:
            raise ValueError(f"{name}: expected {expected}, got {value!r} (entry {index} is {item!r})")
        checked.append(as_int)
    return tuple(checked)


def _interval(minimum: float | None, maximum: float | None, exclusive_minimum: bool, exclusive_maximum: bool) -> str:
    """The bounds in words: ``> 0``, ``>= 0``, ``< 1``, ``in [0, 1)``, or nothing."""
    if minimum is not None and maximum is not None:
        return f" in {'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}{')' if exclusive_maximum else ']'}"
    if minimum is not None:
        return f" {'>' if exclusive_minimum else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if exclusive_maximum else '<='} {maximum:g}"
    return ""


def check_float(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                exclusive_minimum: bool = False, exclusive_maximum: bool = False, strict: bool = False) -> float:
    """Return ``value`` as a finite float within the bounds (each inclusive unless ``exclusive_*``).

    By default anything ``float()`` converts is taken (a numpy scalar, a 0-d array, a bool, a numeric str).
    With ``strict=True`` only a real number proper is (``numbers.Real``: int, float, numpy scalars; not a bool).
    """
    expected = "a finite number" + _interval(minimum, maximum, exclusive_minimum, exclusive_maximum)
    if strict and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise WrongTypeError(f"{name}: expected {expected}, got {_got(value)}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise WrongTypeError(f"{name}: expected {expected}, got {_got(value)}") from None
    if (not math.isfinite(as_float)
            or (minimum is not None and (as_float <= minimum if exclusive_minimum else as_float < minimum))
            or (maximum is not None and (as_float >= maximum if exclusive_maximum else as_float > maximum))):
        raise ValueError(f"{name}: expected {expected}, got {as_float}")
    return as_float


def check_positive_float(value: Any, name: str, *, allow_zero: bool = False, strict: bool = False) -> float:
    """:func:`check_float` with ``minimum=0``: a finite float > 0 (or >= 0 with ``allow_zero``)."""
    return check_float(value, name, minimum=0.0, exclusive_minimum=not allow_zero, strict=strict)


def check_choice(value: Any, name: str, *, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; the message lists them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_kwargs_mapping(value: Any, name: str) -> dict[str, Any]:
    """Return ``value`` as a dict if it is ``None`` (``{}``) or a mapping with str keys."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise WrongTypeError(f"{name}: expected a mapping of keyword arguments (str keys) or None, got {value!r}")
    return dict(value)


def check_key(key: Any, name: str = "key", *, allow_int_seed: bool = False) -> jax.Array:
    """Accept a typed key (``jax.random.key``) or a raw uint32 key (``jax.random.PRNGKey``).

    With ``allow_int_seed=True`` a Python/numpy int (not a bool) is accepted too and becomes ``jax.random.key(seed)``.
    """
    seed_hint = " or an int seed" if allow_int_seed else ""
    if key is None:
        raise WrongTypeError(f"{name}: expected a PRNG key (jax.random.key(seed)){seed_hint}, got None")
    if allow_int_seed and isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    kinds = ("typed key, uint32 array of shape (2,), or int seed" if allow_int_seed
             else "typed key, or uint32 array of shape (2,)")
    if not isinstance(key, jax.Array):
        try:
            key = jnp.asarray(key)
        except TypeError:
            raise WrongTypeError(f"{name}: expected a PRNG key ({kinds}), got {_got(key)}") from None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name}: expected a single PRNG key of shape (), got shape {key.shape}")
        return key
    if key.dtype != jnp.uint32 or key.shape != (2,):
        error = WrongTypeError if key.dtype != jnp.uint32 else ValueError
        raise error(f"{name}: expected a PRNG key ({kinds}), got dtype {key.dtype} shape {key.shape}")
    return key


# ----------------------------------------------------------------------------------------------- pytrees


def check_finite_tree(tree: Any, name: str, *, what: str = "NaN/inf entries") -> float:
    """Raise naming the first leaf with a NaN or infinity; return the tree's norm (one host transfer)."""
    counts, norm = nonfinite_counts_and_norm(tree)
    for path, count in zip(leaf_paths(tree), counts):
        if count:
            raise ValueError(f"{name}: leaf {path} expected finite values, got {count} {what}")
    return norm


def check_params(params: Any, name: str = "params", *, allow_complex: bool = True) -> Any:
    """Return ``params`` with every leaf as a jax array; raise if it is empty or has a non-floating leaf.

    With ``allow_complex=False`` complex leaves are refused too (only real floating dtypes pass).
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree with at least one floating-point array leaf, got an empty pytree")
    params = jax.tree.map(jnp.asarray, params)
    allowed = jnp.inexact if allow_complex else jnp.floating
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
        if not jnp.issubdtype(leaf.dtype, allowed):
            raise WrongTypeError(f"{name}: leaf {path} expected a floating-point dtype, got {leaf.dtype}")
    return params


def check_like(value: Any, name: str, *, reference: Any, reference_name: str = "params",
               leading_axis: bool = False, cast: bool = True) -> Any:
    """Check ``value`` has the structure and leaf shapes of ``reference``; return it cast to the reference's dtypes
    (``cast=False``: as given).

    With ``leading_axis=True`` every leaf carries one extra leading (block) axis, the same size for all leaves.
    """
    expected_def = jax.tree.structure(reference)
    actual_def = jax.tree.structure(value)
    if expected_def != actual_def:
        raise ValueError(
            f"{name}: expected a pytree with the structure of {reference_name}, {expected_def}, got {actual_def}"
        )
    block_sizes = set()
    for path, leaf, ref_leaf in zip(leaf_paths(reference), jax.tree.leaves(value), jax.tree.leaves(reference)):
        shape, ref_shape = tuple(np.shape(leaf)), tuple(np.shape(ref_leaf))
        if leading_axis:
            if len(shape) != len(ref_shape) + 1 or shape[1:] != ref_shape:
                raise ValueError(f"{name}: leaf {path} expected shape (block,) + {ref_shape} (that of "
                                 f"{reference_name} with a leading block axis), got {shape}")
            block_sizes.add(shape[0])
        elif shape != ref_shape:
            raise ValueError(f"{name}: leaf {path} expected shape {ref_shape} (that of {reference_name}), got {shape}")
    if len(block_sizes) > 1:
        raise ValueError(
            f"{name}: expected one leading block size shared by all leaves, got sizes {sorted(block_sizes)}")
    if not cast:
        return value
    return jax.tree.map(lambda leaf, ref_leaf: jnp.asarray(leaf, dtype=jnp.result_type(ref_leaf)), value, reference)


def check_direction(value: Any, name: str, *, params: Any) -> Any:
    """A direction in parameter space: shaped like ``params`` leaf for leaf, finite and not zero; returned in the
    params' dtypes."""
    direction = check_like(value, name, reference=params)
    norm = check_finite_tree(direction, name)
    if norm == 0.0:
        raise ValueError(f"{name}: expected a non-zero direction, got a direction of norm 0 (all entries zero)")
    return direction


def check_grid(value: Any, name: str) -> np.ndarray:
    """A 1-D, non-empty, finite grid of coordinates, as a float64 numpy array."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of coordinates, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: expected at least one coordinate, got an empty array")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite coordinates, got {np.count_nonzero(~np.isfinite(array))} NaN/inf")
    return array


def check_metric_fns(loss_fn: Callable, accuracy_fn: Callable | None,
                     metric_fns: Mapping[str, Callable] | None) -> dict[str, Callable]:
    """``{'loss': loss_fn, 'accuracy': accuracy_fn, **metric_fns}`` with every entry callable and names unique.

    The one check that takes several arguments: it names each of them itself (``loss_fn``, ``accuracy_fn``,
    ``metric_fns``, ``metric_fns['name']``).
    """
    if not callable(loss_fn):
        raise WrongTypeError(
            f"loss_fn: expected a callable loss_fn(params, batch) -> scalar, got {type(loss_fn).__name__}")
    metrics: dict[str, Callable] = {"loss": loss_fn}
    if accuracy_fn is not None:
        if not callable(accuracy_fn):
            raise WrongTypeError(
                f"accuracy_fn: expected a callable (params, batch) -> scalar, got {type(accuracy_fn).__name__}")
        metrics["accuracy"] = accuracy_fn
    if metric_fns is not None:
        taken = list(metrics)
        if not isinstance(metric_fns, Mapping):
            raise WrongTypeError(
                f"metric_fns: expected a dict name -> fn(params, batch), got {type(metric_fns).__name__}")
        for metric_name, fn in metric_fns.items():
            if not isinstance(metric_name, str) or not metric_name.isidentifier():
                raise ValueError(f"metric_fns: expected metric names that are identifiers, got {metric_name!r}")
            if metric_name in metrics:
                raise ValueError(f"metric_fns: expected names other than {taken} (taken by loss_fn/accuracy_fn), "
                                 f"got {metric_name!r}")
            if not callable(fn):
                raise WrongTypeError(f"metric_fns[{metric_name!r}]: expected a callable, got {type(fn).__name__}")
            metrics[metric_name] = fn
    return metrics


def merge_options(function: str, keywords: Mapping[str, Any], *groups: tuple[type, Any, str]) -> list[Any]:
    """One options object per ``(dataclass, given object or None, argument name)`` group, with ``keywords`` (the
    function's other keyword arguments) on top, each to the group that has the field. A keyword no group has is a
    TypeError naming it, as a signature would; so is a given object of the wrong type."""
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls, _, _ in groups}
    known = set().union(*fields.values())
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}; its options: "
                        f"{', '.join(sorted(known))}")
    merged = []
    for cls, given, name in groups:
        if given is not None and not isinstance(given, cls):
            raise WrongTypeError(f"{function}(): {name} must be a {cls.__name__}, got {type(given).__name__}")
        merged.append(dataclasses.replace(given or cls(), **{k: v for k, v in keywords.items() if k in fields[cls]}))
    return merged
