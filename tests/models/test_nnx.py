"""Flax NNX models through the Linen engines: the NNX twins of the MLP and the LeNet, given the Linen models'
weights, train to the same parameters and have the same Hessian spectrum (float64); user NNX classes with and
without a ``train`` argument; populations draw one set of weights per seed; bad input is named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnn import curvature, losses, models
from jaxnn import data as data_lib
from jaxnn.train import create_train_state, fit
from jaxnn.train.population import train_population
from jaxnn.validation import WrongTypeError


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits", seed=0)


def _twin_states(linen, twin, dataset, tx):
    """Both models' states with the Linen model's initial weights (and batch statistics) in both."""
    a = create_train_state(linen, tx, dataset.input_shape, jax.random.PRNGKey(0))
    b = create_train_state(twin, tx, dataset.input_shape, jax.random.PRNGKey(1))
    for x, y in zip(jax.tree.leaves(b.model_state), jax.tree.leaves(a.model_state)):  # running statistics too
        assert x.dtype == y.dtype
    assert jax.tree.structure(b.params) == jax.tree.structure({"nnx": {"module": a.params}})
    assert jax.tree.structure(b.model_state) == jax.tree.structure(
        {k: {"nnx": {"module": v}} for k, v in a.model_state.items()})
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (fit donates its state's buffers)
    b = b.replace(params={"nnx": {"module": copy(a.params)}},
                  model_state={k: {"nnx": {"module": copy(v)}} for k, v in a.model_state.items()})
    return a, b.replace(opt_state=tx.init(b.params))


def _max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name, kwargs", [
    ("mlp", {"width": 16, "depth": 2, "norm": "batch"}),
    ("lenet", {"conv_features": (2, 3), "dense_features": (8,), "kernel_size": 3, "norm": "layer"}),
])
def test_nnx_twins_train_to_the_linen_parameters_and_spectrum(digits, x64, name, kwargs):
    dataset = digits
    tx = optax.sgd(0.05, momentum=0.9)
    linen = models.get_model(name, num_classes=10, **kwargs)
    twin = models.get_model(f"nnx_{name}", num_classes=10, **kwargs)
    a, b = _twin_states(linen, twin, dataset, tx)
    a = fit(a, dataset, batch_size=32, num_steps=10, log_every=10, eval_every=10, progress=False)
    b = fit(b, dataset, batch_size=32, num_steps=10, log_every=10, eval_every=10, progress=False)
    assert _max_difference(b.state.params["nnx"]["module"], a.state.params) < 1e-10
    assert _max_difference(b.state.params["nnx"]["module"], jax.tree.map(np.zeros_like, a.state.params)) > 1e-3
    assert b.history[-1]["val_loss"] == pytest.approx(a.history[-1]["val_loss"], rel=1e-10)
    if a.state.model_state:
        assert _max_difference([v["nnx"]["module"] for v in b.state.model_state.values()],
                               list(a.state.model_state.values())) < 1e-10

    batch = (jnp.asarray(dataset.train.x[:32]), jnp.asarray(dataset.train.y[:32]))
    spectra = []
    for result in (a, b):
        loss_fn = losses.make_loss_fn(result.state.apply_fn, "softmax_cross_entropy", result.state.model_state)
        flat, unravel = jax.flatten_util.ravel_pytree(result.state.params)
        spectra.append(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat))))
    np.testing.assert_allclose(spectra[1], spectra[0], rtol=0, atol=1e-10 * np.abs(spectra[0]).max())
    if name != "mlp":
        return
    loss_fn = losses.make_loss_fn(b.state.apply_fn, "softmax_cross_entropy", b.state.model_state)
    top = curvature.top_eigenvalues(curvature.hessian(loss_fn, b.state.params, batch), k=1,
                                    key=jax.random.PRNGKey(2))[0]
    assert float(top[0]) == pytest.approx(spectra[0][-1], rel=1e-6)


class _Plain(nnx.Module):
    """An NNX module as the Flax docs write one: no input_shape or train arguments, mode set by train()/eval()."""

    def __init__(self, *, rngs):
        self.dense = nnx.Linear(64, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.dense(x.reshape(len(x), -1)))))


def test_a_plain_nnx_class_trains_with_dropout_in_train_mode_only(digits):
    model = models.from_nnx(_Plain)
    state = create_train_state(model, optax.adam(1e-2), digits.input_shape, jax.random.PRNGKey(0))
    x = jnp.asarray(digits.train.x[:8])
    variables = {"params": state.params}
    eval_a = model.apply(variables, x)
    p = state.params["nnx"]["module"]
    by_hand = jax.nn.relu(x.reshape(8, -1) @ p["dense"]["kernel"] + p["dense"]["bias"])  # no dropout in eval mode
    np.testing.assert_allclose(eval_a, by_hand @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5, atol=1e-6)
    noisy = [model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)}) for k in (0, 0, 1)]
    np.testing.assert_array_equal(noisy[0], noisy[1])  # the same key, the same mask
    assert not np.allclose(noisy[0], noisy[2]) and not np.allclose(noisy[0], eval_a)
    result = fit(state, digits, batch_size=32, num_steps=60, log_every=60, eval_every=60, progress=False)
    assert result.history[-1]["val_accuracy"] > 0.8


def test_population_members_draw_their_own_nnx_weights(digits):
    model = models.get_model("nnx_mlp", num_classes=10, width=16, depth=1)
    result = train_population(model, optax.sgd, digits, members={"seed": [0, 1], "learning_rate": [0.1, 0.1]},
                              num_steps=5, batch_size=32, progress=False)
    first, second = result.member_state(0).params, result.member_state(1).params
    assert _max_difference(first, second) > 1e-3
    alone = create_train_state(model, optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(1))
    alone = fit(alone, digits, batch_size=32, num_steps=5, log_every=5, eval_every=5, progress=False).state
    assert _max_difference(second, alone.params) < 1e-5


def test_bad_nnx_input_is_named(digits):
    with pytest.raises(WrongTypeError, match="from_nnx: build: expected an NNX module class .* got an instance of "
                                             "_Plain"):
        models.from_nnx(_Plain(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="nnx MLP: features: expected a sequence of integers >= 1, got \\(16, 0\\)"):
        models.init_model(models.get_model("nnx_mlp", num_classes=10, features=(16, 0)), jax.random.PRNGKey(0), (64,))
    with pytest.raises(TypeError, match="get_model\\('nnx_lenet'\\): unknown keyword argument\\(s\\) \\['width'\\]"):
        models.get_model("nnx_lenet", num_classes=10, width=3)
    model = models.get_model("nnx_mlp", num_classes=10, width=8, depth=1)
    state = create_train_state(model, optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(0))
    batch = (jnp.asarray(digits.train.x[:8]), jnp.asarray(digits.train.y[:8]))
    with pytest.raises(ValueError, match="K-FAC found no Dense or 2-D Conv layer"):
        curvature.kfac(lambda p, x: model.apply({"params": p}, x), losses.batch_mean("softmax_cross_entropy"),
                       state.params, batch)


def test_a_config_run_with_an_nnx_model_reads_back(tmp_path):
    """`jaxnn train CONFIG --set model.name=nnx_mlp`: the run folder is read back (the model rebuilt from the
    registry) with the trained parameters, and its loss is the summary's."""
    from jaxnn import config as config_lib
    from jaxnn.train import load_run, train_from_config

    cfg = config_lib.load_config(None, overrides={"model.name": "nnx_mlp", "model.kwargs": {"width": 16, "depth": 1},
                                                  "train.steps": 20, "train.progress": False,
                                                  "output_dir": str(tmp_path)})
    summary = train_from_config(cfg)
    run = load_run(tmp_path / cfg.name)
    loss_fn = losses.make_loss_fn(run.model.apply, "softmax_cross_entropy", run.state.model_state)
    val = run.dataset.val
    assert float(loss_fn(run.state.params, (jnp.asarray(val.x), jnp.asarray(val.y)))) == pytest.approx(
        summary["final"]["val_loss"], rel=1e-5)
    assert summary["model"] == "nnx_mlp"
