"""The compiled step and the fit loop: metrics against independent gradients, accumulation, guards, errors."""

import hashlib
import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnn import data as data_lib
from jaxnn import losses, models
from jaxnn.train import (CheckpointError, Checkpointer, EarlyStopping, NonFiniteLossError, create_train_state, fit,
                         make_train_step)


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits", seed=0)


def small_mlp(**kw):
    return models.get_model("mlp", num_classes=10, width=32, depth=1, **kw)


def test_train_step_metrics_match_independent_gradient(digits):
    model = small_mlp()
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, digits.input_shape, jax.random.PRNGKey(0))
    batch = next(data_lib.batch_iterator(digits.train, 32, seed=0))
    params0 = jax.tree.map(np.asarray, state.params)
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", {})
    value, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    step = make_train_step("softmax_cross_entropy", lambda s: 0.1, donate=False)
    new_state, m = step(state, batch)
    g_norm = float(optax.tree.norm(grads))
    p_norm = float(optax.tree.norm(params0))
    assert float(m["loss"]) == pytest.approx(float(value), rel=1e-6)
    assert float(m["grad_norm"]) == pytest.approx(g_norm, rel=1e-5)
    assert float(m["update_ratio"]) == pytest.approx(0.1 * g_norm / p_norm, rel=1e-5)
    assert float(m["lr"]) == pytest.approx(0.1)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params0, grads)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(new_state.step) == 1


def test_gradient_accumulation_equals_full_batch(digits, x64):
    model = small_mlp()
    state = create_train_state(model, optax.sgd(0.5), digits.input_shape, jax.random.PRNGKey(0))
    batch = next(data_lib.batch_iterator(digits.train, 64, seed=0))
    batch = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, batch)
    one, m1 = make_train_step("softmax_cross_entropy", donate=False)(state, batch)
    four, m4 = make_train_step("softmax_cross_entropy", grad_accum_steps=4, donate=False)(state, batch)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-10)


def test_fit_trains_and_logs(digits, tmp_path):
    state = create_train_state(small_mlp(), optax.adam(3e-3), digits.input_shape, jax.random.PRNGKey(0))
    result = fit(state, digits, batch_size=64, num_steps=120, log_every=20, eval_every=60, run_dir=tmp_path,
                 progress=False, schedule=optax.constant_schedule(3e-3))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    import json
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [20, 40, 60, 80, 100, 120]
    assert records[-1]["val_accuracy"] > 0.85 and records[-1]["loss_mean"] < records[0]["loss_mean"]
    assert {"loss", "accuracy", "grad_norm", "update_ratio", "lr", "val_loss"} <= set(records[2])
    assert all(r["lr"] == pytest.approx(3e-3) and r["grad_norm"] > 0 and r["update_ratio"] > 0 for r in records)
    assert result.steps_done == 120 and result.stop_reason == "completed"


def _dir_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_nan_guard_stops_names_step_and_keeps_last_good_checkpoint(digits, tmp_path):
    schedule = lambda step: jnp.where(step < 10, 0.01, 1e30)
    state = create_train_state(small_mlp(), optax.sgd(schedule), digits.input_shape, jax.random.PRNGKey(0))
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=5)
    # Steps 1..10 train normally; update 11 uses lr=1e30, so the loss computed at step 12 is non-finite.
    with pytest.raises(NonFiniteLossError) as err:
        fit(state, digits, batch_size=32, num_steps=40, schedule=schedule, eval_every=5, checkpointer=ckpt,
            progress=False, log_every=100)
    assert err.value.step == 12
    assert "step 12" in str(err.value) and "step 10" in str(err.value)
    assert ckpt.all_steps() == [5, 10]
    digest = _dir_digest(tmp_path / "ckpt" / "10")
    template = create_train_state(small_mlp(), optax.sgd(schedule), digits.input_shape, jax.random.PRNGKey(1))
    restored = ckpt.restore(template.checkpoint_tree())
    assert int(restored["step"]) == 10
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(restored["params"]))
    assert _dir_digest(tmp_path / "ckpt" / "10") == digest


def test_checkpointer_refuses_non_finite_and_overwrite(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    with pytest.raises(CheckpointError, match="non-finite"):
        ckpt.save(1, {"w": jnp.array([1.0, jnp.nan])})
    ckpt.save(1, {"w": jnp.array([1.0, 2.0])})
    with pytest.raises(CheckpointError, match="already exists"):
        ckpt.save(1, {"w": jnp.array([3.0, 4.0])})
    np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(2)})["w"], [1.0, 2.0])


