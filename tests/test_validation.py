"""jaxnn.validation: every message is "{name}: expected <what>, got <what was given>", the name first; a wrong type
raises WrongTypeError (a TypeError and a ValueError), a wrong value ValueError."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn import validation
from jaxnn.validation import (
    WrongTypeError,
    check_choice,
    check_float,
    check_int,
    check_int_sequence,
    check_key,
    check_like,
    check_params,
    check_positive_float,
)


def raises(error, message):
    """The whole message, exactly."""
    return pytest.raises(error, match="^" + re.escape(message) + "$")


def test_wrong_type_error_is_a_type_error_and_a_value_error():
    assert issubclass(WrongTypeError, TypeError) and issubclass(WrongTypeError, ValueError)
    with pytest.raises(TypeError):
        check_int("3", "n")
    with pytest.raises(ValueError):
        check_int("3", "n")


def test_check_int():
    assert check_int(np.int64(3), "n") == 3 and type(check_int(np.int64(3), "n")) is int
    assert check_int(True, "n") == 1  # bools pass unless allow_bool=False
    with raises(ValueError, "MLP: features: expected an integer >= 1, got 0"):
        check_int(0, "MLP: features")
    with raises(ValueError, "grid: expected an integer >= 2, got 1"):
        check_int(1, "grid", minimum=2)
    with raises(ValueError, "k: expected at most num_params=3, got 4"):
        check_int(4, "k", maximum=3, maximum_name="num_params")
    with raises(ValueError, "k: expected at most 3, got 4"):
        check_int(4, "k", maximum=3)
    with raises(WrongTypeError, "n: expected an integer >= 1, got str '10'"):
        check_int("10", "n")
    with raises(WrongTypeError, "n: expected an integer >= 1, got float 2.0"):
        check_int(2.0, "n")
    with raises(WrongTypeError, "n: expected an integer >= 0, got bool True"):
        check_int(True, "n", minimum=0, allow_bool=False)


def test_check_int_sequence():
    assert check_int_sequence([3, np.int32(4)], "MLP: features") == (3, 4)
    assert check_int_sequence([], "MLP: features") == ()
    with raises(ValueError, "MLP: features: expected a sequence of integers >= 1, got [32, 0] (entry 1 is 0)"):
        check_int_sequence([32, 0], "MLP: features")
    with raises(WrongTypeError, "MLP: features: expected a sequence of integers >= 1, got [32, True] "
                                "(entry 1 is bool True)"):
        check_int_sequence([32, True], "MLP: features")
    with raises(WrongTypeError, "MLP: features: expected a sequence of integers >= 1, got int 32"):
        check_int_sequence(32, "MLP: features")
    with raises(WrongTypeError, "MLP: features: expected a sequence of integers >= 1, got str '32'"):
        check_int_sequence("32", "MLP: features")
    with raises(ValueError, "LeNet: conv_features: expected a non-empty sequence of integers >= 1, got ()"):
        check_int_sequence((), "LeNet: conv_features", allow_empty=False)


def test_check_positive_float_and_check_float():
    assert check_positive_float(np.float32(0.5), "tol") == 0.5
    assert check_positive_float(0, "zero_tolerance", allow_zero=True) == 0.0
    assert check_positive_float("0.1", "tol") == 0.1  # the lenient default converts with float()
    with raises(ValueError, "tol: expected a finite number > 0, got -1.0"):
        check_positive_float(-1, "tol")
    with raises(ValueError, "tol: expected a finite number > 0, got 0.0"):
        check_positive_float(0.0, "tol")
    with raises(ValueError, "zero_tolerance: expected a finite number >= 0, got -1.0"):
        check_positive_float(-1.0, "zero_tolerance", allow_zero=True)
    with raises(ValueError, "tol: expected a finite number > 0, got inf"):
        check_positive_float(float("inf"), "tol")
    with raises(WrongTypeError, "tol: expected a finite number > 0, got str 'abc'"):
        check_positive_float("abc", "tol")
    with raises(WrongTypeError, "get_initializer('small_normal'): sigma: expected a finite number > 0, got str '0.1'"):
        check_positive_float("0.1", "get_initializer('small_normal'): sigma", strict=True)
    with raises(WrongTypeError, "sigma: expected a finite number > 0, got bool True"):
        check_positive_float(True, "sigma", strict=True)
    assert check_float(0.0, "MLP: dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True, strict=True) == 0.0
    with raises(ValueError, "MLP: dropout: expected a finite number in [0, 1), got 1.0"):
        check_float(1.0, "MLP: dropout", minimum=0.0, maximum=1.0, exclusive_maximum=True, strict=True)
    with raises(ValueError, "value: expected a finite number, got nan"):
        check_float(float("nan"), "value", strict=True)


def test_check_choice():
    assert check_choice(None, "MLP: norm", choices=(None, "batch", "layer")) is None
    with raises(ValueError, "MLP: norm: expected one of [None, 'batch', 'layer'], got 'group'"):
        check_choice("group", "MLP: norm", choices=(None, "batch", "layer"))
    with raises(ValueError, "method: expected one of ['cg', 'gmres'], got 'lbfgs'"):
        check_choice("lbfgs", "method", choices=["cg", "gmres"])


def test_check_key():
    typed, raw = jax.random.key(0), jax.random.PRNGKey(0)
    assert check_key(typed) is typed and check_key(raw) is raw
    assert jnp.issubdtype(check_key(3, allow_int_seed=True).dtype, jax.dtypes.prng_key)
    with raises(WrongTypeError, "key: expected a PRNG key (jax.random.key(seed)), got None"):
        check_key(None)
    with raises(WrongTypeError, "seed: expected a PRNG key (jax.random.key(seed)) or an int seed, got None"):
        check_key(None, "seed", allow_int_seed=True)
    with raises(WrongTypeError, "key: expected a PRNG key (typed key, or uint32 array of shape (2,)), "
                                "got dtype float32 shape (2,)"):
        check_key(np.zeros(2, np.float32))
    with raises(WrongTypeError, "key: expected a PRNG key (typed key, or uint32 array of shape (2,)), "
                                "got dtype int32 shape ()"):
        check_key(3)  # an int seed only with allow_int_seed=True
    with raises(ValueError, "key: expected a PRNG key (typed key, or uint32 array of shape (2,)), "
                            "got dtype uint32 shape (3,)"):
        check_key(np.zeros(3, np.uint32))
    with raises(ValueError, "key: expected a single PRNG key of shape (), got shape (2,)"):
        check_key(jax.random.split(typed, 2))
    with raises(WrongTypeError, "key: expected a PRNG key (typed key, or uint32 array of shape (2,)), got str 'abc'"):
        check_key("abc")


def test_check_params():
    params = check_params({"w": np.ones((2, 3), np.float32), "b": 0.5})
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
    assert check_params({"z": jnp.ones(2, jnp.complex64)})["z"].dtype == jnp.complex64
    with raises(ValueError, "params: expected a pytree with at least one floating-point array leaf, "
                            "got an empty pytree"):
        check_params({})
    with raises(WrongTypeError, "params0: leaf ['step'] expected a floating-point dtype, got int32"):
        check_params({"step": jnp.int32(0), "w": jnp.ones(2)}, "params0")
    with raises(WrongTypeError, "params: leaf ['z'] expected a floating-point dtype, got complex64"):
        check_params({"z": jnp.ones(2, jnp.complex64)}, allow_complex=False)


def test_check_like():
    params = {"b": jnp.zeros(3, jnp.float32), "w": jnp.zeros((2, 3), jnp.float32)}
    cast = check_like({"b": np.ones(3), "w": np.ones((2, 3))}, "v", reference=params)
    assert all(leaf.dtype == jnp.float32 and isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(cast))
    given = {"b": np.ones(3), "w": np.ones((2, 3))}
    assert check_like(given, "v", reference=params, cast=False) is given
    with pytest.raises(ValueError, match=r"^v: expected a pytree with the structure of params, PyTreeDef\(.*\), "
                                         r"got PyTreeDef\(\{'w': \*\}\)$"):
        check_like({"w": jnp.ones((2, 3))}, "v", reference=params)
    with raises(ValueError, "v: leaf ['w'] expected shape (2, 3) (that of params), got (3, 2)"):
        check_like({"b": jnp.ones(3), "w": jnp.ones((3, 2))}, "v", reference=params)
    with raises(ValueError, "params_b: leaf ['w'] expected shape (2, 3) (that of params_a), got (3, 2)"):
        check_like({"b": jnp.ones(3), "w": jnp.ones((3, 2))}, "params_b", reference=params, reference_name="params_a")
    blocks = check_like({"b": jnp.ones((4, 3)), "w": jnp.ones((4, 2, 3))}, "vectors", reference=params,
                        leading_axis=True)
    assert blocks["w"].shape == (4, 2, 3)
    with raises(ValueError, "vectors: leaf ['w'] expected shape (block,) + (2, 3) (that of params with a leading "
                            "block axis), got (2, 3)"):
        check_like({"b": jnp.ones((4, 3)), "w": jnp.ones((2, 3))}, "vectors", reference=params, leading_axis=True)
    with raises(ValueError, "vectors: expected one leading block size shared by all leaves, got sizes [4, 5]"):
        check_like({"b": jnp.ones((4, 3)), "w": jnp.ones((5, 2, 3))}, "vectors", reference=params, leading_axis=True)


def test_check_finite_tree():
    tree = {"a": jnp.array([1.0, jnp.nan, 3.0, jnp.inf]), "i": jnp.arange(3, dtype=jnp.int32)}
    with raises(ValueError, "direction: leaf ['a'] expected finite values, got 2 NaN/inf entries"):
        validation.check_finite_tree(tree, "direction")
    np.testing.assert_allclose(validation.check_finite_tree({"b": jnp.arange(6.0)}, "b"), np.sqrt(55.0), rtol=1e-6)


def test_merge_options():
    """Keywords go to the group that has the field, on top of a given object; unknown keywords and wrong objects
    are refused by name."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class A:
        x: int = 1
        y: int = 2

    @dataclasses.dataclass(frozen=True)
    class B:
        z: int = 3

    a, b = validation.merge_options("f", {"y": 20, "z": 30}, (A, A(x=10, y=5), "a"), (B, None, "b"))
    assert (a, b) == (A(x=10, y=20), B(z=30))
    with raises(TypeError, "f() got an unexpected keyword argument 'w'; its options: x, y, z"):
        validation.merge_options("f", {"w": 1}, (A, None, "a"), (B, None, "b"))
    with raises(TypeError, "f(): b must be a B, got A"):
        validation.merge_options("f", {}, (A, None, "a"), (B, A(), "b"))
