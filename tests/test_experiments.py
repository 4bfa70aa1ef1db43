"""Experiment scripts in smoke size (`jaxnn experiment NAME` runs them full size): outputs exist and the numbers they
record agree with an independent computation."""

import hashlib
import importlib
import json
import pathlib

import jax
import jax.flatten_util
import numpy as np
import pytest

import jaxnn

pytestmark = pytest.mark.experiment
ROOT = pathlib.Path(__file__).parent.parent


def _numpy_lanczos(hvp, flat, steps: int) -> np.ndarray:
    """Ritz values (ascending) of ``steps`` Lanczos steps written in numpy: full reorthogonalisation (two classical
    Gram-Schmidt passes), a seeded numpy start vector, products ``hvp(v)`` (jax.jvp of jax.grad in the tests)."""
    q = np.random.default_rng(0).normal(size=flat.size)
    basis, alphas, betas = [q / np.linalg.norm(q)], [], []
    for _ in range(steps):
        w = np.asarray(hvp(jax.numpy.asarray(basis[-1], flat.dtype)), np.float64)
        alphas.append(w @ basis[-1])
        stacked = np.array(basis)
        for _ in range(2):
            w = w - stacked.T @ (stacked @ w)
        betas.append(np.linalg.norm(w))
        basis.append(w / betas[-1])
    return np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1))


def _retrained_resnet(kind, depth, setting, measured):
    """A ResNet experiment's net ("resnet" or "plain", batch norm) retrained by fit as the experiment says, on the
    digits: (its loss on the analysis examples, an HVP by jax.jvp of jax.grad there on the flat parameters, the flat
    parameters)."""
    import optax

    from jaxnn import data as data_lib, losses, models
    from jaxnn.train import create_train_state, fit

    digits = data_lib.load_dataset("digits", seed=setting["seed"])
    model = models.get_model(kind, num_classes=10, depth=depth, norm="batch", base_width=setting["width"])
    state = create_train_state(model, optax.sgd(setting["lr"], momentum=setting["momentum"]), digits.input_shape,
                               jax.random.PRNGKey(setting["seed"]))
    state = fit(state, digits, batch_size=setting["batch_size"], num_steps=measured["steps"],
                log_every=measured["steps"], eval_every=measured["steps"], progress=False).state
    count = measured["analysis_examples"]
    batch = (digits.train.x[:count], digits.train.y[:count])
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state.model_state)
    flat, unravel = jax.flatten_util.ravel_pytree(state.params)
    grad = jax.jit(jax.grad(lambda f: loss_fn(unravel(f), batch)))
    hvp = jax.jit(lambda v: jax.jvp(grad, (flat,), (v,))[1])
    return float(loss_fn(state.params, batch)), hvp, flat


def _load(name):
    return importlib.import_module(f"jaxnn.experiments.{name}")


