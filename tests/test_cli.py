"""The `jaxnn` command: the main job end to end, and one-line errors (exit 2) for bad input."""

import json

import jax
import numpy as np

import pytest

from jaxnn.cli import main


def test_configs_lists_shipped(capsys):
    assert main(["configs"]) == 0
    assert capsys.readouterr().out.split() == ["char_transformer", "cifar_resnet20", "digits_lstm",
                                               "digits_mlp", "mnist_lenet", "mnist_mlp", "seq2seq_reverse"]


def test_main_job_reaches_target_and_writes_run_folder(tmp_path, capsys):
    """`jaxnn run` with no config arguments: the default digits MLP, >= 97% test accuracy, full report."""
    run_dir = tmp_path / "digits"
    assert main(["run", "--run-dir", str(run_dir), "--set", "train.progress=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] >= 0.97
    assert summary["split_sizes"] == {"train": 1258, "val": 180, "test": 359}
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "curvature.json", "spectrum.png"):
        assert (run_dir / name).is_file(), name
    assert any(p.name.startswith("landscape") and p.suffix == ".png" for p in run_dir.iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == summary["steps"]
    curvature = json.loads((run_dir / "curvature.json").read_text())
    assert curvature["conditioning"]["lambda_max"] > 0
    assert "lambda_max" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["train", "digits_mlp", "--set", "optimizer.lr=-1"], "optimizer.lr"),
    (["train", "digits_mlp", "--set", "model.name=vit"], "unknown model 'vit'; valid models: gru, lenet, lstm, mlp"),
    (["train", "digits_mlp", "--set", "optimizer.name=adamax"], "valid optimizers"),
    (["train", "no_such_config"], "not a shipped config"),
    (["train", "digits_mlp", "--set", "data.name=mnist", "--set", "data.data_dir=/nonexistent/mnist",
      "--set", "data.download=false"], "/nonexistent/mnist"),
    (["curvature", "/nonexistent/run"], "does not exist"),
    (["landscape", "/nonexistent/run"], "does not exist"),
    (["sweep", "digits_mlp"], "the config has no sweep section"),
    (["sweep", "digits_mlp", "--set", "sweep.model.kwargs.depth=[1, 2]"], "cannot vary inside one population"),
    (["sweep", "digits_mlp", "--set", "sweep.seed=[0]", "--resume"], "nothing to resume"),
])
def test_bad_input_is_one_clear_line(args, words, capsys, tmp_path):
    code = main(args + (["--run-dir", str(tmp_path / "r")] if args[0] == "train" else
                        ["--out", str(tmp_path / "s")] if args[0] == "sweep" else []))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("jaxnn: error:") and words in err
    assert "Traceback" not in err


def test_nan_loss_reports_step_and_exits_2(tmp_path, capsys):
    code = main(["train", "digits_mlp", "--run-dir", str(tmp_path / "r"), "--set", "optimizer.name=sgd",
                 "--set", "optimizer.lr=1e12", "--set", "train.steps=30", "--set", "train.progress=false",
                 "--set", "optimizer.schedule=constant", "--set", "model.kwargs={width: 16, depth: 1}"])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite loss" in err and "at step" in err
    assert "non-finite hunt at step" in err and "Traceback" not in err  # replayed to name the layer / operation


