"""Populations: every member equals the same configuration trained alone by ``fit`` (float64, 1e-12), diverged
members are frozen without stopping the others, ensembles, and bad requests name the problem."""

import os
import re

import jax
import jax.flatten_util
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
    assert ensemble_metrics(result, digits.test, batch_size=50) == pytest.approx(metrics, rel=1e-6)  # 8 batches
    accuracies = [row["test_accuracy"] for row in result.members]  # computed by the eval step, not by the ensemble
    assert metrics["mean_member_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert metrics["best_member_accuracy"] == pytest.approx(max(accuracies), abs=1e-6)
    assert metrics["mean_member_nll"] == pytest.approx(np.mean([r["test_loss"] for r in result.members]), rel=1e-4)
    assert metrics["ensemble_nll"] <= metrics["mean_member_nll"] + 1e-6  # Jensen: -log of a mean <= mean of -log
    single = ensemble_metrics(train_population(_model(), optax.adam, digits, members={"learning_rate": [1e-2]},
                                               num_steps=10, batch_size=BATCH, progress=False), digits.test)
    assert single["ensemble_accuracy"] == pytest.approx(single["mean_member_accuracy"])
    assert single["ensemble_nll"] == pytest.approx(single["mean_member_nll"], rel=1e-5)


def test_example_scores_of_padded_sequences_equal_the_losses():
    """Per-position labels with -1 padding (and a row that is all padding): the ensemble's per-example scores are
    sequence_cross_entropy and example_accuracy of the log-probabilities."""
    from jaxnn import losses
    from jaxnn.train.population import _example_scores

    rng = np.random.default_rng(0)
    log_probs = np.asarray(jax.nn.log_softmax(rng.normal(size=(3, 4, 5, 6))))  # (members, n, T, C)
    labels = rng.integers(0, 6, size=(4, 5))
    labels[1, 3:] = -1
    labels[2, :] = -1
    nll, accuracy = _example_scores(log_probs, labels)
    for member in range(3):
        np.testing.assert_allclose(nll[member], losses.sequence_cross_entropy(log_probs[member], labels), rtol=1e-6)
        np.testing.assert_allclose(accuracy[member], losses.example_accuracy(log_probs[member], labels), rtol=1e-6)
    assert nll[0, 2] == 0.0 and accuracy[0, 2] == 1.0  # nothing scored
    flat_nll, flat_accuracy = _example_scores(log_probs[:, :, 0], labels[:, 0].clip(0))  # one label per example
    np.testing.assert_allclose(flat_nll, -np.take_along_axis(log_probs[:, :, 0], labels[None, :, 0, None].clip(0),
                                                             axis=-1)[..., 0])
    np.testing.assert_array_equal(flat_accuracy, log_probs[:, :, 0].argmax(-1) == labels[None, :, 0].clip(0))


@pytest.mark.parametrize("members, kwargs, words", [
    ({"dropout_rate": [0.1, 0.2]}, {}, "'dropout_rate' cannot be varied across a population"),
    ({"seed": [0, 1], "learning_rate": [0.1]}, {}, "one value per member"),
    ({"seed": [0.5, 1.5]}, {"optimizer_kwargs": {"learning_rate": 0.1}}, "seed must be integers"),
    ({"init_scale": [1.0, -1.0]}, {"optimizer_kwargs": {"learning_rate": 0.1}}, "init_scale must be positive"),
    ({"seed": [0, 1]}, {}, "the optimizer needs ['learning_rate']"),
    ({"learning_rate": [0.1, float("nan")]}, {}, "non-finite"),
    ({"learning_rate": [0.1]}, {"optimizer_kwargs": {"learning_rate": 0.2}}, "both set ['learning_rate']"),
    ({"learning_rate": [0.1]}, {"early_stop_patience": 0}, "early_stop_patience must be an integer >= 1"),
    ({"learning_rate": [0.1]}, {"early_stop_patience": 2, "early_stop_metric": "train_loss"},
     "early_stop_metric must be val_loss or val_accuracy"),
    ({"learning_rate": [0.1]}, {"devices": 64}, "devices=64: this process sees 1 device(s)"),
])
def test_bad_populations_are_refused(digits, members, kwargs, words):
    with pytest.raises(ValueError) as error:
        train_population(_model(), optax.sgd, digits, members=members, num_steps=2, progress=False, **kwargs)
    assert words in str(error.value)
    if "cannot be varied" in words:
        assert "learning_rate" in str(error.value) and "momentum" in str(error.value)


def test_early_stopped_members_equal_fit_with_early_stopping(digits, x64):
    """Patience 1 on the validation loss, evaluated every 4 steps: the member that stops is frozen at the step where
    fit with EarlyStopping stops, with the same parameters (1e-12); the other trains on."""
    from jaxnn.train import EarlyStopping

    lrs = [1.5, 0.02]
    result = train_population(_model(), optax.sgd, digits, members={"learning_rate": lrs}, num_steps=40,
                              batch_size=BATCH, early_stop_patience=1, eval_every=4, steps_per_call=3,
                              progress=False)
    statuses = [row["status"] for row in result.members]
    assert statuses[0].startswith("early-stopped at step ") and statuses[1] == "completed", statuses
    for index, lr in enumerate(lrs):
        state = create_train_state(_model(), optax.sgd(lr), digits.input_shape, jax.random.PRNGKey(0))
        alone = fit(state, digits, batch_size=BATCH, num_steps=40, eval_every=4, log_every=4, progress=False,
                    callbacks=[EarlyStopping("val_loss", patience=1)])
        assert int(result.member_state(index).step) == alone.steps_done
        assert _max_difference(result.member_state(index).params, alone.state.params) < 1e-12
    stop = int(statuses[0].rsplit(" ", 1)[1])
    assert np.isnan(result.losses[stop:, 0]).all() and np.isfinite(result.losses[:stop, 0]).all()


def test_a_population_too_big_for_memory_names_a_chunk_that_fits(digits, monkeypatch):
    """With the free memory made small, the first compiled chunk is refused with a chunk size; that chunk size
    then trains."""
    from jaxnn.train import population

    model = models.get_model("mlp", num_classes=10, width=256, depth=2)
    members = {"seed": list(range(8)), "learning_rate": [1e-3] * 8}
    kwargs = dict(members=members, num_steps=4, batch_size=BATCH, progress=False)
    program = {}
    real_check = population._check_memory

    def spy(compiled, *args):
        program.setdefault("it", compiled)
        return real_check(compiled, *args)

    monkeypatch.setattr(population, "_check_memory", spy)
    train_population(model, optax.adam, digits, **kwargs)
    analysis = program["it"].memory_analysis()
    need = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes)
    monkeypatch.setattr(population, "_available_bytes", lambda device: int(need / 3))
    with pytest.raises(population.PopulationMemoryError, match=r"8 members at once need .* set chunk=(\d+)") as error:
        train_population(model, optax.adam, digits, **kwargs)
    chunk = int(re.search(r"set chunk=(\d+)", str(error.value)).group(1))
    assert 1 <= chunk < 8
    result = train_population(model, optax.adam, digits, chunk=chunk, **kwargs)
    assert [row["status"] for row in result.members] == ["completed"] * 8