def test_edge_of_stability_smoke_against_dense_hessians(tmp_path):
    """Smoke size: every GD member's (PyTorch and He init, every seed and η) first and last λmax equal the top
    eigenvalue of jax.hessian at its initial weights and at the weights of the same GD retrained here alone by a plain
    loop, with that init's own model; Adam's last preconditioned sharpness of every seed equals the top eigenvalue of
    the dense D·H·D, D = P^-1/2 from the optax state of the same Adam run retrained alone; the PyTorch init draws
    within ±1/√fan_in with a uniform's spread; the analysis helpers on hand-made series."""
    import optax

    from jaxnn import data as data_lib, losses
    from jaxnn.experiments import run_experiment
    from jaxnn.models import init_model

    eos = _load("edge_of_stability")
    record = run_experiment("edge_of_stability", smoke=True, overrides={"he_seeds": 1}, out_dir=tmp_path,
                            progress=False)
    setting, measured = record["setting"], record["measured"]
    assert (tmp_path / "edge_of_stability.png").stat().st_size > 10_000
    dataset = data_lib.load_dataset("digits", seed=0, limit=round(setting["examples"] / 0.7), val_fraction=0.1,
                                    test_fraction=0.2)
    batch = (dataset.train.x, dataset.train.y)

    def top(matrix):
        return float(np.linalg.eigvalsh(np.asarray(matrix, np.float64))[-1])

    def init(kind, seed):
        return init_model(eos.make_model(setting, kind), jax.random.PRNGKey(seed), dataset.input_shape)[0]

    loss_fns, grads, hessians, initial_tops = {}, {}, {}, {}

    def loss_of(kind):  # one loss, gradient and dense Hessian program per init (compiled once, used by every run)
        if kind not in loss_fns:
            loss_fns[kind] = losses.make_loss_fn(eos.make_model(setting, kind).apply, eos.squared_error)
            grads[kind] = jax.jit(jax.grad(loss_fns[kind]))
        return loss_fns[kind]

    def dense_hessian(kind, params):
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        if kind not in hessians:
            hessians[kind] = jax.jit(jax.hessian(lambda f: loss_of(kind)(unravel(f), batch)))
        return np.asarray(hessians[kind](flat), np.float64)

    for layer in init("pytorch", 0).values():  # PyTorch's nn.Linear default: U(±1/√fan_in), weights and biases
        bound = 1 / np.sqrt(layer["kernel"].shape[0])
        assert np.abs(layer["kernel"]).max() <= bound and np.abs(layer["bias"]).max() <= bound
        assert np.std(layer["kernel"]) == pytest.approx(bound / np.sqrt(3), rel=0.15)
        assert np.abs(layer["bias"]).max() > 0

    runs = measured["gd"]["pytorch"] + measured["gd"]["he"]
    assert sorted((r["init"], r["lr"], r["seed"]) for r in runs) == sorted(
        [("pytorch", lr, s) for lr in setting["lrs"] for s in range(setting["seeds"])]
        + [("he", lr, s) for lr in setting["lrs"] for s in range(setting["he_seeds"])])
    for run in runs:
        loss_of(run["init"])
        grad = grads[run["init"]]
        params = init(run["init"], run["seed"])
        start = (run["init"], run["seed"])  # the same initial weights for every η: one dense eigendecomposition
        if start not in initial_tops:
            initial_tops[start] = top(dense_hessian(run["init"], params))
        assert run["lambda_max"][0] == pytest.approx(initial_tops[start], rel=2e-3)
        steps = setting["steps"][setting["lrs"].index(run["lr"])]
        for _ in range(steps):
            params = jax.tree.map(lambda p, g: p - run["lr"] * g, params, grad(params, batch))
        assert run["lambda_max"][-1] == pytest.approx(top(dense_hessian(run["init"], params)), rel=2e-3)
        assert run["steps"] == list(range(0, steps + 1, setting["every"]))

    tx = optax.adam(setting["adam_lr"], b1=0.9, b2=0.999, eps=setting["adam_eps"])
    assert measured["adam"]["limit"] == pytest.approx(38 / setting["adam_lr"])
    assert [r["seed"] for r in measured["adam"]["runs"]] == list(range(setting["seeds"]))

    @jax.jit
    def adam_step(params, opt_state):
        updates, opt_state = tx.update(grads["pytorch"](params, batch), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    loss_of("pytorch")
    for run in measured["adam"]["runs"]:
        params = init("pytorch", run["seed"])
        opt_state = tx.init(params)
        for _ in range(setting["adam_steps"]):
            params, opt_state = adam_step(params, opt_state)
        t = int(opt_state[0].count)
        nu, _ = jax.flatten_util.ravel_pytree(opt_state[0].nu)
        d = 1 / np.sqrt((1 - 0.9**t) * (np.sqrt(np.asarray(nu, np.float64) / (1 - 0.999**t)) + setting["adam_eps"]))
        dense = dense_hessian("pytorch", params)
        assert run["preconditioned_sharpness"][-1] == pytest.approx(top(d[:, None] * dense * d[None, :]), rel=5e-3)

    falling = np.linspace(1.0, 0.1, 51)
    falling[25] = 0.9  # one rise, after the arrival at step 20
    a = eos.edge_analysis([0.2, 0.5, 0.96, 1.1, 0.9, 1.0], [0, 10, 20, 30, 40, 50], falling)
    assert (a["start"], a["peak"], a["arrival_step"], a["after"]) == pytest.approx((0.2, 1.1, 20, 4))
    assert (a["median_after"], a["rises_after"], a["loss_at_arrival"], a["loss_final"]) == pytest.approx(
        (0.98, 1, falling[20], 0.1))
    assert not eos.hovers(a)  # fewer than MIN_AFTER measurements after arrival
    assert eos.edge_analysis([0.2, 0.5], [0, 10], np.ones(11))["arrival_step"] is None
    catapult = eos.edge_analysis([1.3, 0.8, 0.9, 1.0], [0, 10, 20, 30], np.ones(31))  # arrives from below only
    assert (catapult["start"], catapult["low"], catapult["arrival_step"]) == pytest.approx((1.3, 0.8, 30))
    steady = eos.edge_analysis([0.3] + [1.0, 1.05] * 6, list(range(0, 130, 10)), np.ones(121))
    assert eos.hovers(steady) and steady["rises_after"] == 0
    assert not eos.hovers(eos.edge_analysis([0.3] + [1.0, 1.3] * 6, list(range(0, 130, 10)), np.ones(121)))


def test_conditioning_smoke_numbers_against_closed_forms(tmp_path):
    """Every verdict is computed from measured numbers; the numbers themselves are checked here against numpy and
    closed forms: κ of the construction, GD's one step at κ = 1, the divergence threshold 2/λmax, the trajectories."""
    from jaxnn.experiments import run_experiment

    record = run_experiment("conditioning", smoke=True, out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["verdict"] == record["verdict"] and (tmp_path / "summary.md").is_file()
    assert (tmp_path / "conditioning.png").stat().st_size > 10_000
    conditioning = _load("conditioning")
    for row in saved["measured"]["rows"]:
        a, _ = conditioning.quadratic(row["kappa"], saved["setting"]["dim"], row["seed"])
        eigenvalues = np.linalg.eigvalsh(a)
        assert row["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-10)
        assert row["kappa_measured"] == pytest.approx(eigenvalues[-1] / eigenvalues[0], rel=1e-8)
        if row["kappa"] == 1:
            assert row["gd_steps"] == 1  # κ = 1, lr = 1/λ: x₁ = 0
    seeds = saved["setting"]["seeds"]
    assert {r["seed"] for r in saved["measured"]["rows"]} == set(seeds) and len(seeds) >= 3
    assert saved["measured"]["divergence_threshold_times_lambda_max"] == pytest.approx([2.0] * 3, rel=0.01)
    assert max(saved["measured"]["trajectory_gap_as_corrected"].values()) < 1e-12
    written = saved["measured"]["trajectory_gap_as_written"]
    assert written["rmsprop"] > 1e-3 and written["adam"] > 1e-3  # the notes' two errors change the trajectory
    assert max(written[k] for k in ("sgd", "momentum", "nesterov", "adagrad")) < 1e-12  # and nothing else does
    assert saved["measured"]["trajectory_gap_eps_as_notes"]["rmsprop"] > 1e-12  # ε placement matters
    ill = [r for r in saved["measured"]["rows"] if r["kappa"] >= saved["setting"]["ill_conditioned"]]
    assert saved["checks"][3]["agrees"] == all(2 * r["momentum_steps"] <= r["gd_steps"] for r in ill)
    verdicts = [c["agrees"] for c in saved["checks"]]
    assert saved["verdict"] == ("agrees" if all(verdicts) else "disagrees" if not any(verdicts) else "partly")


def test_verdict_rule_and_generated_table(tmp_path):
    from jaxnn.experiments import Result, write_table

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
    assert "| demo (smoke) | x | ✗ c: **3 vs 4** | **partly** | ![](results/demo/demo.png) |" in table
    first = readme.read_text()
    write_table(tmp_path / "results", readme)
    assert readme.read_text() == first and first.startswith("# Experiments\n\nText before.")
    write_table(tmp_path / "results")  # by default beside the results it read
    assert "![](demo/demo.png)" in (tmp_path / "results" / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="no result files in"):
        write_table(tmp_path / "empty", tmp_path / "never.md")
    assert not (tmp_path / "never.md").exists()


def test_committed_results_come_from_todays_experiment_code():
    """Every committed results/NAME/result.json is a full-size run of the experiment file that ships: its recorded
    sha256 is the sha256 of jaxnn/experiments/NAME.py (re-run the experiment after editing it); the generated table
    in experiments/README.md is the one these results give."""
    from jaxnn.experiments import experiment_names, experiment_source, write_table

    results = sorted((ROOT / "results").glob("*/result.json"))
    assert sorted(p.parent.name for p in results) == experiment_names()
    stale = []
    for path in results:
        record = json.loads(path.read_text())
        source = hashlib.sha256(experiment_source(record["name"]).read_bytes()).hexdigest()
        assert record["size"] == "full", path
        if (record.get("code") or {}).get("experiment_sha256") != source:
            stale.append(record["name"])
    assert not stale, f"results produced by another version of their experiment file (re-run them): {stale}"
    readme = ROOT / "experiments" / "README.md"
    text = readme.read_text()
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        copy = pathlib.Path(scratch) / "experiments" / "README.md"
        copy.parent.mkdir()
        copy.write_text(text)
        (pathlib.Path(scratch) / "results").symlink_to(ROOT / "results")
        write_table(pathlib.Path(scratch) / "results", copy)
        assert copy.read_text() == text, ("experiments/README.md is not the table of results/: jaxnn experiment "
                                          "--table --readme experiments/README.md")


def test_result_records_its_code_and_reads_data_from_jaxnn_data(tmp_path, monkeypatch):
    """result.json's code record is the sha256 of the imported experiment file, jaxnn's version and the checkout's
    commit; data_dir unset reads $JAXNN_DATA/<name>, a set data_dir wins, and a missing folder names both ways."""
    import subprocess

    import jaxnn
    from jaxnn.experiments import data_folder, run_experiment

    record = run_experiment("losses", smoke=True, out_dir=tmp_path / "out", progress=False)
    code = record["code"]
    source = ROOT / "jaxnn" / "experiments" / "losses.py"
    assert code["experiment_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert code["jaxnn_version"] == jaxnn.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert code["git_commit"] == head.stdout.strip() and isinstance(code["experiment_file_modified"], bool)
    assert "experiment source sha256 " + code["experiment_sha256"][:12] in (tmp_path / "out" / "summary.md").read_text()
    monkeypatch.setenv("JAXNN_DATA", str(tmp_path / "root"))
    assert data_folder({"data_dir": ""}, "mnist") == tmp_path / "root" / "mnist"
    assert data_folder({"data_dir": str(tmp_path / "mine")}, "mnist") == tmp_path / "mine"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'root' / 'mnist'} does not exist.*--set data_dir=PATH, "
                                                "or set JAXNN_DATA"):
        run_experiment("label_noise", smoke=True, out_dir=tmp_path / "o2", progress=False)


@pytest.mark.parametrize("args, words", [
    (["experiment", "nonesuch"], "unknown experiment 'nonesuch'; experiments: batchnorm_residual_hessian, conditioning"),
    (["experiment", "conditioning", "--set", "dimm=3"], "--set dimm: the experiment has no such setting"),
    (["experiment", "label_noise", "--smoke", "--set", "data_dir=/nonexistent/mnist"],
     "experiment label_noise needs MNIST: /nonexistent/mnist does not exist. Expected there: train-images-idx3-ubyte, "
     "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"),
])
def test_experiment_command_bad_input(args, words, capsys):
    from jaxnn.cli import main

    assert main(args) == 2
    assert words in capsys.readouterr().err


def test_depth_init_batchnorm_smoke_against_closed_forms(tmp_path):
    """Every seed's first layer reads its own Gaussian data; the He and Glorot weight and bias gradient norms and the
    tanh N(0, 1) activations (variance, saturated fraction, |a| in tenths) equal a hand-written forward pass (jnp
    matrix products on the same initial weights, jax.grad of its mean cross-entropy); the saturated fraction is near
    the Gaussian closed form; the hand-derived batch-norm backward equals central differences (numpy)."""
    import functools

    import optax

    from jaxnn import models
    from jaxnn.experiments import run_experiment
    from jaxnn.train import create_train_state

    record = run_experiment("depth_init_batchnorm", smoke=True, out_dir=tmp_path, progress=False)
    measured, setting = record["measured"], record["setting"]
    assert (tmp_path / "depth_init_batchnorm.png").stat().st_size > 10_000
    width, inputs = setting["width"], {}
    for seed in setting["seeds"]:
        rng = np.random.default_rng(seed)
        inputs[seed] = (rng.normal(size=(setting["examples"], width)).astype(np.float32),
                        rng.integers(0, 10, size=setting["examples"]))
    for name, runs in measured["activation_variance"].items():
        assert len(runs) == len(setting["seeds"])
        for seed, variances in zip(setting["seeds"], runs):
            assert len(variances) == setting["depth"] + 1  # every hidden layer and the head
            assert variances[0] == pytest.approx(float(np.var(inputs[seed][0])), rel=1e-5), name

    @functools.partial(jax.jit, static_argnums=3)
    def gradients(params, x, y, activation):
        """jax.grad of the mean cross-entropy of a forward pass written here, and the activations each layer reads."""
        def forward(params):
            h, reads, depth = x, [], len(params) - 1
            for i, layer in enumerate([f"dense_{i}" for i in range(depth)] + ["head"]):
                reads.append(h)
                h = h @ params[layer]["kernel"] + params[layer]["bias"]
                h = (jax.numpy.tanh(h) if activation == "tanh" else jax.nn.relu(h)) if i < depth else h
            return -jax.numpy.mean(jax.nn.log_softmax(h)[jax.numpy.arange(len(y)), y]), reads

        return jax.grad(forward, has_aux=True)(params)

    def hand(kernel_init, kernel_init_kwargs, activation, depth, seed):
        """(activations each layer reads, {layer: (‖∂L/∂W‖, ‖∂L/∂b‖)}) on the model's initial weights."""
        model = models.get_model("mlp", num_classes=10, width=width, depth=depth, activation=activation,
                                 kernel_init=kernel_init, kernel_init_kwargs=kernel_init_kwargs)
        params = create_train_state(model, optax.adam(1e-3), (width,), jax.random.PRNGKey(seed)).params
        grads, reads = gradients(params, *inputs[seed], activation)
        norms = {layer: (float(np.linalg.norm(g["kernel"])), float(np.linalg.norm(g["bias"])))
                 for layer, g in grads.items()}
        return [np.asarray(r, np.float64) for r in reads], norms

    depth = setting["depth"]
    for name, init in (("He", "he"), ("Glorot", "glorot_normal")):
        for index, seed in enumerate(setting["seeds"]):
            _, norms = hand(init, None, "relu", depth, seed)
            for layer in (0, depth - 1, depth):
                key = f"dense_{layer}" if layer < depth else "head"
                assert measured["weight_grad_norm"][name][index][layer] == pytest.approx(norms[key][0], rel=1e-3)
                assert measured["bias_grad_norm"][name][index][layer] == pytest.approx(norms[key][1], rel=1e-3)
            ratio = norms["dense_0"][0] / norms[f"dense_{depth - 1}"][0]
            assert measured["first_last_ratio"]["weight"][name][index] == pytest.approx(ratio, rel=1e-3)
    from math import atanh, erf, sqrt

    for index, seed in enumerate(setting["seeds"]):
        reads, _ = hand("small_normal", {"sigma": 1.0}, "tanh", setting["tanh_depth"], seed)
        rows = measured["tanh"]["tanh N(0, 1)"][index]
        for row, a, before in zip(rows[1:], reads[1:], reads[:-1]):
            assert row["activation_variance"] == pytest.approx(float(np.var(a)), rel=1e-4)
            assert row["saturated"] == pytest.approx(float(np.mean(np.abs(a) > 0.99)), abs=2e-3)
            assert np.abs(np.asarray(row["abs_tenths"]) - np.histogram(np.abs(a), 10, (0, 1))[0]).sum() <= 20
            # a unit reading the layer before through N(0, 1) weights: z ~ N(0, width·E[a²]), saturated when |z| >
            # atanh(0.99)
            expected = 1 - erf(atanh(0.99) / sqrt(width * float(np.mean(before**2))) / sqrt(2))
            assert abs(row["saturated"] - expected) < 0.03
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
    assert _verdict_follows_checks(record)


def _verdict_follows_checks(record):
    verdicts = [c["agrees"] for c in record["checks"]]
    return record["verdict"] == ("agrees" if all(verdicts) else "disagrees" if not any(verdicts) else "partly")


def test_ridge_smoke_against_numpy(tmp_path):
    from jaxnn.experiments import run_experiment

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
    from jaxnn.experiments import run_experiment

    record = run_experiment("losses", smoke=True, out_dir=tmp_path, progress=False)
    scores = [[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]]
    hinge = [sum(max(0.0, s[j] - s[i] + 1) for j in range(3) if j != i) for i, s in enumerate(scores)]
    np.testing.assert_allclose(record["measured"]["weston_watkins_hinge"], hinge, atol=1e-12)
    softmax = [-(s[i] - np.log(sum(np.exp(v) for v in s))) for i, s in enumerate(scores)]
    np.testing.assert_allclose(record["measured"]["softmax_cross_entropy"], softmax, rtol=1e-12)
    crammer = [max(s[j] + (j != i) for j in range(3)) - s[i] for i, s in enumerate(scores)]
    np.testing.assert_allclose(record["measured"]["crammer_singer_hinge"], crammer, atol=1e-6)
    ce, mse = record["measured"]["cross_entropy_steps"], record["measured"]["squared_error_steps"]
    assert len(ce) == len(mse) == len(record["setting"]["seeds"]) >= 3
    assert record["checks"][0]["agrees"] == all(m >= 2.0 * c for c, m in zip(ce, mse))
    assert all("−ln 0.8" not in c["check"] for c in record["checks"])  # a constant is reported, not checked
    assert _verdict_follows_checks(record)


def test_saddle_points_smoke_against_dense_hessians(tmp_path):
    from jax.flatten_util import ravel_pytree

    from jaxnn.experiments import run_experiment

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
    # Closed form at W = 0: the only nonzero block is ∂²L/∂W1_ij∂w2_k = −mean(y x_i)·δ_jk, so the spectrum is ±‖c‖
    # (c_i = mean(y x_i)), each with multiplicity = hidden, and zeros.
    setting = record["setting"]
    rng = np.random.default_rng(setting["seed"])
    x = rng.normal(size=(setting["examples"], setting["inputs"]))
    c = (x * (x @ rng.normal(size=setting["inputs"]))[:, None]).mean(axis=0)
    assert network["lambda_min"] == pytest.approx(-np.linalg.norm(c), rel=1e-8)
    assert network["bottom_multiplicity"] == setting["hidden"] and quadratic["bottom_multiplicity"] == 1
    assert len(network["leaving_direction_projection"]) == len(setting["noise_seeds"]) >= 3
    assert all(c["check"].find("plain GD started") < 0 for c in record["checks"])  # by construction: reported
    assert _verdict_follows_checks(record)


def test_ill_conditioning_smoke_against_the_dense_hessian(tmp_path):
    """Digits MLP: the recorded predicted change at the last logged step equals −εgᵀg + ½ε²gᵀHg from jax.hessian of
    the same model (retrained here with the same seed and steps), and the actual change is the loss difference.
    MNIST LeNet (too big for a dense Hessian): the same from a hand-written forward-over-reverse gᵀHg."""
    import optax

    from jaxnn import data as data_lib, losses, models
    from jaxnn.experiments import mnist, run_experiment
    from jaxnn.train import create_train_state, fit

    record = run_experiment("ill_conditioning", smoke=True, overrides={"width": 16, "steps": 60, "every": 20,
                                                                       "analysis_examples": 256},
                            out_dir=tmp_path, progress=False)  # a 1.5k-parameter MLP: its dense Hessian stays cheap
    setting = record["setting"]
    images = mnist(setting, "ill_conditioning", limit=setting["mnist_limit"])
    cases = [("digits_mlp", data_lib.load_dataset("digits", seed=0),
              models.get_model("mlp", num_classes=10, width=setting["width"], depth=setting["depth"]), setting["lr"]),
             ("mnist_lenet", images, models.get_model("lenet", num_classes=10), setting["lenet_lr"])]
    for key, dataset, model, lr in cases:
        last = record["measured"][key]["rows"][-1]
        state = create_train_state(model, optax.sgd(lr), dataset.input_shape, jax.random.PRNGKey(setting["seed"]))
        state = fit(state, dataset, batch_size=setting["batch_size"], num_steps=last["step"], log_every=last["step"],
                    eval_every=last["step"], progress=False).state
        count = record["measured"][key]["analysis_examples"]
        batch = (dataset.train.x[:count], dataset.train.y[:count])
        loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state.model_state)
        flat, unravel = jax.flatten_util.ravel_pytree(state.params)
        total = lambda f: loss_fn(unravel(f), batch)  # noqa: E731
        g = jax.grad(total)(flat)
        if key == "digits_mlp":
            gHg = float(np.asarray(g, np.float64) @ np.asarray(jax.jit(jax.hessian(total))(flat), np.float64)
                        @ np.asarray(g, np.float64))
        else:
            gHg = float(jax.jvp(jax.grad(total), (flat,), (g,))[1] @ g)
        predicted = -lr * float(g @ g) + 0.5 * lr**2 * gHg
        assert last["predicted"] == pytest.approx(predicted, rel=1e-3, abs=1e-6), key
        assert last["actual"] == pytest.approx(float(total(flat - lr * g)) - float(total(flat)), rel=1e-3,
                                               abs=1e-6), key
    assert _verdict_follows_checks(record)


def test_an_mnist_folder_without_the_files_is_named(tmp_path):
    from jaxnn.experiments import run_experiment

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ill_conditioning needs MNIST: .*empty holds no MNIST IDX files. "
                                                "Expected there: .*--set data_dir=PATH"):
        run_experiment("ill_conditioning", smoke=True, overrides={"data_dir": str(tmp_path / "empty")},
                       out_dir=tmp_path / "out", progress=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="incomplete IDX pair.*t10k-labels-idx1-ubyte"):
        run_experiment("label_noise", smoke=True, overrides={"data_dir": str(tmp_path / "half")},
                       out_dir=tmp_path / "out", progress=False)


