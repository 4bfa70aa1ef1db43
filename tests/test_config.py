"""Configs: shipped files load, CLI overrides apply, invalid values fail naming the field — before compiling."""

import pytest

from jaxnn import config as config_lib
from jaxnn.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["digits_mlp", "digits_lstm", "mnist_mlp", "mnist_lenet", "cifar_resnet20",
                                  "seq2seq_reverse", "char_transformer"])
def test_shipped_configs_load_and_validate(name):
    from jaxnn import train

    cfg = load_config(name)
    assert cfg.name == name and train.check_config(cfg) is cfg
    assert name in config_lib.shipped_configs()


def test_overrides_are_typed_and_frozen():
    cfg = load_config("digits_mlp", overrides=["optimizer.lr=0.05", "train.batch_size=32", "model.kwargs.width=64",
                                               "optimizer.clip_norm=null", "data.kwargs={}"])
    assert cfg.optimizer.lr == 0.05 and cfg.train.batch_size == 32 and cfg.model.kwargs["width"] == 64
    assert cfg.optimizer.clip_norm is None
    assert load_config("digits_mlp", overrides=["optimizer.lr=1e-3"]).optimizer.lr == 1e-3  # YAML 1.1 string
    with pytest.raises(Exception):
        cfg.optimizer.lr = 1.0  # frozen


def test_yaml_round_trip(tmp_path):
    cfg = load_config("cifar_resnet20", overrides=["optimizer.boundaries=[0.3, 0.6]"])
    config_lib.save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, field, words", [
    ("optimizer.lr=-1", "optimizer.lr", "positive"),
    ("train.batch_size=0", "train.batch_size", "positive"),
    ("train.batch_size=ten", "train.batch_size", "integer"),
    ("train.grad_accum_steps=5", "train.grad_accum_steps", "divide"),
    ("optimizer.lrr=0.1", "optimizer.lrr", "unknown field"),
    ("optimiser.lr=0.1", "optimiser", "no such config section"),
    ("data.val_fraction=0.85", "data.val_fraction", "leave some training data"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last", ">= 1"),
    ("train.nan_guard=maybe", "train.nan_guard", "true/false"),
])
def test_invalid_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config("digits_mlp", overrides=[override])
    assert err.value.field == field
    assert words in str(err.value)


@pytest.mark.parametrize("override, field, words", [
    ("optimizer.name=adamax", "optimizer.name", "valid optimizers: sgd"),
    ("model.name=resnet7", "model.name", "valid models: "),
    ("data.name=imagenet", "data.name", "valid datasets: "),
    ("optimizer.schedule=linear", "optimizer.schedule", "valid schedules: constant"),
    ("train.loss=hinge", "train.loss", "valid losses: "),
])
def test_unknown_names_are_named_by_the_registries(override, field, words, tmp_path):
    """config.py imports no registry: a name is checked against its registry when the config is used
    (train.check_config, the first step of train_run, before the run folder is made)."""
    from jaxnn import train

    cfg = load_config("digits_mlp", overrides=[override])  # the config's own grammar holds
    with pytest.raises(ConfigError) as err:
        train.check_config(cfg)
    assert err.value.field == field and words in str(err.value)
    with pytest.raises(ConfigError) as err:
        train.train_run(cfg, run_dir=tmp_path / "run")
    assert err.value.field == field and not (tmp_path / "run").exists()
    assert train.check_config(load_config("digits_mlp")) == load_config("digits_mlp")


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, overrides=["optimizer.lr"])
    with pytest.raises(FileNotFoundError, match="digits_mlp"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer: {steps: 3}\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(unknown)