MEMBERS_OVER_DEVICES = """
import json, sys
import jax, numpy as np, optax
jax.config.update("jax_enable_x64", True)
from jaxnn import data, models
from jaxnn.train import population
from jaxnn.train.population import train_population
meshes, make_mesh = [], population._members_mesh
population._members_mesh = lambda devices: meshes.append(make_mesh(devices)) or meshes[-1]
digits = data.load_dataset("digits", seed=0)
model = models.get_model("mlp", num_classes=10, width=16, depth=1)
members = {"seed": [0, 1, 2, 3, 4, 5], "learning_rate": [0.05, 0.1, 0.2, 0.05, 0.1, 0.2]}
runs = [train_population(model, optax.sgd, digits, members=members, num_steps=12, batch_size=32, progress=False,
                         shuffle_per_member=True, steps_per_call=5, devices=devices) for devices in (None, -1, 4)]
diffs = [max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
             zip(jax.tree.leaves(runs[0].state.params), jax.tree.leaves(other.state.params))) for other in runs[1:]]
print(json.dumps({"devices": jax.device_count(), "diffs": diffs,
                  "meshes": [None if mesh is None else dict(mesh.shape) for mesh in meshes],
                  "val": [[row["val_loss"] for row in run.members] for run in runs]}))
"""