def test_image_experiments_read_cifar10_from_data_dir(tmp_path):
    """data=cifar10: the python batches of data_dir (the folder or its parent), never downloaded; a folder without
    them and an unknown data name are named."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from test_data_cifar import write_batches

    from jaxnn.experiments import image_data, run_experiment

    write_batches(tmp_path / "cifar-10-batches-py", per_batch=6, n_test=4)
    dataset = image_data({"data": "cifar10", "data_dir": str(tmp_path)}, "residual_landscapes")
    assert dataset.input_shape == (32, 32, 3) and dataset.num_classes == 10
    assert len(dataset.train) + len(dataset.val) == 30 and len(dataset.test) == 4
    with pytest.raises(FileNotFoundError, match="residual_landscapes needs CIFAR-10: .*none does not exist; "
                                                "expected data_batch_1, .*test_batch .*--set data_dir=PATH"):
        run_experiment("residual_landscapes", smoke=True, overrides={"data": "cifar10",
                                                                     "data_dir": str(tmp_path / "none")},
                       out_dir=tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="batchnorm_residual_hessian: data must be one of digits, mnist, cifar10, "
                                         "got 'svhn'"):
        run_experiment("batchnorm_residual_hessian", smoke=True, overrides={"data": "svhn"}, out_dir=tmp_path / "o",
                       progress=False)


def test_label_noise_smoke_against_a_member_trained_alone(tmp_path):
    """The smoke population's test errors: the p = 0.5 member equals fit on its noisy labels with the paper's
    architecture (two conv layers, one dense layer: nothing else has parameters) on MNIST split into train/test only
    (same float32 steps, so within one or two test images); the breakdown points are the interpolated 50% crossings
    of the mean curve and of every seed; the verdict follows the checks."""
    import dataclasses

    import optax

    from jaxnn import data as data_lib, models
    from jaxnn.experiments import data_folder, run_experiment
    from jaxnn.train import create_train_state, fit

    record = run_experiment("label_noise", smoke=True, out_dir=tmp_path, progress=False)
    setting, rows, measured = record["setting"], record["measured"]["rows"], record["measured"]
    assert (tmp_path / "label_noise.png").stat().st_size > 10_000
    assert [r["p"] for r in rows] == setting["noise"] and all(r["seeds"] == setting["seeds"] for r in rows)
    assert all(len(r["test_errors"]) == setting["seeds"] and r["test_error"] == pytest.approx(np.mean(r["test_errors"]))
               for r in rows)
    dataset = data_lib.load_dataset("mnist", data_dir=data_folder(setting, "mnist"), seed=setting["split_seed"],
                                    download=False, limit=setting["limit"], val_fraction=0.0,
                                    test_fraction=setting["test_fraction"])
    assert len(dataset.val) == 0 and len(dataset.train) + len(dataset.test) == setting["limit"]
    assert (measured["train_examples"], measured["test_examples"]) == (len(dataset.train), len(dataset.test))
    labels = data_lib.noisy_labels(dataset.train.y, 0.5, 10, 0)
    noisy = dataclasses.replace(dataset, train=data_lib.Split(dataset.train.x, labels))
    model = models.get_model("lenet", num_classes=10, conv_features=tuple(setting["conv_features"]), dense_features=())
    state = create_train_state(model, optax.sgd(setting["lr"], momentum=setting["momentum"]), dataset.input_shape,
                               jax.random.PRNGKey(0))
    assert sorted(state.params) == ["conv_0", "conv_1", "head"]  # two conv layers and one fully connected layer
    assert measured["parameters"] == sum(leaf.size for leaf in jax.tree.leaves(state.params))
    state = fit(state, noisy, batch_size=setting["batch_size"], num_steps=setting["steps"],
                log_every=setting["steps"], eval_every=setting["steps"], progress=False).state
    logits = state.apply_fn({"params": state.params, **state.model_state}, dataset.test.x, train=False)
    error = float(np.mean(np.argmax(np.asarray(logits), -1) != dataset.test.y))
    member = next(r["test_errors"][0] for r in rows if r["p"] == 0.5)
    assert member == pytest.approx(error, abs=2.5 / len(dataset.test))
    module = _load("label_noise")
    assert module.breakdown_point([0.0, 0.5, 0.9], [0.1, 0.3, 0.7]) == pytest.approx(0.7)
    assert module.breakdown_point([0.0, 0.5], [0.6, 0.9]) == 0.0
    assert module.breakdown_point([0.0, 0.5], [0.1, 0.2]) == float("inf")
    assert measured["breakdown"] == pytest.approx(module.breakdown_point(setting["noise"], [r["test_error"] for r in rows]))
    assert measured["breakdown_per_seed"] == pytest.approx(
        [module.breakdown_point(setting["noise"], [r["test_errors"][s] for r in rows]) for s in range(setting["seeds"])])
    assert _verdict_follows_checks(record)


def test_sharpness_lr_batch_smoke_against_a_dense_hessian(tmp_path):
    """One member (largest batch, largest η) retrained alone by fit for its recorded steps: its training-split loss is
    the recorded one and at or below the target, while eval_every steps earlier it was above (the stopping rule); its
    recorded λmax is the top eigenvalue of jax.hessian on the same examples. Spearman's ρ (numpy average ranks) and the
    sign tests' p-values (a binomial sum) are recomputed from the rows; the verdict follows the checks."""
    import math

    import optax

    from jaxnn import data as data_lib, losses, models
    from jaxnn.experiments import run_experiment
    from jaxnn.train import create_train_state, fit

    record = run_experiment("sharpness_lr_batch", smoke=True, out_dir=tmp_path, progress=False)
    setting, measured = record["setting"], record["measured"]
    rows = measured["rows"]
    assert (tmp_path / "sharpness_lr_batch.png").stat().st_size > 10_000
    assert len(rows) == len(setting["lrs"]) * len(setting["batch_sizes"]) * setting["seeds"]
    row = next(r for r in rows if r["batch_size"] == max(setting["batch_sizes"])
               and r["learning_rate"] == max(setting["lrs"]) and r["seed"] == 0)
    assert row["status"] == "reached" and row["steps"] % setting["eval_every"] == 0
    digits = data_lib.load_dataset("digits", seed=setting["split_seed"])
    model = models.get_model("mlp", num_classes=10, width=setting["width"], depth=setting["depth"])
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
    train = (digits.train.x, digits.train.y)

    def retrained(steps):
        state = create_train_state(model, optax.sgd(row["learning_rate"]), digits.input_shape, jax.random.PRNGKey(0))
        if steps == 0:
            return state
        return fit(state, digits, batch_size=row["batch_size"], num_steps=steps, log_every=steps, eval_every=steps,
                   progress=False).state

    state = retrained(row["steps"])
    assert float(loss_fn(state.params, train)) == pytest.approx(row["train_loss"], rel=1e-4)
    assert row["train_loss"] <= setting["target_loss"]
    assert float(loss_fn(retrained(row["steps"] - setting["eval_every"]).params, train)) > setting["target_loss"]
    count = setting["analysis_examples"]
    flat, unravel = jax.flatten_util.ravel_pytree(state.params)
    dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), (digits.train.x[:count], digits.train.y[:count]))))(
        flat)
    assert row["lambda_max"] == pytest.approx(float(np.linalg.eigvalsh(np.asarray(dense, np.float64))[-1]), rel=2e-3)

    def average_ranks(values):
        values = np.asarray(values, float)
        return np.array([np.mean(np.flatnonzero(np.sort(values) == v)) for v in values])

    reached = [r for r in rows if r["status"] == "reached"]
    ratio, sharp = [r["ratio"] for r in reached], [r["lambda_max"] for r in reached]
    assert measured["spearman"] == pytest.approx(np.corrcoef(average_ranks(ratio), average_ranks(sharp))[0, 1],
                                                 abs=1e-9)
    tail = lambda wins, n: sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n  # noqa: E731
    assert measured["sharper_p"] == pytest.approx(tail(measured["sharper_pairs"], measured["pairs"]))
    assert measured["worse_p"] == pytest.approx(tail(measured["worse_pairs"], measured["pairs"]))
    assert _verdict_follows_checks(record)


