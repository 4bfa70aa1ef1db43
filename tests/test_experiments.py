"""Experiment scripts in smoke size (JAXNN_FULL=1 runs them full size): outputs exist and the numbers they
record agree with an independent computation."""

import importlib.util
import json
import pathlib

import jax
import jax.flatten_util
import numpy as np
import pytest

import jaxnn

pytestmark = pytest.mark.experiment
ROOT = pathlib.Path(__file__).parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edge_of_stability_smoke(tmp_path):
    eos = _load("edge_of_stability")
    results = eos.measure(tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "sharpness.png").stat().st_size > 10_000
    size = eos.FULL if saved["size"] == "full" else eos.SMOKE
    assert [r["lr"] for r in saved["runs"]] == list(size["lrs"])
    for run, params in zip(saved["runs"], results["final_params"]):
        assert run["steps"] == list(range(size["every"], size["steps"] + 1, size["every"]))
        # Oracle: the recorded final sharpness equals the top eigenvalue of the dense Hessian.
        model = jaxnn.models.get_model("mlp", num_classes=10, width=size["width"], depth=2, activation="tanh")
        loss_fn = jaxnn.make_loss_fn(model.apply, "softmax_cross_entropy", {})
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        dense = jax.hessian(lambda f: loss_fn(unravel(f), results["full_batch"]))(flat)
        top = float(np.linalg.eigvalsh(np.asarray(dense, np.float64))[-1])
        assert run["lambda_max"][-1] == pytest.approx(top, rel=2e-3)


