"""Run folders (issue 27): a fresh version_N per run, --resume continuing the latest, refusals naming the fix and
made before anything is created; a folder written by fit(run_dir=...) read by load_run and the CLI without its
optimizer; a failed data load leaves nothing behind."""

import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from jaxnn import config as config_lib
from jaxnn import data as data_lib
from jaxnn import models, runfolders
from jaxnn.train import (CheckpointError, RunFolderError, create_train_state, fit, load_run, restore_state,
                         train_from_config)

TINY = ["train.steps=6", "train.eval_every=3", "train.log_every=3", "train.progress=false",
        "model.kwargs={width: 8, depth: 1}", "analysis.curvature=false", "analysis.landscape=false"]


def _cfg(tmp_path, *extra):
    return config_lib.load_config("digits_mlp", overrides=TINY + [f"output_dir={tmp_path / 'runs'}", *extra])


def test_each_run_gets_a_fresh_version_and_resume_continues_the_latest(tmp_path):
    cfg = _cfg(tmp_path)
    parent = tmp_path / "runs" / "digits_mlp"
    with pytest.raises(RunFolderError, match=r"nothing to resume in .*digits_mlp: no version_N folder .* leave out "
                                             r"--resume"):
        train_from_config(cfg, resume=True)
    assert not parent.exists()  # the refusal created nothing
    first = train_from_config(cfg)
    second = train_from_config(cfg)  # the same command again: no collision
    assert (first["run_dir"], second["run_dir"]) == (str(parent / "version_1"), str(parent / "version_2"))
    assert [p.name for p in runfolders.versions(parent)] == ["version_1", "version_2"]
    resumed = train_from_config(cfg.replace(**{"train.steps": 9}), resume=True)
    assert resumed["run_dir"] == str(parent / "version_2") and resumed["resumed_from_step"] == 6
    assert resumed["steps"] == 9
    # A changed config refuses to resume and names the way out; a pinned folder with a run names --resume.
    with pytest.raises(RunFolderError, match=r"optimizer\.lr.*leave out --resume \(a fresh version_N folder\)"):
        train_from_config(cfg.replace(**{"optimizer.lr": 0.5}), resume=True)
    with pytest.raises(RunFolderError, match=r"version_1 already holds a run with checkpoints: add --resume "
                                             r"\(resume=True\) to continue it, or leave out --run-dir"):
        train_from_config(cfg, run_dir=parent / "version_1")
    # Analysis given the parent reads the latest version; diagnose restores the optimizer's state the config names.
    assert load_run(parent).run_dir == parent / "version_2"
    from jaxnn import analysis
    stats = analysis.diagnose_run(parent, batch_size=32)
    assert all(g["update_ratio"] is not None and g["update_ratio"] > 0 for g in stats.gradients)


def test_folder_rules_without_training(tmp_path):
    cfg = config_lib.Config(output_dir=str(tmp_path), name="n")
    parent = tmp_path / "n"
    assert runfolders.resolve(cfg, None, resume=False) == parent / "version_1"
    for name in ("version_2", "version_10", "version_x", "notes"):
        (parent / name).mkdir(parents=True)
    assert runfolders.resolve(cfg, None, resume=False) == parent / "version_11"  # numeric order, not text order
    assert runfolders.resolve(cfg, tmp_path / "pinned", resume=False) == tmp_path / "pinned"
    (parent / "version_2" / "checkpoints" / "5").mkdir(parents=True)
    assert runfolders.resolve(cfg, None, resume=True) == parent / "version_2"  # the latest holding checkpoints
    legacy = config_lib.Config(output_dir=str(tmp_path), name="old")
    (tmp_path / "old" / "checkpoints" / "3").mkdir(parents=True)  # a folder from before versions
    assert runfolders.resolve(legacy, None, resume=True) == tmp_path / "old"
    sweep = runfolders.resolve(cfg, None, resume=False, sweep=True)
    assert sweep == tmp_path / "n-sweep" / "version_1"
    config_file = parent / "version_2" / "config.yaml"
    config_file.write_text("name: n\n")
    assert runfolders.run_folder_of_config(config_file) == parent / "version_2"
    assert runfolders.run_folder_of_config(tmp_path / "elsewhere.yaml") is None
    assert runfolders.latest_run(parent) == parent / "version_2"
    assert not any(p.name == "version_11" for p in parent.iterdir())  # resolving created nothing