def test_mode_connectivity_smoke_against_a_python_loop(tmp_path):
    """One epoch of the experiment's endpoint trainer equals a Python loop of optax SGD steps on a hand-written
    regularised loss (same batches); the endpoints retrained by that trainer and pair 1's bend by train_bend: the
    recorded losses along every pair's line and pair 1's curve equal a Python loop over t of the hand-written loss at
    (1−t)θ₀ + tθ₁ and (1−t)²θ₀ + 2t(1−t)θ_b + t²θ₁, and the barriers the largest excess over the chord."""
    import optax

    from jaxnn import data as data_lib, models
    from jaxnn.experiments import run_experiment

    record = run_experiment("mode_connectivity", smoke=True, out_dir=tmp_path, progress=False)
    setting, measured = record["setting"], record["measured"]
    assert (tmp_path / "mode_connectivity.png").stat().st_size > 10_000
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=setting["width"], depth=setting["depth"])
    train = (jax.numpy.asarray(digits.train.x), jax.numpy.asarray(digits.train.y))

    def loss(params, batch):  # mean cross-entropy + λ/2 ‖θ‖², written here
        logits = model.apply({"params": params}, batch[0])
        ce = -jax.numpy.mean(jax.nn.log_softmax(logits)[jax.numpy.arange(len(batch[1])), batch[1]])
        return ce + setting["weight_decay"] / 2 * sum(jax.numpy.sum(p**2) for p in jax.tree.leaves(params))

    mc = _load("mode_connectivity")
    one_epoch = {**setting, "seeds": setting["seeds"][:1], "check_every": 1, "max_epochs": 1}
    trained, epochs, _ = mc.train_endpoints(model, loss, train, one_epoch)
    assert epochs == 1
    key, batch = jax.random.PRNGKey(setting["seeds"][0]), setting["batch_size"]
    params = models.init_model(model, key, digits.input_shape)[0]
    tx = optax.sgd(setting["lr"], momentum=setting["momentum"])
    opt_state, steps = tx.init(params), len(train[0]) // batch
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(train[0])))
    step_grad = jax.jit(jax.grad(loss))
    for i in range(steps):
        rows = order[i * batch:(i + 1) * batch]
        updates, opt_state = tx.update(step_grad(params, (train[0][rows], train[1][rows])), opt_state, params)
        params = optax.apply_updates(params, updates)
    for mine, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
        np.testing.assert_allclose(theirs[0], mine, rtol=1e-4, atol=1e-6)

    members, epochs, history = mc.train_endpoints(model, loss, train, setting)
    assert epochs == measured["endpoint_epochs"] and len(history) == len(measured["endpoint_loss_history"])
    np.testing.assert_allclose(measured["endpoint_loss_history"], history, rtol=1e-4)
    if epochs < setting["max_epochs"]:  # stopped because every member's loss had converged
        assert np.all((history[-2] - history[-1]) / history[-2] < setting["converged"])
    ts = np.asarray(measured["ts"])
    at = lambda j: jax.tree.map(lambda leaf: leaf[j], members)
    for i, pair in enumerate(measured["pairs"]):
        assert pair["seeds"] == setting["seeds"][2 * i:2 * i + 2]
        ends = at(2 * i), at(2 * i + 1)
        line = [float(loss(jax.tree.map(lambda a, b: (1 - t) * a + t * b, *ends), train)) for t in ts]
        np.testing.assert_allclose(pair["line"]["train_loss"], line, rtol=2e-4)
        curves = {"line": line}
        if i == 0:
            bend, _ = mc.train_bend(loss, ends[0], ends[1], train, setting, jax.random.PRNGKey(setting["seeds"][0]))
            curves["curve"] = [float(loss(jax.tree.map(lambda a, m, b: (1 - t) ** 2 * a + 2 * t * (1 - t) * m
                                                       + t**2 * b, ends[0], bend, ends[1]), train)) for t in ts]
            np.testing.assert_allclose(pair["curve"]["train_loss"], curves["curve"], rtol=2e-3)
        for name, values in curves.items():
            chord = (1 - ts) * values[0] + ts * values[-1]
            assert pair[name]["barrier"] == pytest.approx(np.max(np.asarray(values) - chord), rel=2e-2, abs=1e-3)
    assert _verdict_follows_checks(record)