def test_corrupt_checkpoint_is_reported_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "r"
    args = ["train", "digits_mlp", "--run-dir", str(run_dir), "--set", "train.steps=20", "--set", "train.eval_every=10",
            "--set", "train.progress=false", "--set", "model.kwargs={width: 16, depth: 1}"]
    assert main(args) == 0
    step_dir = run_dir / "checkpoints" / "20"
    victims = [f for f in step_dir.rglob("*") if f.is_file() and f.name != "commit_success.txt"]
    for f in victims:
        f.write_bytes(b"\x00not a checkpoint")
    before = {f: f.read_bytes() for f in victims}
    assert main(["curvature", str(run_dir)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in victims} == before


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (0, 1):
        run_dir = root / f"seed{seed}"
        assert main(["train", "digits_mlp", "--run-dir", str(run_dir), "--set", "train.steps=40",
                     "--set", "train.eval_every=10", "--set", "checkpoint.every_steps=10", "--set", "checkpoint.keep_last=4", "--set", f"train.seed={seed}",
                     "--set", "train.progress=false", "--set", "model.kwargs={width: 16, depth: 1}",
                     "--set", f"analysis.diagnostics_every={20 if seed == 0 else 'null'}"]) == 0
        runs.append(run_dir)
    return runs


def test_curvature_command_writes_report(two_runs, tmp_path, capsys):
    out = tmp_path / "curv"
    assert main(["curvature", str(two_runs[0]), "--k", "3", "--density", "--data-batches", "2", "--out", str(out),
                 "--x64", "--blocks", "layer"]) == 0
    report = json.loads((out / "curvature.json").read_text())
    assert (out / "spectrum.png").stat().st_size > 5_000
    eigen = report["eigenvalues"]
    assert len(eigen["top"]) == 3 and len(eigen["bottom"]) == 3
    assert report["run"]["step"] == 40 and report["run"]["data_batches"] == 2
    assert report["dtype"] == "float64" and "density" in report
    # every value carries its residual and a converged flag that is what the residual says
    for end in ("top", "bottom"):
        assert eigen[f"{end}_converged"] == [r <= eigen["convergence_tol"] * abs(v)
                                             for v, r in zip(eigen[end], eigen[f"{end}_residuals"])]
    printed = capsys.readouterr().out
    assert "lambda_max=" in printed
    assert ("lambda_min=" + f"{report['conditioning']['lambda_min']:.4g} (NOT converged" in printed) == (
        not eigen["bottom_converged"][0])
    # every layer's block: top-k with residuals and converged flags, trace; blocks.png
    from jaxnn.curvature import layer_names
    from jaxnn.train import load_run

    layers = layer_names(load_run(two_runs[0]).state.params)
    assert list(report["blocks"]) == layers and (out / "blocks.png").stat().st_size > 10_000
    for name, block in report["blocks"].items():
        assert len(block["top"]) == len(block["residuals"]) == len(block["converged"]) == 3
        assert block["top"] == sorted(block["top"], reverse=True) and block["trace"] > 0, name
    assert "lambda_max per layer: " + layers[0] in printed


def test_laplace_command_against_an_explicit_gauss_newton(two_runs, tmp_path, capsys, x64):
    """jaxnn laplace --structure last_layer (float64, 200 training examples): the log marginal likelihood at the tuned
    prior precision equals log p(D|θ*) − ½δ‖θ_head‖² + (d/2) log δ − ½ log det(JᵀH_outJ + δI) built here from
    jax.jacrev of the logits in the head's parameters and the softmax Hessian diag(p) − ppᵀ, and δ is a maximum (1.1x
    either side is lower); the MAP numbers equal the test split's cross-entropy and accuracy; the figure. (The full
    and K-FAC structures: tests/test_laplace.py, against closed forms and laplace-torch.)"""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jaxnn.train import load_run

    out = tmp_path / "laplace"
    assert main(["laplace", str(two_runs[0]), "--structure", "last_layer", "--train-limit", "200", "--out", str(out),
                 "--x64"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "laplace.json").read_text())
    assert "Laplace (last_layer, 170 parameters, 200 training examples)" in printed and report["subset"] == "head"
    assert report["prior_precision_tuned"] and (out / "laplace.png").stat().st_size > 10_000
    with jax.enable_x64(True):
        loaded = load_run(two_runs[0])
        state = loaded.state
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), state.params)
        head, unravel = ravel_pytree(params["head"])
        logits_of = lambda f, x: state.apply_fn({"params": {**params, "head": unravel(f)}}, x)  # noqa: E731
        x = jnp.asarray(loaded.dataset.train.x[:200], jnp.float64)
        y = np.asarray(loaded.dataset.train.y[:200])
        p = np.asarray(jax.nn.softmax(logits_of(head, x)))
        jacobian = np.asarray(jax.jacrev(lambda f: logits_of(f, x))(head))  # (200, 10, 170)
        output_hessians = np.einsum("nc,cd->ncd", p, np.eye(10)) - np.einsum("nc,nd->ncd", p, p)
        gauss_newton = np.einsum("nci,ncd,ndj->ij", jacobian, output_hessians, jacobian)  # n × the mean loss's GGN
        log_likelihood = float(np.sum(np.log(p[np.arange(200), y])))

        def evidence(delta):
            return (log_likelihood - 0.5 * delta * float(head @ head) + 0.5 * head.size * np.log(delta)
                    - 0.5 * np.linalg.slogdet(gauss_newton + delta * np.eye(head.size))[1])

        delta = report["prior_precision"]
        assert report["log_marginal_likelihood"] == pytest.approx(evidence(delta), rel=1e-8)
        assert evidence(delta) > max(evidence(1.1 * delta), evidence(delta / 1.1))
        test_logits = state.apply_fn({"params": params}, jnp.asarray(loaded.dataset.test.x, jnp.float64))
        test_y = np.asarray(loaded.dataset.test.y)
        log_p = np.asarray(jax.nn.log_softmax(test_logits))
        assert report["map"]["nll"] == pytest.approx(-np.mean(log_p[np.arange(len(test_y)), test_y]), rel=1e-10)
        assert report["map"]["accuracy"] == pytest.approx(np.mean(log_p.argmax(1) == test_y))
    assert 0 <= report["laplace"]["ece"] < 1  # probit only rescales logits: the predicted classes barely move
    assert abs(report["laplace"]["accuracy"] - report["map"]["accuracy"]) < 0.05
    assert report["tune"] == "marglik" and report["weight_decay"] == 0.0
    if report["laplace"]["nll"] > report["map"]["nll"]:  # this run has no weight decay: the note says so
        assert "trained without weight decay" in printed and "--tune val_nll" in printed
    # δ by validation NLL instead: the run's validation split, the printed line says which
    assert main(["laplace", str(two_runs[0]), "--structure", "last_layer", "--train-limit", "200", "--out", str(out),
                 "--tune", "val_nll", "--x64"]) == 0
    assert "tuned by validation NLL" in capsys.readouterr().out
    tuned = json.loads((out / "laplace.json").read_text())
    assert tuned["tune"] == "val_nll" and tuned["tuned_range"] == [1e-4, 1e4]
    from jaxnn.analysis import describe_laplace

    assert "top of its range" in describe_laplace(dict(tuned, prior_precision=1e4))  # δ at the edge is named
    assert "of its range" not in describe_laplace(dict(tuned, prior_precision=3.0))