def test_fit_run_folder_reads_back_without_its_optimizer(tmp_path):
    digits = data_lib.load_dataset("digits", seed=0)
    model = models.get_model("mlp", num_classes=10, width=8, depth=1)
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), digits.input_shape, jax.random.PRNGKey(0))
    result = fit(state, digits, num_steps=12, batch_size=32, log_every=6, progress=False, run_dir=tmp_path / "script")
    record = json.loads((tmp_path / "script" / "fit.json").read_text())
    assert record["config"] is True and record["why_no_config"] == []
    cfg = config_lib.load_config(tmp_path / "script" / "config.yaml")
    assert (cfg.model.name, cfg.model.kwargs, cfg.data.name, cfg.train.loss) == (
        "mlp", {"width": 8, "depth": 1}, "digits", "softmax_cross_entropy")
    # The config's optimizer (adam, the default) differs from the run's (SGD with momentum): the restore skips it.
    loaded = load_run(tmp_path / "script")
    assert loaded.step == 12 and loaded.state.opt_state is None
    for a, b in zip(jax.tree.leaves(loaded.state.params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Into a state built with another optimizer (Adam): parameters restored, its own optimizer state kept.
    adam = create_train_state(model, optax.adam(1e-3), digits.input_shape, jax.random.PRNGKey(1))
    restored = restore_state(tmp_path / "script", adam)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(restored.params)[0]),
                                  np.asarray(jax.tree.leaves(result.state.params)[0]))
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(adam.opt_state)
    # The CLI's analysis reads it too.
    from jaxnn import cli
    assert cli.main(["diagnose", str(tmp_path / "script"), "--batch-size", "32"]) == 0
    diagnostics = json.loads((tmp_path / "script" / "diagnostics.json").read_text())
    assert all(g["update_ratio"] is None for g in diagnostics["gradients"])  # its optimizer is not recorded
    # Its config.yaml is not a resumable run (the optimizer is not in it); without --resume it trains a fresh run.
    with pytest.raises(RunFolderError, match="fit\\(\\) wrote it, and its optimizer is not recorded"):
        runfolders.prepare(cfg, tmp_path / "script", resume=True)
    assert runfolders.default_parent(cfg) == pathlib.Path("runs", "script")  # not a folder inside the script's
    # fit does not write over an earlier run's checkpoints.
    with pytest.raises(RunFolderError, match="already holds checkpoints of an earlier run: give fit another run_dir"):
        fit(state, digits, num_steps=2, progress=False, run_dir=tmp_path / "script")