def test_batchnorm_residual_hessian_smoke_against_an_independent_lanczos(tmp_path):
    """A member of the BN + residual population (seed 1) retrained by fit with the experiment's warm-up schedule: its
    recorded training loss is that net's loss, its λmax the top Ritz value of a hand-written Lanczos (full
    reorthogonalisation in numpy, products by jax.jvp of jax.grad) on the same examples in eval mode; every variant
    has a row with one value per seed; the rank-sum p-value agrees with scipy's exact Mann-Whitney test; the verdict
    follows the checks."""
    import optax
    from scipy import stats

    from jaxnn import data as data_lib, losses, models
    from jaxnn.experiments import run_experiment
    from jaxnn.train import create_train_state, fit

    record = run_experiment("batchnorm_residual_hessian", smoke=True, overrides={"seeds": [0, 1]}, out_dir=tmp_path,
                            progress=False)
    setting, measured = record["setting"], record["measured"]
    module = _load("batchnorm_residual_hessian")
    assert (tmp_path / "batchnorm_residual_hessian.png").stat().st_size > 10_000
    assert len(measured["rows"]) == 4 * len(setting["depths"])
    assert all(len(r[field]) == len(setting["seeds"]) for r in measured["rows"]
               for field in ("train_loss", "lambda_max", "trace"))
    row = next(r for r in measured["rows"] if r["variant"] == "BN + residual")
    seed = setting["seeds"][1]
    digits = data_lib.load_dataset("digits", seed=setting["split_seed"])
    model = models.get_model("resnet", num_classes=10, depth=row["depth"], norm="batch", base_width=setting["width"])
    state = create_train_state(model, optax.sgd(module.schedule(setting), momentum=setting["momentum"]),
                               digits.input_shape, jax.random.PRNGKey(seed))
    state = fit(state, digits, batch_size=setting["batch_size"], num_steps=measured["steps"], seed=seed,
                log_every=measured["steps"], eval_every=measured["steps"], progress=False).state
    loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state.model_state)
    assert row["train_loss"][1] == pytest.approx(float(loss_fn(state.params, (digits.train.x, digits.train.y))),
                                                 rel=1e-3)
    count = measured["analysis_examples"]
    batch = (digits.train.x[:count], digits.train.y[:count])
    flat, unravel = jax.flatten_util.ravel_pytree(state.params)
    grad = jax.jit(jax.grad(lambda f: loss_fn(unravel(f), batch)))
    hvp = jax.jit(lambda v: jax.jvp(grad, (flat,), (v,))[1])
    assert row["lambda_max"][1] == pytest.approx(_numpy_lanczos(hvp, flat, 60)[-1], rel=2e-3)
    low, high = [0.3, 1.1, 0.9], [1.0, 2.0, 1.5]
    assert module.rank_sum_p(low, high) == pytest.approx(
        stats.mannwhitneyu(low, high, alternative="less", method="exact").pvalue)
    assert module.lower([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], 1.2)[0]
    assert not module.lower([1.0, 1.1, 1.2], [1.3, 1.31, 1.32], 1.2)[0]  # separated, but within the margin
    assert _verdict_follows_checks(record)


