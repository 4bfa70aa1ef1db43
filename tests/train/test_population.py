"""Populations: every member equals the same configuration trained alone by ``fit`` (float64, 1e-12), diverged
members are frozen without stopping the others, ensembles, and bad requests name the problem."""

import jax
import numpy as np
import optax
import pytest

from jaxnn import data as data_lib, models
from jaxnn.train import create_train_state, fit
from jaxnn.train.population import ensemble_metrics, population_grid, train_population

STEPS, BATCH = 23, 32


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits", seed=0)


def _model():
    return models.get_model("mlp", num_classes=10, width=16, depth=1)


def _alone(digits, optimizer, seed, data_seed=0, scale=1.0, steps=STEPS):
    state = create_train_state(_model(), optimizer, digits.input_shape, jax.random.PRNGKey(seed))
    state = state.replace(params=jax.tree.map(lambda p: p * scale, state.params))
    return fit(state, digits, batch_size=BATCH, num_steps=steps, seed=data_seed, log_every=steps, eval_every=steps,
               progress=False).state


def _max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_members_equal_fit_alone_shared_stream(digits, x64):
    """SGD with momentum, seeds x learning rates, 23 steps in calls of 7 (two compiled lengths) and chunks of 3
    (the last one padded): each member's parameters and optimizer state equal fit's to 1e-12."""
    members = population_grid(seed=[0, 1], learning_rate=[0.05, 0.2])
    result = train_population(_model(), optax.sgd, digits, members=members, optimizer_kwargs={"momentum": 0.9},
                              num_steps=STEPS, batch_size=BATCH, steps_per_call=7, chunk=3, progress=False)
    assert len(result.members) == 4 and result.losses.shape == (STEPS, 4)
    for index, (seed, lr) in enumerate(zip(members["seed"], members["learning_rate"])):
        alone = _alone(digits, optax.sgd(lr, momentum=0.9), seed)
        member = result.member_state(index)
        assert _max_difference(member.params, alone.params) < 1e-12
        assert _max_difference(member.opt_state.inner_state, alone.opt_state) < 1e-12
        row = result.members[index]
        assert row["seed"] == seed and row["learning_rate"] == lr and row["status"] == "completed"
        assert 0 <= row["val_accuracy"] <= 1 and np.isfinite(row["test_loss"])
    assert "val_accuracy" in result.table().splitlines()[0]


def test_members_equal_fit_alone_with_own_streams_and_init_scales(digits, x64):
    """Adam, per-member data order (the member's seed), init scale 0.5 and 2: equal to fit with that data seed and
    scaled initial parameters."""
    members = {"seed": [3, 4], "init_scale": [0.5, 2.0], "learning_rate": [1e-2, 3e-3]}
    result = train_population(_model(), optax.adam, digits, members=members, num_steps=STEPS, batch_size=BATCH,
                              shuffle_per_member=True, progress=False)
    for index in range(2):
        alone = _alone(digits, optax.adam(members["learning_rate"][index]), members["seed"][index],
                       data_seed=members["seed"][index], scale=members["init_scale"][index])
        assert _max_difference(result.member_state(index).params, alone.params) < 1e-12


def test_a_diverging_member_is_frozen_and_the_others_go_on(digits, x64):
    result = train_population(_model(), optax.sgd, digits, members={"learning_rate": [0.1, 1e12]},
                              num_steps=STEPS, batch_size=BATCH, progress=False)
    good, bad = result.members
    assert good["status"] == "completed"
    assert bad["status"].startswith("diverged at step ")
    step = int(bad["status"].rsplit(" ", 1)[1])
    assert np.isnan(result.losses[step:, 1]).all() and np.isfinite(result.losses[:step, 1]).all()
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(result.member_state(1).params))
    assert int(result.member_state(1).step) == step  # frozen before the step that failed
    alone = _alone(digits, optax.sgd(0.1), 0)
    assert _max_difference(result.member_state(0).params, alone.params) < 1e-12


def test_ensemble_against_its_members(digits):
    result = train_population(_model(), optax.adam, digits, members={"seed": [0, 1, 2], "learning_rate": [1e-2] * 3},
                              num_steps=60, batch_size=BATCH, progress=False)
    metrics = ensemble_metrics(result, digits.test)
    accuracies = [row["test_accuracy"] for row in result.members]  # computed by the eval step, not by the ensemble
    assert metrics["mean_member_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert metrics["best_member_accuracy"] == pytest.approx(max(accuracies), abs=1e-6)
    assert metrics["mean_member_nll"] == pytest.approx(np.mean([r["test_loss"] for r in result.members]), rel=1e-4)
    assert metrics["ensemble_nll"] <= metrics["mean_member_nll"] + 1e-6  # Jensen: -log of a mean <= mean of -log
    single = ensemble_metrics(train_population(_model(), optax.adam, digits, members={"learning_rate": [1e-2]},
                                               num_steps=10, batch_size=BATCH, progress=False), digits.test)
    assert single["ensemble_accuracy"] == pytest.approx(single["mean_member_accuracy"])
    assert single["ensemble_nll"] == pytest.approx(single["mean_member_nll"], rel=1e-5)


@pytest.mark.parametrize("members, kwargs, words", [
    ({"dropout_rate": [0.1, 0.2]}, {}, "'dropout_rate' cannot be varied across a population"),
    ({"seed": [0, 1], "learning_rate": [0.1]}, {}, "one value per member"),
    ({"seed": [0.5, 1.5]}, {"optimizer_kwargs": {"learning_rate": 0.1}}, "seed must be integers"),
    ({"init_scale": [1.0, -1.0]}, {"optimizer_kwargs": {"learning_rate": 0.1}}, "init_scale must be positive"),
    ({"seed": [0, 1]}, {}, "the optimizer needs ['learning_rate']"),
    ({"learning_rate": [0.1, float("nan")]}, {}, "non-finite"),
    ({"learning_rate": [0.1]}, {"optimizer_kwargs": {"learning_rate": 0.2}}, "both set ['learning_rate']"),
])
def test_bad_populations_are_refused(digits, members, kwargs, words):
    with pytest.raises(ValueError) as error:
        train_population(_model(), optax.sgd, digits, members=members, num_steps=2, progress=False, **kwargs)
    assert words in str(error.value)
    if "cannot be varied" in words:
        assert "learning_rate" in str(error.value) and "momentum" in str(error.value)