def test_corrupt_and_incompatible_checkpoints_raise_and_stay_untouched(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(3, {"w": jnp.arange(4.0), "b": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.restore({"w": jnp.zeros(5), "b": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.restore({"w": jnp.zeros(4), "c": jnp.zeros(2)})
    # Corrupt every data file of the checkpoint.
    step_dir = tmp_path / "c" / "3"
    for f in step_dir.rglob("*"):
        if f.is_file() and f.name not in ("commit_success.txt",):
            f.write_bytes(b"garbage" * 3)
    digest = _dir_digest(step_dir)
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpointer(tmp_path / "c").restore({"w": jnp.zeros(4), "b": jnp.zeros(2)})
    assert _dir_digest(step_dir) == digest


def test_early_stopping(digits):
    state = create_train_state(small_mlp(), optax.sgd(0.0), digits.input_shape, jax.random.PRNGKey(0))
    result = fit(state, digits, batch_size=64, num_steps=100, eval_every=10, progress=False,
                 callbacks=[EarlyStopping("val_loss", patience=2)])
    # lr=0: val_loss is constant; the first eval sets the best, two more without improvement stop.
    assert result.steps_done == 30 and "early stop" in result.stop_reason


def test_one_patience_rule_for_a_run_and_a_population():
    """Patience (EarlyStopping's rule, which populations apply member by member) on a hand-worked sequence: for each
    member, vectorised equals one scalar rule per member; NaN never improves; min_delta; max mode; bad input."""
    from jaxnn.train.callbacks import Patience

    values = np.array([[1.0, 5.0, 1.0], [0.9, 5.0, np.nan], [0.95, 4.0, 0.5], [0.89, 4.5, 0.5], [0.9, 4.5, 0.6]])
    # patience 2: member 0 never misses twice in a row; member 1 ties 5.0 (no improvement), improves to 4.0, then
    # misses at 3 and 4; member 2's NaN is a miss, 0.5 improves, 0.5 (a tie) and 0.6 miss
    expected_stop_at = [None, 4, 4]
    together = Patience(2, size=3)
    first = [None] * 3
    for index, row in enumerate(values):
        for member in np.flatnonzero(together.update(row)):
            first[member] = index if first[member] is None else first[member]
    assert first == expected_stop_at
    for member in range(3):
        alone = Patience(2)
        stops = [bool(alone.update(v)) for v in values[:, member]]
        assert (stops.index(True) if any(stops) else None) == expected_stop_at[member]
    inactive = Patience(1, size=2)
    assert not inactive.update([1.0, 1.0], active=np.array([True, False])).any()
    assert list(inactive.update([2.0, 2.0], active=np.array([True, False]))) == [True, False]
    assert not Patience(1, min_delta=0.1).update(1.0) and Patience(1, min_delta=0.1).best == np.inf
    strict = Patience(1, min_delta=0.1)
    strict.update(1.0)
    assert strict.update(0.95) and strict.best == 1.0  # an improvement under min_delta counts as none
    rising = Patience(1, mode="max")
    assert not rising.update(0.5) and not rising.update(0.6) and rising.update(0.6)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="patience must be an integer >= 1"):
            Patience(bad)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        Patience(1, mode="lowest")


def _with(dataset, **changes):
    import dataclasses
    return dataclasses.replace(dataset, **changes)


def test_wrong_input_shape_and_labels_out_of_range(digits):
    state = create_train_state(small_mlp(), optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(0))
    wide = data_lib.Split(x=np.zeros((100, 28, 28, 1), np.float32), y=np.zeros(100, np.int32))
    with pytest.raises(ValueError, match=r"\(8, 8, 1\).*\(28, 28, 1\)"):
        fit(state, _with(digits, train=wide, val=wide, test=wide, input_shape=(28, 28, 1)), num_steps=1, progress=False)
    # A model with fewer outputs than the data has classes: caught before compiling.
    five = create_train_state(models.get_model("mlp", num_classes=5, width=8, depth=1), optax.sgd(0.1),
                              digits.input_shape, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"labels out of range in the train split: found labels in \[0, 9\].*5 outputs"):
        fit(five, digits, num_steps=1, progress=False)
    # The data layer refuses labels outside [0, num_classes) and NaN inputs when a split is built.
    with pytest.raises(ValueError, match="num_classes=10"):
        _with(digits, train=data_lib.Split(x=digits.train.x, y=np.full(len(digits.train), 10, np.int32)))
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        data_lib.Split(x=np.full((4, 8, 8, 1), np.nan, np.float32), y=np.zeros(4, np.int32))


@pytest.mark.parametrize("steps_per_call", [4, 7])
def test_several_steps_per_call_are_bit_identical_to_one(digits, tmp_path, steps_per_call):
    """Dropout, a cosine schedule, log/eval boundaries that do not divide the call length: same bits, same records."""
    model = models.get_model("mlp", num_classes=10, width=32, depth=2, dropout=0.2)
    schedule = optax.cosine_decay_schedule(3e-3, 60)
    results = {}
    for k in (1, steps_per_call):
        state = create_train_state(model, optax.adam(schedule), digits.input_shape, jax.random.PRNGKey(0))
        results[k] = fit(state, digits, batch_size=32, num_steps=60, schedule=schedule, log_every=10, eval_every=19,
                         steps_per_call=k, run_dir=tmp_path / str(k), progress=False)
    one, many = results[1], results[steps_per_call]
    for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(many.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda history: [{k: v for k, v in r.items() if k != "time_s"} for r in history]
    assert strip(one.history) == strip(many.history)
    assert [r["step"] for r in one.history] == [10, 19, 20, 30, 38, 40, 50, 57, 60]


def test_a_short_run_compiles_one_step_program_with_the_same_bits_and_records(digits, monkeypatch):
    """Up to ALWAYS_FULL_METRICS_STEPS steps every step computes the norms: one compiled step program where the
    cheap/full pair (forced here with a threshold of 0) compiles two, and the same states and records."""
    fit_module = importlib.import_module("jaxnn.train.fit")  # (jaxnn.train.fit is the function)
    compiled: list[str] = []

    def listener(name, seconds, fun_name="", **kwargs):
        if name.endswith("backend_compile_duration"):
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    model = models.get_model("mlp", num_classes=10, width=24, depth=2, dropout=0.1)  # shapes no other test uses
    results, programs, default = {}, {}, fit_module.ALWAYS_FULL_METRICS_STEPS
    assert default >= 25  # the run below is a short one
    try:
        for threshold in (default, 0):
            monkeypatch.setattr(fit_module, "ALWAYS_FULL_METRICS_STEPS", threshold)
            compiled.clear()
            state = create_train_state(model, optax.adam(1e-3), digits.input_shape, jax.random.PRNGKey(0))
            results[threshold] = fit(state, digits, batch_size=24, num_steps=25, log_every=10, eval_every=25,
                                     progress=False)
            programs[threshold] = compiled.count("jit(steps)")
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert programs == {default: 1, 0: 2}  # (a new optimizer object: each run compiles its own programs)
    short, pair = results[default], results[0]
    for a, b in zip(jax.tree.leaves((short.state.params, short.state.opt_state)),
                    jax.tree.leaves((pair.state.params, pair.state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda history: [{k: v for k, v in r.items() if k != "time_s"} for r in history]  # noqa: E731
    assert strip(short.history) == strip(pair.history)
    assert [r["step"] for r in short.history] == [10, 20, 25] and all(r["grad_norm"] > 0 for r in short.history)


def test_steps_per_call_needs_the_split_on_the_device(digits):
    state = create_train_state(small_mlp(), optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="steps_per_call=4 needs the training split on the device"):
        fit(state, digits, batch_size=32, num_steps=8, steps_per_call=4, device_resident=False, progress=False)
    with pytest.raises(ValueError, match="steps_per_call must be an integer >= 1"):
        fit(state, digits, batch_size=32, num_steps=8, steps_per_call=0, progress=False)


def test_host_batches_and_device_resident_batches_train_alike(digits):
    """Both batch sources feed step s the same examples; results agree to float noise (not bit for bit: the
    gather runs inside the compiled step in one case)."""
    finals = []
    for resident in (False, True):
        state = create_train_state(small_mlp(), optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(0))
        finals.append(fit(state, digits, batch_size=32, num_steps=30, device_resident=resident, progress=False,
                          log_every=30, eval_every=30).state.params)
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_options_objects_and_keywords_train_alike(digits):
    """``fit``'s step and logging options as keywords or as StepOptions/LogOptions objects: the same records and
    bits; keywords override an object's field; a misspelt option or a wrong object is a TypeError naming it."""
    from jaxnn.train import LogOptions, StepOptions

    def run(**options):
        state = create_train_state(small_mlp(), optax.adam(1e-3), digits.input_shape, jax.random.PRNGKey(0))
        return fit(state, digits, batch_size=32, num_steps=12, **options)

    keywords = run(grad_accum_steps=2, log_every=4, eval_every=6, progress=False)
    objects = run(step_options=StepOptions(grad_accum_steps=2),
                  log_options=LogOptions(log_every=5, eval_every=6, progress=False), log_every=4)
    assert [r["step"] for r in keywords.history] == [r["step"] for r in objects.history] == [4, 6, 8, 12]
    for a, b in zip(jax.tree.leaves(keywords.state.params), jax.tree.leaves(objects.state.params)):
        np.testing.assert_array_equal(a, b)
    plain = run(log_every=4, eval_every=6, progress=False)  # the accumulation did reach the step
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain.state.params),
                                                        jax.tree.leaves(keywords.state.params)))
    with pytest.raises(TypeError, match="fit\\(\\) got an unexpected keyword argument 'log_evry'"):
        run(log_evry=4)
    with pytest.raises(TypeError, match="log_options must be a LogOptions, got dict"):
        run(log_options={"log_every": 4})


def test_fit_releases_compiled_programs_near_the_memory_map_limit(digits, monkeypatch):
    """XLA:CPU keeps every compiled program mapped; past Linux's limit the next compilation crashed (a full experiment
    of ~110 trainings and Hessian programs did). fit empties JAX's caches first when the process is near it."""
    from jaxnn import runtime

    held = runtime.memory_mappings()
    if held is None:
        pytest.skip("no /proc/self/maps here (not Linux)")
    assert 0 < held[0] < held[1]
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(True))
    monkeypatch.setattr(runtime, "_clearing_did_not_help_at", [])
    state = lambda: create_train_state(small_mlp(), optax.sgd(0.1), digits.input_shape,  # noqa: E731
                                       jax.random.PRNGKey(0))
    monkeypatch.setattr(runtime, "memory_mappings", lambda: (1_000, 65_530))
    fit(state(), digits, batch_size=32, num_steps=2, log_every=2, eval_every=2, progress=False)
    assert cleared == []
    counts = iter([60_000, 20_000])  # before and after the release
    monkeypatch.setattr(runtime, "memory_mappings", lambda: (next(counts), 65_530))
    with pytest.warns(RuntimeWarning, match=r"held 60,000 of the system's 65,530 memory mappings .*released JAX's "
                                            r"compiled programs .*\(20,000 left\)\. They compile again when used\.$"):
        fit(state(), digits, batch_size=32, num_steps=2, log_every=2, eval_every=2, progress=False)
    assert cleared == [True]
    # a release that leaves the count above the threshold says so once; the next fits do not clear again until
    # the count has grown by 5% of the limit
    counts = iter([60_000, 59_000, 60_000, 62_500, 62_000])
    with pytest.warns(RuntimeWarning, match="did not bring the count below the threshold"):
        fit(state(), digits, batch_size=32, num_steps=2, log_every=2, eval_every=2, progress=False)
    fit(state(), digits, batch_size=32, num_steps=2, log_every=2, eval_every=2, progress=False)
    assert cleared == [True, True]
    with pytest.warns(RuntimeWarning, match="held 62,500"):
        fit(state(), digits, batch_size=32, num_steps=2, log_every=2, eval_every=2, progress=False)
    assert cleared == [True, True, True]


def test_donate_false_keeps_the_input_state_and_trains_to_the_same_bits(digits):
    """fit donates the state's buffers by default (the passed state is consumed); donate=False keeps it alive, on
    the device-resident and the host-batch paths, with the same parameters bit for bit."""
    def trained(**options):
        state = create_train_state(small_mlp(), optax.adam(1e-2), digits.input_shape, jax.random.PRNGKey(0))
        result = fit(state, digits, batch_size=32, num_steps=6, log_every=3, eval_every=6, progress=False,
                     **options)
        return state, result.state

    for resident in (True, False):
        kept, trained_kept = trained(donate=False, device_resident=resident)
        consumed, trained_donated = trained(device_resident=resident)
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept.params))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(consumed.params))
        for a, b in zip(jax.tree.leaves(trained_kept.params), jax.tree.leaves(trained_donated.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