def test_residual_landscapes_smoke_against_an_independent_lanczos(tmp_path):
    """The plain variant retrained by fit: at the map's centre (θ* itself) λmax agrees with a hand-written Lanczos
    (numpy, full reorthogonalisation, 60 products by jax.jvp of jax.grad, its own random start) on the same examples,
    and λmin lies above that Lanczos's smallest Ritz value (Ritz values interlace: a shorter run cannot go lower);
    the plane's centre is the loss at θ*; local minima counted by brute force."""
    from jaxnn.experiments import run_experiment

    record = run_experiment("residual_landscapes", smoke=True, overrides={"seeds": 1}, out_dir=tmp_path,
                            progress=False)  # one seed: the margins over seeds are exercised by the other smokes
    setting, measured = record["setting"], record["measured"]
    assert (tmp_path / "residual_landscapes.png").stat().st_size > 10_000
    row = next(r for r in measured["rows"] if r["variant"] == "plain")
    center_loss, hvp, flat = _retrained_resnet("plain", setting["depth"], setting, measured)
    assert row["center_loss"] == pytest.approx(center_loss, rel=1e-5)
    ritz = _numpy_lanczos(hvp, flat, 60)
    middle = setting["map_grid"] // 2
    assert row["lambda_max"][middle][middle] == pytest.approx(ritz[-1], rel=2e-3)
    assert ritz[0] - 1e-4 * ritz[-1] <= row["lambda_min"][middle][middle] <= row["lambda_max"][middle][middle]
    module = _load("residual_landscapes")
    values = np.random.default_rng(1).normal(size=(6, 7))
    brute = sum(all(values[i, j] < values[a, b] for a in range(max(i - 1, 0), min(i + 2, 6))
                    for b in range(max(j - 1, 0), min(j + 2, 7)) if (a, b) != (i, j))
                for i in range(6) for j in range(7))
    assert module._local_minima(values) == brute
    assert _verdict_follows_checks(record)