def test_members_sharded_over_eight_devices_equal_one_device():
    """Six members over 8 simulated CPU devices (padded to 8) and over 4 (chunks of 8, 2 per device): the same
    members as on one device, float64 to 1e-12."""
    import json
    import subprocess
    import sys

    from jaxnn.runtime import simulated_device_environment

    env = simulated_device_environment({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, 8)
    out = subprocess.run([sys.executable, "-c", MEMBERS_OVER_DEVICES], capture_output=True, text=True, env=env,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and max(result["diffs"]) < 1e-12
    assert result["meshes"] == [None, {"members": 8}, {"members": 4}]
    np.testing.assert_allclose(result["val"][1], result["val"][0], rtol=1e-12)
    np.testing.assert_allclose(result["val"][2], result["val"][0], rtol=1e-12)


def test_dropout_rate_members_equal_models_built_with_that_rate(digits, x64):
    """The population's model has dropout layers (rate 0.5, replaced per member); member i equals fit of the MLP
    built with dropout rate r_i, masks included (rate 0: the MLP without dropout layers)."""
    rates = [0.0, 0.2, 0.6]
    model = models.get_model("mlp", num_classes=10, width=16, depth=2, dropout=0.5)
    result = train_population(model, optax.sgd, digits, members={"dropout": rates, "seed": [0, 1, 2]},
                              optimizer_kwargs={"learning_rate": 0.1}, num_steps=STEPS, batch_size=BATCH,
                              steps_per_call=7, progress=False)
    for index, rate in enumerate(rates):
        alone_model = models.get_model("mlp", num_classes=10, width=16, depth=2, dropout=rate)
        state = create_train_state(alone_model, optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(index))
        alone = fit(state, digits, batch_size=BATCH, num_steps=STEPS, log_every=STEPS, eval_every=STEPS,
                    progress=False).state
        assert _max_difference(result.member_state(index).params, alone.params) < 1e-12, rate
        assert result.members[index]["dropout"] == rate
    with pytest.raises(ValueError, match="the model has no dropout layer"):
        train_population(_model(), optax.sgd, digits, members={"dropout": [0.1, 0.2]},
                         optimizer_kwargs={"learning_rate": 0.1}, num_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"dropout rates must be in \[0, 1\)"):
        train_population(model, optax.sgd, digits, members={"dropout": [0.1, 1.0]},
                         optimizer_kwargs={"learning_rate": 0.1}, num_steps=2, progress=False)


def _accuracy(state, split):
    logits = state.apply_fn({"params": state.params, **state.model_state}, split.x, train=False)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == split.y))


def _with_train_labels(dataset, labels):
    import dataclasses

    return dataclasses.replace(dataset, train=data_lib.Split(dataset.train.x, labels))


@pytest.mark.parametrize("strategy, own_streams", [("vmap", False), ("python", True)])
def test_label_noise_members_equal_fit_on_their_noisy_labels(digits, x64, strategy, own_streams):
    """Member i trains on noisy_labels(train.y, p_i, 10, seed_i) and equals fit on a copy of the data set with those
    training labels (1e-12); its metrics are on the clean labels (p = 1: every training label wrong)."""
    noise, seeds = [0.0, 0.3, 1.0], [0, 1, 2]
    result = train_population(_model(), optax.sgd, digits, members={"label_noise": noise, "seed": seeds},
                              optimizer_kwargs={"learning_rate": 0.1}, num_steps=STEPS, batch_size=BATCH,
                              steps_per_call=7, shuffle_per_member=own_streams, strategy=strategy, progress=False)
    for index, (p, seed) in enumerate(zip(noise, seeds)):
        labels = data_lib.noisy_labels(digits.train.y, p, 10, seed)
        state = create_train_state(_model(), optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(seed))
        alone = fit(state, _with_train_labels(digits, labels), batch_size=BATCH, num_steps=STEPS,
                    seed=seed if own_streams else 0, log_every=STEPS, eval_every=STEPS, progress=False)
        assert _max_difference(result.member_state(index).params, alone.state.params) < 1e-12, p
        assert result.members[index]["label_noise"] == p
        assert result.members[index]["val_accuracy"] == pytest.approx(_accuracy(alone.state, digits.val), abs=1e-12)
    with pytest.raises(ValueError, match=r"label_noise probabilities must be in \[0, 1\]"):
        train_population(_model(), optax.sgd, digits, members={"label_noise": [0.1, 1.5]},
                         optimizer_kwargs={"learning_rate": 0.1}, num_steps=2, progress=False)