def test_conditioning_smoke_numbers_against_closed_forms(tmp_path):
    """Every verdict is computed from measured numbers; the numbers themselves are checked here against numpy and
    closed forms: κ of the construction, GD's one step at κ = 1, the divergence threshold 2/λmax, the trajectories."""
    from jaxnn.experiment import run_experiment

    record = run_experiment("conditioning", smoke=True, out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["verdict"] == record["verdict"] and (tmp_path / "summary.md").is_file()
    assert (tmp_path / "conditioning.png").stat().st_size > 10_000
    conditioning = _load("conditioning")
    for row in saved["measured"]["rows"]:
        a, _ = conditioning.quadratic(row["kappa"], saved["setting"]["dim"], saved["setting"]["seed"])
        eigenvalues = np.linalg.eigvalsh(a)
        assert row["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-10)
        assert row["kappa_measured"] == pytest.approx(eigenvalues[-1] / eigenvalues[0], rel=1e-8)
    assert saved["measured"]["rows"][0]["gd_steps"] == 1  # κ = 1, lr = 1/λ: x₁ = 0
    assert saved["measured"]["divergence_threshold_times_lambda_max"] == pytest.approx(2.0, rel=0.01)
    assert max(saved["measured"]["trajectory_gap_eps_as_optax"].values()) < 1e-12
    assert saved["measured"]["trajectory_gap_eps_as_notes"]["rmsprop"] > 1e-12  # ε placement matters
    verdicts = [c["agrees"] for c in saved["checks"]]
    assert saved["verdict"] == ("agrees" if all(verdicts) else "disagrees" if not any(verdicts) else "partly")


def test_verdict_rule_and_generated_table(tmp_path):
    from jaxnn.experiment import Result, write_table

    assert Result({}, [("a", "1", True), ("b", "2", True)]).verdict == "agrees"
    assert Result({}, [("a", "1", True), ("b", "2", False)]).verdict == "partly"
    assert Result({}, [("a", "1", False)]).verdict == "disagrees"
    with pytest.raises(ValueError, match="at least one check"):
        Result({}, []).verdict
    results = tmp_path / "results" / "demo"
    results.mkdir(parents=True)
    (results / "result.json").write_text(json.dumps({
        "name": "demo", "size": "smoke", "claim": "x", "verdict": "partly", "figures": ["demo.png"],
        "checks": [{"check": "c", "measured": "3 vs 4", "agrees": False}]}))
    readme = tmp_path / "README.md"
    readme.write_text("# Experiments\n\nText before.\n")
    table = write_table(tmp_path / "results", readme)
    assert "| demo (smoke) | x | 3 vs 4 | **partly** |" in table
    first = readme.read_text()
    write_table(tmp_path / "results", readme)
    assert readme.read_text() == first and first.startswith("# Experiments\n\nText before.")


@pytest.mark.parametrize("args, words", [
    (["experiment", "nonesuch"], "unknown experiment 'nonesuch'; experiments: conditioning"),
    (["experiment", "conditioning", "--set", "dimm=3"], "--set dimm: the experiment has no such setting"),
])
def test_experiment_command_bad_input(args, words, capsys):
    from jaxnn.cli import main

    assert main(args) == 2
    assert words in capsys.readouterr().err


def test_depth_init_batchnorm_smoke_against_closed_forms(tmp_path):
    from jaxnn.experiment import run_experiment

    record = run_experiment("depth_init_batchnorm", smoke=True, out_dir=tmp_path, progress=False)
    measured, setting = record["measured"], record["setting"]
    rng = np.random.default_rng(setting["seed"])
    x = rng.normal(size=(setting["examples"], setting["width"])).astype(np.float32)
    for name, variances in measured["activation_variance"].items():
        assert len(variances) == setting["depth"] + 1  # every hidden layer and the head
        assert variances[0] == pytest.approx(float(np.var(x)), rel=1e-5), name  # the first layer reads the data
    # tanh with N(0, 1) weights on ±1 inputs: z ~ N(0, width), saturated when |z| > atanh(0.99).
    from math import atanh, erf, sqrt

    expected = 1 - erf(atanh(0.99) / sqrt(setting["width"]) / sqrt(2))
    assert all(abs(r["saturated"] - expected) < 0.03 for r in measured["tanh"]["tanh N(0, 1)"][1:])
    # The hand-derived batch-norm backward against central differences (independent of jax).
    module = _load("depth_init_batchnorm")
    data = np.random.default_rng(1)
    xs, gamma, dy = data.normal(size=(6, 3)), data.normal(size=3), data.normal(size=(6, 3))

    def forward(z):
        return float(np.sum(dy * gamma * (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)))

    numeric = np.zeros_like(xs)
    for index in np.ndindex(xs.shape):
        step = np.zeros_like(xs)
        step[index] = 1e-6
        numeric[index] = (forward(xs + step) - forward(xs - step)) / 2e-6
    np.testing.assert_allclose(module.batchnorm_backward_by_hand(xs, gamma, dy, 1e-5), numeric, rtol=1e-6,
                               atol=1e-8)
    verdicts = [c["agrees"] for c in record["checks"]]
    assert record["verdict"] == ("agrees" if all(verdicts) else "disagrees" if not any(verdicts) else "partly")


def _verdict_follows_checks(record):
    verdicts = [c["agrees"] for c in record["checks"]]
    return record["verdict"] == ("agrees" if all(verdicts) else "disagrees" if not any(verdicts) else "partly")


def test_ridge_smoke_against_numpy(tmp_path):
    from jaxnn.experiment import run_experiment

    record = run_experiment("ridge", smoke=True, out_dir=tmp_path, progress=False)
    ridge, setting = _load("ridge"), record["setting"]
    x, y = ridge.data(setting["examples"], setting["features"], setting["noise"], setting["seed"])
    for row in record["measured"]["rows"]:
        eigenvalues = np.linalg.eigvalsh(x.T @ x + row["lambda"] * np.eye(x.shape[1]))
        assert row["kappa_engine"] == pytest.approx(eigenvalues[-1] / eigenvalues[0], rel=1e-8)
    np.testing.assert_allclose(ridge.ridge_closed_form(x, y, 0.0), np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-8)
    assert record["measured"]["ridge_wide_lambda_min"] == pytest.approx(1.0, rel=1e-8)
    assert _verdict_follows_checks(record)


def test_losses_smoke_worked_values(tmp_path):
    from jaxnn.experiment import run_experiment

    record = run_experiment("losses", smoke=True, out_dir=tmp_path, progress=False)
    scores = [[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]]
    hinge = [sum(max(0.0, s[j] - s[i] + 1) for j in range(3) if j != i) for i, s in enumerate(scores)]
    np.testing.assert_allclose(record["measured"]["hinge"], hinge, atol=1e-12)
    softmax = [-(s[i] - np.log(sum(np.exp(v) for v in s))) for i, s in enumerate(scores)]
    np.testing.assert_allclose(record["measured"]["softmax_cross_entropy"], softmax, rtol=1e-12)
    crammer = [max(s[j] + (j != i) for j in range(3)) - s[i] for i, s in enumerate(scores)]
    np.testing.assert_allclose(record["measured"]["crammer_singer_hinge"], crammer, atol=1e-6)
    assert _verdict_follows_checks(record)


def test_saddle_points_smoke_against_dense_hessians(tmp_path):
    from jax.flatten_util import ravel_pytree

    from jaxnn.experiment import run_experiment

    record = run_experiment("saddle_points", smoke=True, out_dir=tmp_path, progress=False)
    quadratic = record["measured"]["x² − y²"]
    assert (quadratic["lambda_min"], quadratic["lambda_max"]) == pytest.approx((-2.0, 2.0), abs=1e-12)
    module = _load("saddle_points")
    with jax.enable_x64(True):
        loss, start = module._problems(record["setting"])["two-layer linear network"]
        flat, unravel = ravel_pytree(jax.tree.map(lambda a: jax.numpy.asarray(a, jax.numpy.float64), start))
        eigenvalues = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat)))
    network = record["measured"]["two-layer linear network"]
    assert network["lambda_min"] == pytest.approx(eigenvalues[0], rel=1e-8)
    assert network["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-8)
    assert _verdict_follows_checks(record)


def test_ill_conditioning_smoke_against_the_dense_hessian(tmp_path):
    """The recorded predicted change at the last logged step equals −εgᵀg + ½ε²gᵀHg from jax.hessian of the same
    model (retrained here with the same seed and steps), and the actual change is the loss difference."""
    import optax

    from jaxnn import data as data_lib, losses, models
    from jaxnn.experiment import run_experiment
    from jaxnn.train import create_train_state, fit

    record = run_experiment("ill_conditioning", smoke=True, out_dir=tmp_path, progress=False)
    setting, last = record["setting"], record["measured"]["rows"][-1]
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=setting["width"], depth=setting["depth"])
    state = create_train_state(model, optax.sgd(setting["lr"]), digits.input_shape,
                               jax.random.PRNGKey(setting["seed"]))
    state = fit(state, digits, batch_size=setting["batch_size"], num_steps=last["step"], log_every=last["step"],
                eval_every=last["step"], progress=False).state
    batch = (digits.train.x[:setting["analysis_examples"]], digits.train.y[:setting["analysis_examples"]])
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state.model_state)
    flat, unravel = jax.flatten_util.ravel_pytree(state.params)
    total = lambda f: loss_fn(unravel(f), batch)  # noqa: E731
    g = np.asarray(jax.grad(total)(flat), np.float64)
    hessian = np.asarray(jax.hessian(total)(flat), np.float64)
    lr = setting["lr"]
    predicted = -lr * g @ g + 0.5 * lr**2 * g @ hessian @ g
    assert last["predicted"] == pytest.approx(predicted, rel=1e-3, abs=1e-6)
    assert last["actual"] == pytest.approx(float(total(flat - lr * g)) - float(total(flat)), rel=1e-3, abs=1e-6)
    assert _verdict_follows_checks(record)