def test_influence_noisy_labels_smoke_and_its_rankings_against_sklearn(tmp_path):
    """The AUC against sklearn's roc_auc_score (with ties), the found curve against a hand count, flipped labels
    that never keep their class; a smoke run's records (L-BFGS reached the convex model's minimum; the fraction found at m is the
    curve's; the verdict follows the checks). The self-influence scores themselves are tested against dense solves in
    tests/curvature/test_solve.py."""
    from sklearn.metrics import roc_auc_score

    from jaxnn.experiments import run_experiment

    module = _load("influence_noisy_labels")
    rng = np.random.default_rng(0)
    scores, flipped = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.2  # many ties
    assert module.auc(scores, flipped) == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)
    curve = module.found_curve([0.9, 0.1, 0.8, 0.5], [True, False, False, True])
    np.testing.assert_allclose(curve, [0, 0.5, 0.5, 1.0, 1.0])
    labels = np.arange(100) % 10
    noisy, mask = module.flip_labels(labels, 0.1, 10, seed=3)
    assert mask.sum() == 10 and np.all(noisy[mask] != labels[mask]) and np.all(noisy[~mask] == labels[~mask])

    record = run_experiment("influence_noisy_labels", smoke=True, overrides={"seeds": 1, "limit": 150, "mlp_width": 4,
                                                                            "lbfgs_steps": 100},
                            out_dir=tmp_path, progress=False)
    measured = record["measured"]
    assert len(measured["rows"]) == 2 and (tmp_path / "influence_noisy_labels.png").exists()
    for row in measured["rows"]:
        assert row["gradient_norm_at_end"] < (1e-6 if row["model"] == "logistic" else 0.5)  # convex: a minimum
        for score in ("self_influence", "loss", "gradient_norm"):
            assert row["found_at_m"][score] == row["curve"][score][measured["flipped"]]
            assert 0.5 < row["auc"][score] <= 1.0
    assert _verdict_follows_checks(record)


def test_layer_sharpness_smoke_against_dense_blocks(tmp_path):
    """A smoke run on the MLP, retrained here by fit with the experiment's setting (deterministic on CPU): at every
    measured epoch the head block's λmax is the dense eigh of jax.hessian over the head's parameters alone (within the
    reported residual bound), and the whole network's λmax agrees with a numpy Lanczos (60 steps, 1e-3); the whole
    trace is the sum of the block traces; the verdict follows the checks."""
    import optax

    from jaxnn import data as data_lib, losses, models
    from jaxnn.experiments import run_experiment
    from jaxnn.train import create_train_state, fit

    record = run_experiment("layer_sharpness", smoke=True, overrides={"models": ["mlp"]}, out_dir=tmp_path,
                            progress=False)
    setting, measured = record["setting"], record["measured"]
    digits = data_lib.load_dataset("digits", seed=0)
    count = measured["analysis_examples"]
    batch = (jax.numpy.asarray(digits.train.x[:count]), jax.numpy.asarray(digits.train.y[:count]))
    model = models.get_model("mlp", num_classes=10, width=64, depth=2, activation="tanh")
    state = create_train_state(model, optax.sgd(setting["lr"], momentum=setting["momentum"]), digits.input_shape,
                               jax.random.PRNGKey(0))
    per_epoch = data_lib.steps_per_epoch(len(digits.train), setting["batch_size"], True)
    step = 0
    for row in measured["runs"]["mlp"][0]:
        if row["step"] > step:
            state = fit(state, digits, batch_size=setting["batch_size"], num_steps=row["step"], start_step=step,
                        seed=0, log_every=row["step"], eval_every=row["step"], progress=False).state
            step = row["step"]
        assert row["step"] == row["epoch"] * per_epoch
        loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy", state.model_state)
        head, rest = state.params["head"], {k: v for k, v in state.params.items() if k != "head"}
        flat_head, unravel = jax.flatten_util.ravel_pytree(head)
        dense = jax.hessian(lambda f: loss_fn({**rest, "head": unravel(f)}, batch))(flat_head)
        top = float(np.linalg.eigvalsh(np.asarray(dense, np.float64))[-1])
        assert abs(row["layers"]["head"]["lambda_max"] - top) <= row["layers"]["head"]["bound"] + 1e-4 * top
        flat, unravel_all = jax.flatten_util.ravel_pytree(state.params)
        grad = jax.jit(jax.grad(lambda f: loss_fn(unravel_all(f), batch)))
        ritz = _numpy_lanczos(jax.jit(lambda v: jax.jvp(grad, (flat,), (v,))[1]), flat, 60)
        assert row["lambda_max"] == pytest.approx(ritz[-1], rel=1e-3)
        assert row["trace"] == pytest.approx(sum(v["trace"] for v in row["layers"].values()), rel=1e-12)
    assert (tmp_path / "layer_sharpness.png").exists() and (tmp_path / "blocks_mlp.png").exists()
    assert _verdict_follows_checks(record)