def test_noisy_labels_replace_with_a_uniform_other_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200_000).astype(np.int32)
    assert np.array_equal(data_lib.noisy_labels(labels, 0.0, 10, 3), labels)
    assert np.all(data_lib.noisy_labels(labels, 1.0, 10, 3) != labels)
    noisy = data_lib.noisy_labels(labels, 0.5, 10, 3)
    assert noisy.dtype == np.int32 and np.array_equal(noisy, data_lib.noisy_labels(labels, 0.5, 10, 3))
    assert not np.array_equal(noisy, data_lib.noisy_labels(labels, 0.5, 10, 4))
    flipped = noisy != labels
    assert flipped.mean() == pytest.approx(0.5, abs=0.005)
    # Each of the 9 other classes receives p/9 of a true class's examples (binomial sd ~ 0.002 here).
    shift = (noisy[flipped] - labels[flipped]) % 10
    np.testing.assert_allclose(np.bincount(shift, minlength=10)[1:] / flipped.sum(), 1 / 9, atol=0.006)
    for bad, words in [((labels, 1.2, 10, 0), "probability"), ((labels.astype(float), 0.1, 10, 0), "integer"),
                       ((labels, 0.1, 5, 0), "num_classes")]:
        with pytest.raises(ValueError, match=words):
            data_lib.noisy_labels(*bad)


def test_looped_members_of_a_conv_net_equal_fit_and_auto_picks_the_loop_on_cpu(digits, x64):
    """The "python" strategy (what "auto" picks for convolutions on CPU) gives each member fit's parameters (1e-12),
    including a diverging member frozen before its first non-finite step; dense models keep "vmap"."""
    from jaxnn.train.population import _population_strategy

    conv = models.get_model("lenet", num_classes=10, conv_features=(2, 3), dense_features=(8,))
    assert _population_strategy("auto", conv, digits.input_shape, None) == "python"
    assert _population_strategy("auto", _model(), digits.input_shape, None) == "vmap"
    lrs = [0.05, 1e200]  # the second member's weights overflow (a smaller step only kills every ReLU)
    result = train_population(conv, optax.sgd, digits, members={"learning_rate": lrs, "seed": [5, 6]},
                              num_steps=STEPS, batch_size=BATCH, steps_per_call=7, progress=False)
    state = create_train_state(conv, optax.sgd(lrs[0]), digits.input_shape, jax.random.PRNGKey(5))
    alone = fit(state, digits, batch_size=BATCH, num_steps=STEPS, log_every=STEPS, eval_every=STEPS, progress=False)
    assert _max_difference(result.member_state(0).params, alone.state.params) < 1e-12
    assert result.members[0]["test_accuracy"] == pytest.approx(_accuracy(alone.state, digits.test), abs=1e-12)
    assert result.members[1]["status"].startswith("diverged at step ")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(result.member_state(1).params))
    vmapped = train_population(conv, optax.sgd, digits, members={"learning_rate": lrs[:1], "seed": [5]},
                               num_steps=STEPS, batch_size=BATCH, strategy="vmap", progress=False)
    assert _max_difference(vmapped.member_state(0).params, alone.state.params) < 1e-12
    with pytest.raises(ValueError, match="strategy must be one of auto, vmap, python, got 'scan'"):
        train_population(conv, optax.sgd, digits, members={"learning_rate": [0.1]}, num_steps=2, strategy="scan",
                         progress=False)
    with pytest.warns(DeprecationWarning, match="strategy='loop' is now strategy='python'"):
        assert _population_strategy("loop", conv, digits.input_shape, None) == "python"


def test_kfac_members_equal_fit_alone(digits, x64):
    """The K-FAC preconditioner in a population (needs_batch: each member's statistics from the shared batch through
    its own eval-mode model, vmapped): two seeds x two dampings, inverses refreshed every 3 steps, equal to fit with
    needs_batch=True to 1e-10."""
    from jaxnn import curvature

    def kfac_sgd(learning_rate, damping):
        return optax.chain(curvature.kfac_preconditioner(damping=damping, decay=0.9, inverse_every=3),
                           optax.sgd(learning_rate))

    members = {"seed": [0, 1], "damping": [0.1, 1.0]}
    steps = 8
    result = train_population(_model(), kfac_sgd, digits, members=members, optimizer_kwargs={"learning_rate": 0.1},
                              num_steps=steps, batch_size=BATCH, steps_per_call=4, progress=False, strategy="vmap",
                              needs_batch=True)
    for index, (seed, damping) in enumerate(zip(members["seed"], members["damping"])):
        state = create_train_state(_model(), kfac_sgd(0.1, damping), digits.input_shape, jax.random.PRNGKey(seed))
        alone = fit(state, digits, batch_size=BATCH, num_steps=steps, log_every=steps, eval_every=steps,
                    progress=False, needs_batch=True).state
        assert _max_difference(result.member_state(index).params, alone.params) < 1e-10
    assert result.losses[-1].max() < result.losses[0].min()  # and it trains