def test_influence_command_against_a_dense_hessian(two_runs, tmp_path, capsys, x64):
    """jaxnn influence (float64): the listed removal effects equal (1/n)∇L_testᵀ(H + δI)⁻¹∇ℓ_j from jax.hessian over
    the same training batches (numpy solve), helpful ones positive and sorted, harmful ones negative; the figure."""
    from jax.flatten_util import ravel_pytree

    from jaxnn.analysis import analysis_batches
    from jaxnn.train import load_run

    out = tmp_path / "infl"
    # damping 1 > |λmin| ≈ 0.4 of this briefly trained net: H + δI is positive definite, CG applies
    assert main(["influence", str(two_runs[0]), "--test-index", "0", "3", "--top", "2", "--tol", "1e-10",
                 "--damping", "1.0", "--method", "cg", "--train-limit", "120", "--out", str(out), "--x64"]) == 0
    report = json.loads((out / "influence.json").read_text())
    assert (out / "influence.png").stat().st_size > 10_000
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and printed[0].startswith("test 0 (label ")
    loaded = load_run(two_runs[0])
    loss_fn = loaded.loss_fn()
    batches, _ = analysis_batches(loaded, 4, None)
    flat, unravel = ravel_pytree(loaded.state.params)
    total = lambda v: sum(loss_fn(unravel(v), b) for b in batches) / len(batches)  # noqa: E731
    matrix = np.asarray(jax.hessian(total)(flat), np.float64) + 1.0 * np.eye(flat.size)
    train, test = loaded.dataset.train, loaded.dataset.test
    gradient = lambda x, y: np.asarray(jax.grad(lambda v: loss_fn(unravel(v), (x, y)))(flat))  # noqa: E731
    for entry in report["tests"]:
        i = entry["test_index"]
        assert entry["solve"]["converged"], entry["solve"]
        s_test = np.linalg.solve(matrix, gradient(test.x[i:i + 1], test.y[i:i + 1]))
        for kind in ("helpful", "harmful"):
            effects = [item["removal_effect"] for item in entry[kind]]
            assert effects == sorted(effects, reverse=kind == "helpful")
            for item in entry[kind]:
                j = item["train_index"]
                expected = gradient(train.x[j:j + 1], train.y[j:j + 1]) @ s_test / 120
                assert item["removal_effect"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert entry["helpful"][0]["removal_effect"] > 0 > entry["harmful"][0]["removal_effect"]
    assert main(["influence", str(two_runs[0]), "--test-index", "100000"]) == 2
    assert "--test-index: [100000] outside the test split" in capsys.readouterr().err


def test_landscape_command_with_trajectory_and_other_run(two_runs, tmp_path, capsys):
    out = tmp_path / "land"
    capsys.readouterr()
    assert main(["landscape", str(two_runs[0]), "--grid", "7", "--span", "0.5", "--trajectory",
                 "--other", str(two_runs[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    for name in ("landscape.npz", "landscape.json", "landscape_1d.png", "landscape_2d.png", "landscape_3d.png",
                 "interpolation.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "landscape.json").read_text())
    assert summary["run"]["step"] == 40
    import numpy as np
    saved = np.load(out / "landscape.npz")
    plane = [k for k in saved.files if "plane" in k and "loss" in k]
    assert plane and saved[plane[0]].shape == (7, 7)
    # the terminal gets one line (the summary is in landscape.json), with the plane's numbers as saved
    losses = saved[plane[0]]
    assert len(printed) == 1 and printed[0].startswith("Landscape at step 40,"), printed
    assert f"loss at the checkpoint {losses[3, 3]:.4g}" in printed[0] and f"max {losses.max():.4g}" in printed[0]
    assert f"plane min {losses.min():.4g}" in printed[0] and "interpolation to the other run" in printed[0]
    assert f"{summary['trajectory']['num_checkpoints']} checkpoints projected" in printed[0]


def test_landscape_trajectory_needs_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "short"
    assert main(["train", "digits_mlp", "--run-dir", str(run_dir), "--set", "train.steps=10", "--set",
                 "train.progress=false", "--set", "model.kwargs={width: 8, depth: 1}"]) == 0
    assert main(["landscape", str(run_dir), "--grid", "5", "--trajectory"]) == 2
    assert "at least 3 checkpoints" in capsys.readouterr().err


def test_x64_flag_does_not_leak_into_the_process(two_runs, tmp_path):
    import jax.numpy as jnp
    assert main(["curvature", str(two_runs[0]), "--k", "1", "--data-batches", "1", "--out", str(tmp_path), "--x64"]) == 0
    assert json.loads((tmp_path / "curvature.json").read_text())["dtype"] == "float64"
    assert jnp.ones(1).dtype == jnp.float32


def test_run_prints_no_library_warnings(tmp_path):
    """A fresh `jaxnn run` process, its output captured as a log: no WARNING from jax, orbax or absl, and no
    progress bars (carriage-return noise in a file; they are drawn on a terminal only)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXNN_CACHE_DIR"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "jaxnn.cli", "run", "--set", "train.epochs=1",
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stderr and "Warning" not in out.stderr, out.stderr[-3000:]
    assert "\r" not in out.stderr and "it/s" not in out.stderr, out.stderr[-3000:]
    assert "lambda_max=" in out.stdout and (tmp_path / "run" / "landscape_2d.png").is_file()


def test_progress_bars_are_drawn_on_a_terminal(two_runs, tmp_path):
    """`jaxnn curvature` with stderr on a pseudo-terminal draws its bars there (and stays quiet when piped, above)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    process = subprocess.Popen([sys.executable, "-m", "jaxnn.cli", "curvature", str(two_runs[0]), "--k", "1",
                                "--data-batches", "1", "--out", str(tmp_path)], stdout=subprocess.DEVNULL,
                               stderr=follower, env=env)
    os.close(follower)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, terminal[-3000:]
    assert b"lanczos" in terminal and b"\r" in terminal, terminal[-3000:]


def test_output_piped_into_a_reader_that_stops_early(two_runs, tmp_path):
    """`jaxnn landscape RUN | head`-style: the reader (here `true`) is gone before the summary is printed; the
    command still writes its files and ends with status 0 and no traceback (it failed before the fix)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = (f"{sys.executable} -m jaxnn.cli landscape {two_runs[0]} --grid 5 --out {tmp_path} | true; "
               "exit ${PIPESTATUS[0]}")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "landscape.npz").exists()


def test_sweep_command_trains_the_population_and_exports_the_best_member(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "digits_mlp", "--out", str(out), "--set", "sweep.optimizer.lr=[0.001, 0.01]",
                 "--set", "sweep.seed=[0, 1]", "--set", "train.steps=30", "--set", "train.progress=false",
                 "--set", "model.kwargs.width=32"]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.lstrip().startswith("member"))
    assert "optimizer.lr" in header and "val_accuracy" in header
    assert "exported as the run folder" in printed and "test accuracy: ensemble of 4" in printed
    for name in ("sweep.csv", "sweep.png", "sweep_losses.png", "best/curves.png", "best/summary.json"):
        assert (out / name).is_file(), name
    assert main(["curvature", str(out / "best"), "--k", "1", "--data-batches", "1", "--out", str(tmp_path)]) == 0


def test_diagnose_command_writes_statistics_and_names_unknown_layers(two_runs, tmp_path, capsys):
    logged = [line for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines() if "act_std/head" in line]
    assert [json.loads(line)["step"] for line in logged] == [20, 40]  # analysis.diagnostics_every=20
    assert main(["diagnose", str(two_runs[0]), "--batch-size", "64", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "dense_0" in printed and "update/param" in printed and "gradient noise over 64 examples: B_noise" in printed
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert [row["name"] for row in report["activations"]][-1] == "head" and report["batch_size"] == 64
    assert report["gradient_noise"]["num_examples"] == 64 and set(report["gradient_noise"]["layers"]) == {"dense_0",
                                                                                                         "head"}
    assert (tmp_path / "diagnostics.png").is_file()
    assert main(["diagnose", str(two_runs[0]), "--layers", "dense_7", "--out", str(tmp_path)]) == 2
    assert "no layer named 'dense_7'; this model's layers: dense_0, head" in capsys.readouterr().err


def test_sweep_over_simulated_devices_with_early_stopping(tmp_path):
    """`jaxnn sweep --devices 4` in a fresh process (the device flag precedes jax): members sharded over 4 CPU
    devices, each early-stopped on its own."""
    import subprocess
    import sys

    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "jaxnn.cli", "sweep", "digits_mlp", "--devices", "4", "--out", str(out),
                           "--set", "sweep.optimizer.lr=[0.001, 0.3]", "--set", "train.steps=60", "--set", "optimizer.schedule=constant",
                           "--set", "train.eval_every=5", "--set", "train.early_stop_patience=1",
                           "--set", "model.kwargs.width=32", "--set", "train.progress=false"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 at a time over 4 devices" in done.stdout
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["devices"] == 4
    statuses = [row["status"] for row in summary["rows"]]
    assert statuses[0] == "completed" and statuses[1].startswith("early-stopped at step "), statuses


def test_run_report_is_jaxnn_run_from_python(tmp_path, capsys):
    """analysis.run_report trains and analyses as `jaxnn run` does, from a script: its returned reports are the ones
    written in the run folder, its stages are told to ``echo`` in order, and the same config through the CLI gives
    the same final metrics and λmax (the CLI calls it)."""
    from jaxnn import analysis, config as config_lib

    overrides = ["train.epochs=1", "train.progress=false", "model.kwargs={width: 16, depth: 1}",
                 "analysis.curvature_k=2", "analysis.curvature_batches=1", "analysis.density=false",
                 "analysis.landscape_grid=5", "analysis.landscape_batches=1"]
    cfg = config_lib.load_config("digits_mlp", overrides=overrides)
    lines = []
    report = analysis.run_report(cfg, run_dir=tmp_path / "py", echo=lines.append)
    assert report["run_dir"] == tmp_path / "py"
    assert len(lines) == 3 and lines[0].startswith(f"training digits_mlp in {tmp_path / 'py'}; data: digits: ")
    assert lines[1].startswith(f"trained {report['summary']['steps']} steps")
    assert "lambda_max" in lines[2] or "λmax" in lines[2]
    written = json.loads((tmp_path / "py" / "curvature.json").read_text())
    assert written["conditioning"]["lambda_max"] == report["curvature"]["conditioning"]["lambda_max"]
    assert report["landscape"] is not None and any(p.name.startswith("landscape") for p in (tmp_path / "py").iterdir())
    assert main(["run", "--config", "digits_mlp", "--run-dir", str(tmp_path / "cli"), *[f"--set={o}" for o in overrides]]) == 0
    cli = json.loads((tmp_path / "cli" / "curvature.json").read_text())
    np.testing.assert_allclose(cli["conditioning"]["lambda_max"], written["conditioning"]["lambda_max"], rtol=1e-6)
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["final"] == report["summary"]["final"]
    assert analysis.run_report(cfg, run_dir=tmp_path / "bare", analyse=False)["curvature"] is None


def test_run_folders_from_the_command_line(tmp_path, capsys):
    """A second `jaxnn train` gets version_2; `train X/config.yaml --resume` continues X; `jaxnn launch` resolves
    and checks the folder before it starts a process, and pins it for every process."""
    from jaxnn import cli

    tiny = ["--set", f"output_dir={tmp_path}", "--set", "train.steps=4", "--set", "train.eval_every=2",
            "--set", "train.progress=false", "--set", "model.kwargs={width: 8, depth: 1}"]
    assert main(["train", "digits_mlp", *tiny]) == 0
    assert main(["train", "digits_mlp", *tiny]) == 0
    out = capsys.readouterr().out
    first, second = tmp_path / "digits_mlp" / "version_1", tmp_path / "digits_mlp" / "version_2"
    assert f"training digits_mlp in {first}; data: digits: 1258/180/359 train/val/test examples" in out
    assert f"run folder: {second}" in out
    more = [a if a != "train.steps=4" else "train.steps=6" for a in tiny]
    assert main(["train", str(first / "config.yaml"), "--resume", *more]) == 0
    assert json.loads((first / "summary.json").read_text())["resumed_from_step"] == 4
    assert json.loads((second / "summary.json").read_text())["steps"] == 4  # the other run untouched
    assert main(["diagnose", str(tmp_path / "digits_mlp"), "--batch-size", "32"]) == 0
    assert f"reading {second} (the latest run in" in capsys.readouterr().out
    # The launcher: a refusal before any process starts, and the resolved folder passed to every process.
    assert main(["launch", "--processes", "2", "--", "train", "digits_mlp", *tiny, "--run-dir", str(first)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxnn: error: run folder") and "add --resume" in err and "process" not in err
    third, fourth = (tmp_path / "digits_mlp" / f"version_{n}" for n in (3, 4))
    assert cli._pin_job_folder(["--", "train", "digits_mlp", *tiny]) == ["train", "digits_mlp", *tiny, "--run-dir",
                                                                         str(third)]
    assert third.is_dir() and not any(third.iterdir())  # claimed for the job: a run started beside it takes 4
    assert cli._pin_job_folder(["--debug", "train", "digits_mlp", *tiny])[-1] == str(fourth)
    assert cli._pin_job_folder(["train", "digits_mlp", *tiny, "--resume"])[-2:] == ["--run-dir", str(second)]
    assert cli._pin_job_folder(["curvature", str(first)]) == ["curvature", str(first)]