def test_laplace_calibration_smoke_against_an_explicit_last_layer_posterior(tmp_path):
    """Rotation against np.rot90 (90°, exact) and scipy.ndimage.rotate (30°, bilinear); a smoke run whose MAP test NLL
    and accuracy are recomputed here by numpy from the same training, and whose last-layer Laplace test NLL equals a
    probit predictive built here from jax.jacrev's head Gauss-Newton matrix, the softmax Hessian and a dense inverse
    at the run's tuned δ; each check's verdict follows from the measured rows."""
    import scipy.ndimage
    from jax.flatten_util import ravel_pytree

    from jaxnn import data as data_lib
    from jaxnn.experiments import run_experiment
    from jaxnn.models import get_model

    module = _load("laplace_calibration")
    image = np.random.default_rng(0).random((3, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(module.rotate(image, 90), np.rot90(image, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(module.rotate(image, 30),  # zeros interpolated in beyond the edge: "grid-constant"
                               scipy.ndimage.rotate(image, 30, axes=(1, 2), reshape=False, order=1,
                                                    mode="grid-constant", cval=0.0, prefilter=False), atol=1e-5)

    record = run_experiment("laplace_calibration", smoke=True, overrides={"limit": 300, "epochs_digits": 10,
                                                                          "structures": ["kfac", "last_layer"]},
                            out_dir=tmp_path, progress=False)  # the diagonal's predictive: tests/test_laplace.py
    setting, row = record["setting"], record["measured"]["rows"][0]
    assert (tmp_path / "laplace_calibration.png").stat().st_size > 10_000
    digits = data_lib.load_dataset("digits", seed=0, limit=setting["limit"], standardize=False)
    train_x, test_x = np.asarray(digits.train.x), np.asarray(digits.test.x)
    mean, std = train_x.mean(), train_x.std()
    x, y = (train_x - mean) / std, np.asarray(digits.train.y)
    test_x, test_y = (test_x - mean) / std, np.asarray(digits.test.y)
    model = get_model("mlp", num_classes=10, width=setting["width"], depth=setting["depth"])
    params, _, _ = module.train_map(model, x, y, setting, setting["epochs_digits"], seed=0)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: jax.numpy.asarray(p, jax.numpy.float64), params)
        head, unravel = ravel_pytree(params["head"])
        logits_of = lambda f, inputs: model.apply({"params": {**params, "head": unravel(f)}}, inputs)  # noqa: E731
        log_p = np.asarray(jax.nn.log_softmax(logits_of(head, test_x)))
        assert row["map"]["test"]["nll"] == pytest.approx(-np.mean(log_p[np.arange(len(test_y)), test_y]), rel=1e-4)
        assert row["map"]["test"]["accuracy"] == pytest.approx(np.mean(log_p.argmax(1) == test_y))
        p = np.asarray(jax.nn.softmax(logits_of(head, x)))
        jacobian = np.asarray(jax.jacrev(lambda f: logits_of(f, x))(head))
        hessians = np.einsum("nc,cd->ncd", p, np.eye(10)) - np.einsum("nc,nd->ncd", p, p)
        delta = row["laplace"]["last_layer"]["prior_precision"]
        covariance = np.linalg.inv(np.einsum("nci,ncd,ndj->ij", jacobian, hessians, jacobian)
                                   + delta * np.eye(head.size))
        test_jacobian = np.asarray(jax.jacrev(lambda f: logits_of(f, test_x))(head))
        variance = np.einsum("nci,ij,ncj->nc", test_jacobian, covariance, test_jacobian)
        scaled = np.asarray(logits_of(head, test_x)) / np.sqrt(1 + np.pi / 8 * variance)
        scaled_log_p = scaled - np.log(np.sum(np.exp(scaled), axis=1, keepdims=True))
        assert row["laplace"]["last_layer"]["sets"]["test"]["nll"] == pytest.approx(
            -np.mean(scaled_log_p[np.arange(len(test_y)), test_y]), rel=2e-3)  # float32 fit vs float64 here
    checks = {c["check"]: c["agrees"] for c in record["checks"]}
    assert len(checks) == 3 * len(setting["structures"])
    for structure in setting["structures"]:
        label = module.STRUCTURE_LABELS[structure]
        la, mp = row["laplace"][structure]["sets"], row["map"]
        agrees = [c for claim, c in checks.items() if claim.startswith(f"digits, {label}: accuracy")][0]
        assert agrees == (la["test"]["accuracy"] > mp["test"]["accuracy"] - setting["accuracy_margin"])
        in_distribution = [c for claim, c in checks.items() if claim.startswith(f"digits, {label}: calibration in")][0]
        assert in_distribution == (la["test"]["nll"] < mp["test"]["nll"] and la["test"]["ece"] < mp["test"]["ece"])
        under_shift = [c for claim, c in checks.items() if claim.startswith(f"digits, {label}: calibration under")][0]
        assert under_shift == all(la[n]["nll"] < mp[n]["nll"] and la[n]["ece"] < mp[n]["ece"] for n in mp if n != "test")
    assert _verdict_follows_checks(record)


def test_table_command_says_where_it_wrote(tmp_path, capsys, monkeypatch):
    """`jaxnn experiment --table` writes README.md beside the results and prints one line (not the whole table)."""
    from jaxnn.cli import main

    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "result.json").write_text(json.dumps({
            "name": name, "size": "smoke", "claim": "x", "verdict": "agrees", "figures": [],
            "checks": [{"check": "c", "measured": "1", "agrees": True}]}))
    assert main(["experiment", "--table"]) == 0
    out = capsys.readouterr().out
    assert out == "table of 2 results from results/*/result.json written to results/README.md\n"
    assert "| a (smoke) |" in (tmp_path / "results" / "README.md").read_text()