def test_options_object_and_keywords_train_alike(digits):
    """PopulationOptions or the same keywords: identical members; a misspelt option or a wrong object is a TypeError
    naming it."""
    from jaxnn.train.population import PopulationOptions

    def run(**options):
        return train_population(_model(), optax.sgd, digits, members={"learning_rate": [0.05, 0.2]}, num_steps=9,
                                batch_size=BATCH, **options)

    keywords = run(steps_per_call=4, chunk=1, progress=False)
    objects = run(options=PopulationOptions(steps_per_call=4, chunk=2, progress=False), chunk=1)
    assert _max_difference(keywords.state.params, objects.state.params) == 0
    np.testing.assert_array_equal(keywords.losses, objects.losses)
    with pytest.raises(TypeError, match="train_population\\(\\) got an unexpected keyword argument 'chunks'"):
        run(chunks=2)
    with pytest.raises(TypeError, match="options must be a PopulationOptions, got dict"):
        run(options={"chunk": 2})


def test_member_index_curvature_columns_and_one_name_for_the_rate(digits, x64):
    """The table's `member` column is the index into the state; curvature=True adds each member's λmax and gᵀHg/gᵀg,
    checked against jax.hessian + eigh of that member on the same batches; `lr` and `learning_rate` name one rate."""
    from jaxnn import losses
    model = models.get_model("mlp", num_classes=10, width=4, depth=1)
    given = dict(seed=[0, 1, 2], lr=[0.02, 0.2, 0.05])
    result = train_population(model, optax.sgd, digits, members=given, num_steps=12, batch_size=BATCH,
                              curvature=True, curvature_batches=2, progress=False)
    same = train_population(model, optax.sgd, digits, members={"seed": [0, 1, 2], "learning_rate": given["lr"]},
                            num_steps=12, batch_size=BATCH, progress=False)
    np.testing.assert_array_equal(result.losses, same.losses)
    assert [row["member"] for row in result.members] == [0, 1, 2]
    assert [row["learning_rate"] for row in result.members] == given["lr"]
    lines = result.table(sort_by=None).splitlines()
    assert lines[0].split()[:3] == ["member", "seed", "learning_rate"] and "lambda_max" in lines[0]
    ranked = result.table().splitlines()[1:]  # best first: each line still starts with its member index
    order = sorted(range(3), key=lambda i: -result.members[i]["val_accuracy"])
    assert [int(line.split()[0]) for line in ranked] == order
    x, y = data_lib.host_stacked_batches(digits.train, BATCH, 2, seed=0, shuffle=True)
    for i, row in enumerate(result.members):
        member = result.member_state(i)
        flat, unflatten = jax.flatten_util.ravel_pytree(member.params)
        loss_fn = losses.make_loss_fn(member.apply_fn, "softmax_cross_entropy", member.model_state)
        total = lambda v: sum(loss_fn(unflatten(v), (x[b], y[b])) for b in range(2)) / 2  # noqa: E731
        hessian, gradient = np.asarray(jax.hessian(total)(flat)), np.asarray(jax.grad(total)(flat))
        np.testing.assert_allclose(row["lambda_max"], np.linalg.eigvalsh(hessian)[-1], rtol=1e-6)
        np.testing.assert_allclose(row["gradient_curvature"], gradient @ hessian @ gradient / (gradient @ gradient),
                                   rtol=1e-6)
        assert abs(row["hessian_trace"] - np.trace(hessian)) < 0.5 * abs(np.trace(hessian))  # 20 Hutchinson probes
    with pytest.raises(ValueError, match="lr and learning_rate name the same rate"):
        train_population(model, optax.sgd, digits, members={"lr": [0.1], "learning_rate": [0.1]}, num_steps=2,
                         progress=False)


def test_config_accepts_learning_rate_for_lr(tmp_path):
    from jaxnn import config as config_lib
    assert config_lib.load_config("digits_mlp", overrides=["optimizer.learning_rate=0.05"]).optimizer.lr == 0.05
    (tmp_path / "a.yaml").write_text("optimizer: {learning_rate: 0.3}\n")
    assert config_lib.load_config(tmp_path / "a.yaml").optimizer.lr == 0.3
    (tmp_path / "b.yaml").write_text("optimizer: {learning_rate: 0.3, lr: 0.1}\n")
    with pytest.raises(config_lib.ConfigError, match="optimizer.learning_rate and optimizer.lr name the same field"):
        config_lib.load_config(tmp_path / "b.yaml")