def test_fit_run_folder_says_what_it_cannot_rebuild(tmp_path):
    import flax.linen as nn

    class Mine(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    digits = data_lib.load_dataset("digits", seed=0)
    state = create_train_state(Mine(), optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(0))
    result = fit(state, digits, num_steps=4, progress=False, run_dir=tmp_path / "mine")
    assert not (tmp_path / "mine" / "config.yaml").exists()
    with pytest.raises(FileNotFoundError, match=r"written by fit\(\) without a config.yaml.*model \(Mine\) was not "
                                                r"built by jaxnn.models.get_model.*restore_state"):
        load_run(tmp_path / "mine")
    restored = restore_state(tmp_path / "mine", state)
    assert int(restored.step) == 4
    np.testing.assert_array_equal(np.asarray(restored.params["Dense_0"]["kernel"]),
                                  np.asarray(result.state.params["Dense_0"]["kernel"]))
    # Data changed after loading (noisy labels): config.yaml would rebuild other data; load_run says so.
    noisy = data_lib.Dataset(**{**digits.__dict__, "train": data_lib.Split(
        digits.train.x, data_lib.noisy_labels(digits.train.y, 0.5, 10, seed=0))})
    model = models.get_model("mlp", num_classes=10, width=8, depth=1)
    state = create_train_state(model, optax.sgd(0.1), digits.input_shape, jax.random.PRNGKey(0))
    fit(state, noisy, num_steps=2, progress=False, run_dir=tmp_path / "noisy")
    with pytest.raises(CheckpointError, match="training data config.yaml loads differ from those fit"):
        load_run(tmp_path / "noisy")


def test_a_failed_data_load_leaves_nothing_behind(tmp_path, monkeypatch):
    from jaxnn.data import download

    def offline(url, destination, timeout, progress):
        raise OSError("network unreachable")

    monkeypatch.setattr(download, "fetch_url", offline)
    missing = tmp_path / "nowhere" / "mnist"
    cfg = config_lib.load_config("mnist_mlp", overrides=TINY + [f"output_dir={tmp_path / 'runs'}",
                                                                 f"data.data_dir={missing}"])
    with pytest.raises(FileNotFoundError, match=f"IDX files missing in {missing}"):
        train_from_config(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data folder, no run folder


def test_concurrent_starts_stale_versions_and_unresumable_folders(tmp_path):
    """Two runs that resolved the same version_N get different folders; analysis of runs/NAME skips a version with
    no checkpoint yet; X/config.yaml --resume names X even before its first checkpoint; a config without
    checkpoints refuses --resume in one line."""
    cfg = config_lib.Config(output_dir=str(tmp_path), name="n")
    first = runfolders.resolve(cfg, None, resume=False)
    assert runfolders.claim(first, fresh=True) == first  # the first start takes version_1 ...
    assert runfolders.claim(first, fresh=True) == tmp_path / "n" / "version_2"  # ... the one racing it version_2
    assert runfolders.claim(tmp_path / "pinned", fresh=False) == tmp_path / "pinned"
    (tmp_path / "n" / "version_3").write_text("a file where the next folder would go")
    assert runfolders.claim(tmp_path / "n" / "version_3", fresh=True) == tmp_path / "n" / "version_4"
    for name in ("version_1", "version_2"):
        (tmp_path / "n" / name / "config.yaml").write_text("name: n\n")
    (tmp_path / "n" / "version_1" / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "n" / "version_2" / "metrics.jsonl").write_text("")  # started, no checkpoint yet
    assert runfolders.latest_run(tmp_path / "n") == tmp_path / "n" / "version_1"
    killed = tmp_path / "n" / "version_2" / "config.yaml"
    assert runfolders.run_folder_of_config(killed) == tmp_path / "n" / "version_2"
    with pytest.raises(RunFolderError, match="nothing to resume: run folder .*version_2 holds no checkpoint"):
        runfolders.prepare(cfg, runfolders.run_folder_of_config(killed), resume=True)
    off = _cfg(tmp_path, "checkpoint.enabled=false")
    with pytest.raises(RunFolderError, match="checkpoint.enabled: false"):
        train_from_config(off, resume=True)
    summary = train_from_config(off)  # trains, and writes no checkpoint it was told not to
    assert not (tmp_path / "runs" / "digits_mlp" / "version_1" / "checkpoints").exists(), summary["run_dir"]


def test_fit_record_of_unstandardised_data_and_a_rerun_into_the_same_folder(tmp_path):
    raw = data_lib.load_dataset("digits", seed=0, standardize=False)
    model = models.get_model("mlp", num_classes=10, width=8, depth=1)
    state = create_train_state(model, optax.sgd(0.1), raw.input_shape, jax.random.PRNGKey(0))
    fit(state, raw, num_steps=3, progress=False, run_dir=tmp_path / "raw")
    assert config_lib.load_config(tmp_path / "raw" / "config.yaml").data.standardize is False
    assert load_run(tmp_path / "raw").step == 3  # the same data rebuilt: the fingerprint matches
    # A fit killed before its final save, then another model into the same folder: its record replaces the first.
    (tmp_path / "raw" / "checkpoints").rename(tmp_path / "kept")
    wider = models.get_model("mlp", num_classes=10, width=16, depth=1)
    fit(create_train_state(wider, optax.sgd(0.1), raw.input_shape, jax.random.PRNGKey(0)), raw, num_steps=2,
        progress=False, run_dir=tmp_path / "raw")
    assert config_lib.load_config(tmp_path / "raw" / "config.yaml").model.kwargs["width"] == 16
