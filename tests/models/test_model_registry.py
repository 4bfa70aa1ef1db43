"""Registry, get_model, init_model and count_params: every model's output shape, errors, keys and counts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import (
    MLP,
    MODELS,
    CifarResNet,
    LeNet,
    count_params,
    get_model,
    init_model,
    model_names,
)

KEY = jax.random.key(0)
REQUIRED_NAMES = {"mlp", "lenet", "vgg_small", "resnet", "resnet20", "resnet32", "resnet44", "resnet56",
                  "resnet110", "plain20"}


def build(name, **kwargs):
    if name in ("resnet", "plain"):
        kwargs.setdefault("depth", 8)
    return get_model(name, num_classes=10, **kwargs)


def test_model_names_are_the_sorted_registry_keys():
    assert model_names() == sorted(MODELS)
    assert REQUIRED_NAMES <= set(model_names())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("train", [False, True])
def test_every_registered_model_maps_a_digits_batch_to_logits(name, train, abstract_init):
    model = build(name)
    # the sequence models read token ids and answer every position: the encoder-decoder a source and a decoder
    # input, the language model one sequence
    input_shape, x, expected = {
        "seq2seq": ((2, 5), jnp.zeros((2, 2, 5), jnp.int32), (2, 5, 10)),
        "transformer_lm": ((5,), jnp.zeros((2, 5), jnp.int32), (2, 5, 10)),
    }.get(name, ((8, 8, 1), jnp.zeros((2, 8, 8, 1)), (2, 10)))
    params, state = abstract_init(model, input_shape)

    def forward(params, state, x):
        out = model.apply({"params": params, **state}, x, train=train, rngs={"dropout": KEY},
                          mutable=["batch_stats"] if train else False)
        return out[0] if train else out

    logits = jax.eval_shape(forward, params, state, x)
    assert logits.shape == expected and logits.dtype == jnp.float32


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_small_models_compute_finite_logits_after_a_real_init(name):
    model = build(name)
    params, state = init_model(model, KEY, (8, 8, 1))
    logits = model.apply({"params": params, **state}, jax.random.normal(KEY, (2, 8, 8, 1)))
    assert logits.shape == (2, 10) and np.all(np.isfinite(np.asarray(logits)))


def test_config_style_kwargs_build_the_documented_model():
    model_kwargs = {"width": 128, "depth": 2, "activation": "relu", "kernel_init": "he"}
    model = get_model("mlp", num_classes=10, **model_kwargs)
    assert model == MLP(features=(128, 128), num_classes=10, activation="relu", kernel_init="he")
    assert get_model("resnet", depth=32, num_classes=100) == CifarResNet(num_classes=100, depth=32)
    assert get_model("lenet", num_classes=10, pool="avg") == LeNet(num_classes=10, pool="avg")


def test_unknown_model_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=re.escape(f"unknown model name 'resnet18'; valid names: {model_names()}")):
        get_model("resnet18", num_classes=10)
    with pytest.raises(TypeError, match="name must be a str"):
        get_model(20, num_classes=10)


def test_unknown_kwargs_are_named_with_the_accepted_ones():
    with pytest.raises(TypeError, match=r"get_model\('mlp'\): unknown keyword argument\(s\) \['widht'\]; "
                                        r"accepted: \[.*'features'.*'width', 'depth'\]"):
        get_model("mlp", num_classes=10, widht=128)
    with pytest.raises(TypeError, match=r"get_model\('resnet20'\): unknown keyword argument\(s\) \['dropout'\]"):
        get_model("resnet20", num_classes=10, dropout=0.1)


def test_fixed_and_required_kwargs_are_enforced():
    with pytest.raises(TypeError, match=r"\['depth'\] are fixed by this registry entry"):
        get_model("resnet20", num_classes=10, depth=32)
    with pytest.raises(TypeError, match=r"\['plain'\] are fixed by this registry entry"):
        get_model("plain20", num_classes=10, plain=False)
    with pytest.raises(TypeError, match=r"get_model\('resnet'\): missing required keyword argument\(s\) \['depth'\]"):
        get_model("resnet", num_classes=10)


@pytest.mark.parametrize("num_classes, got", [(0, "0"), (-3, "-3"), (2.0, "float 2.0"), ("10", "str '10'"),
                                              (True, "bool True"), (None, "NoneType None")])
def test_num_classes_must_be_a_positive_int(num_classes, got):
    # a wrong type is a ValueError too (validation.WrongTypeError): the models' API has always raised ValueError
    for name, owner in (("mlp", "MLP"), ("lenet", "LeNet"), ("vgg_small", "VGGSmall"), ("resnet20", "CifarResNet")):
        with pytest.raises(ValueError, match=re.escape(f"{owner}: num_classes: expected an integer >= 1, got {got}")
                           + "$"):
            get_model(name, num_classes=num_classes)


def test_init_model_returns_params_and_the_other_collections():
    params, state = init_model(get_model("mlp", num_classes=3, features=[4], norm="batch"), KEY, (5,))
    assert set(params) == {"dense_0", "norm_0", "head"}
    assert set(state) == {"batch_stats"}
    np.testing.assert_array_equal(np.asarray(state["batch_stats"]["norm_0"]["mean"]), np.zeros(4))
    np.testing.assert_array_equal(np.asarray(state["batch_stats"]["norm_0"]["var"]), np.ones(4))
    np.testing.assert_array_equal(np.asarray(params["norm_0"]["scale"]), np.ones(4))


def test_init_model_is_a_pure_function_of_the_key():
    model = get_model("mlp", num_classes=3, features=[4])
    first, _ = init_model(model, KEY, (5,))
    again, _ = init_model(get_model("mlp", num_classes=3, features=[4]), KEY, (5,))
    other, _ = init_model(model, jax.random.key(1), (5,))
    raw, _ = init_model(model, jax.random.PRNGKey(1), (5,))
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert not np.allclose(np.asarray(first["dense_0"]["kernel"]), np.asarray(other["dense_0"]["kernel"]))
    assert jax.tree.structure(raw) == jax.tree.structure(first)


@pytest.mark.parametrize("input_shape", [784, (), (28, 0), (28.0, 28), "28", None, (-1,)])
def test_init_model_rejects_bad_input_shapes(input_shape):
    with pytest.raises(ValueError, match=r"init_model: input_shape must be a non-empty tuple of positive ints without "
                                         r"the batch axis"):
        init_model(get_model("mlp", num_classes=3), KEY, input_shape)


@pytest.mark.parametrize("key", [0, np.zeros(2, np.float32), jax.random.split(jax.random.key(0), 2)])
def test_init_model_rejects_anything_but_one_prng_key(key):
    with pytest.raises(TypeError, match="init_model: key must be a single PRNG key"):
        init_model(get_model("mlp", num_classes=3), key, (5,))


def test_init_model_rejects_non_modules_and_inputs_the_model_cannot_take():
    with pytest.raises(TypeError, match="init_model: model must be a flax.linen.Module"):
        init_model("mlp", KEY, (5,))
    with pytest.raises(ValueError, match=r"init_model: LeNet cannot take inputs of shape input_shape=\(64,\) "
                                         r"\(batch axis excluded\): LeNet: x must be a batch of NHWC images"):
        init_model(get_model("lenet", num_classes=10), KEY, (64,))


def test_count_params_sums_leaf_sizes():
    tree = {"a": jnp.zeros((2, 3)), "b": [np.zeros(4), 1.0], "c": jax.ShapeDtypeStruct((5, 5), jnp.float32)}
    assert count_params(tree) == 6 + 4 + 1 + 25
    assert count_params({}) == 0
    with pytest.raises(TypeError, match=r"count_params: params leaves must be arrays or numbers; got str at "
                                        r"\['layer'\]\['kind'\]"):
        count_params({"layer": {"kind": "dense"}})
