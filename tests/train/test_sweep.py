"""Sweeps (`jaxnn sweep`): the sweep section's expansion, bad sections named, every member (the exported best one
included) equal to `jaxnn train` with its config (float64, 1e-12), a killed sweep resumed without retraining its
finished chunks, and the CLI end to end."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxnn import config as config_lib
from jaxnn.config import ConfigError
from jaxnn.train import load_run, train_from_config
from jaxnn.train.checkpoint import CheckpointError
from jaxnn.runfolders import RunFolderError
from jaxnn.train.sweep import member_config, run_sweep, sweep_members

SMALL = {"model.kwargs": {"width": 16, "depth": 1, "activation": "relu"}, "train.steps": 24, "train.batch_size": 32,
         "train.log_every": 8, "train.progress": False, "optimizer.name": "momentum", "optimizer.lr": 0.05}


def small_config(tmp_path, sweep, **overrides):
    values = {**SMALL, "output_dir": str(tmp_path), "sweep": sweep, **overrides}
    return config_lib.load_config(None, overrides=values)


def test_grid_and_random_expansion(tmp_path):
    cfg = small_config(tmp_path, {"optimizer.lr": {"log_uniform": [1e-3, 1e-1], "n": 3}, "seed": [0, 1]})
    plan = sweep_members(cfg)
    assert plan.fields == ("optimizer.lr", "train.seed") and plan.count == 6
    np.testing.assert_allclose(sorted(set(plan.values["optimizer.lr"])), [1e-3, 1e-2, 1e-1], rtol=1e-12)
    assert plan.values["train.seed"] == [0, 1, 0, 1, 0, 1]  # the last axis varies fastest

    cfg = small_config(tmp_path, {"method": "random", "samples": 4, "draw_seed": 3, "seed": [0, 1, 2],
                                  "optimizer.lr": {"log_uniform": [1e-3, 1e-1]},
                                  "optimizer.momentum": {"uniform": [0.5, 0.9]}})
    plan = sweep_members(cfg)
    assert plan.count == 12 and set(plan.values["train.seed"]) == {0, 1, 2}
    lrs = np.asarray(plan.values["optimizer.lr"])
    assert np.all((lrs >= 1e-3) & (lrs <= 1e-1)) and len(set(lrs)) == 4  # 4 draws, each crossed with 3 seeds
    assert plan.values == sweep_members(cfg).values  # the same draws every time (draw_seed)
    assert member_config(cfg, plan, 5).optimizer.lr == plan.values["optimizer.lr"][5]
    assert member_config(cfg, plan, 5).train.data_seed == 0 and member_config(cfg, plan, 5).sweep == {}


@pytest.mark.parametrize("sweep, overrides, field, message", [
    ({"optimizer.lrr": [0.1]}, {}, "sweep.optimizer.lrr", "no such config field; sweepable fields: train.seed"),
    ({"model.kwargs.width": [8, 16]}, {}, "sweep.model.kwargs.width", "cannot vary inside one population"),
    ({"train.batch_size": [16, 32]}, {}, "sweep.train.batch_size", "cannot vary inside one population"),
    ({"optimizer.b1": [0.8, 0.9]}, {}, "sweep.optimizer.b1", "momentum does not use optimizer.b1"),
    ({"optimizer.momentum": [0.5, 1.2]}, {}, "sweep.optimizer.momentum", "value 1.2: .*must be in \\[0, 1\\)"),
    ({"optimizer.lr": [0.1, -0.1]}, {}, "sweep.optimizer.lr", "value -0.1: .*positive"),
    ({"optimizer.lr": {"log_uniform": [0.0, 0.1], "n": 3}}, {}, "sweep.optimizer.lr", "positive bounds"),
    ({"optimizer.lr": {"uniform": [0.1, 0.2]}}, {}, "sweep.optimizer.lr", "needs n >= 1"),
    ({"method": "random", "optimizer.lr": {"uniform": [0.1, 0.2]}}, {}, "sweep.samples", "samples >= 1"),
    ({"seed": [0, 1.5]}, {}, "sweep.seed", "non-negative integers"),
    ({"dropout": [0.1, 1.2]}, {}, "sweep.dropout", r"dropout rates must be in \[0, 1\)"),
    ({"seed": [0], "train.seed": [1]}, {}, "sweep.train.seed", "swept twice"),
    ({"optimizer.lr": [0.1]}, {"optimizer.name": "lbfgs"}, "optimizer.name", "cannot train as a population"),
])
def test_bad_sweep_sections_name_the_field(tmp_path, sweep, overrides, field, message):
    with pytest.raises(ConfigError, match=message) as error:
        small_config(tmp_path, sweep, **overrides)
    assert error.value.field == field


def test_members_equal_single_runs_and_the_best_is_an_ordinary_run_folder(tmp_path, x64):
    """Chunks of 3 over 4 members (the last chunk padded); every member's final metrics and the exported best
    member's parameters equal `train_from_config` of its config to 1e-12; the curvature columns are filled."""
    cfg = small_config(tmp_path, {"optimizer.lr": [0.02, 0.1], "seed": [0, 1]}, **{"population.chunk": 3})
    lines = []
    summary = run_sweep(cfg, tmp_path / "sweep", curvature=True, log=lines.append)
    out = tmp_path / "sweep"
    for name in ("sweep.csv", "sweep.json", "sweep.png", "sweep_losses.png", "best/config.yaml", "best/curves.png"):
        assert (out / name).is_file(), name
    rows = summary["rows"]
    assert [r["member"] for r in rows] == [0, 1, 2, 3] and all(r["status"] == "completed" for r in rows)
    assert all(np.isfinite(r["lambda_max"]) and r["lambda_max"] > 0 and np.isfinite(r["hessian_trace"])
               and 0 < r["gradient_curvature"] <= r["lambda_max"] * (1 + 1e-9) for r in rows)  # a Rayleigh quotient
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("member,optimizer.lr,train.seed,status")
    best = summary["best_member"]
    assert rows[best]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert any(line.startswith(f"best member #{best}") for line in lines)
    assert 0 <= summary["ensemble_test"]["ensemble_accuracy"] <= 1

    plan = sweep_members(cfg)
    plan_rows = [plan.member(i) for i in range(4)]
    for index in (best, 3 - best):
        alone_cfg = member_config(cfg, plan, index).replace(**{"name": f"alone{index}"})
        alone = train_from_config(alone_cfg)
        for split in ("train", "val", "test"):
            np.testing.assert_allclose(rows[index][f"{split}_loss"], alone["final"][f"{split}_loss"], rtol=1e-12)
        assert rows[index]["optimizer.lr"] == plan_rows[index]["optimizer.lr"]
    exported = load_run(out / "best", optimizer_state=True)
    again = load_run(tmp_path / f"alone{best}", optimizer_state=True)
    assert exported.step == again.step == 24 and exported.state.opt_state is not None
    for a, b in zip(jax.tree.leaves(exported.state.checkpoint_tree()), jax.tree.leaves(again.state.checkpoint_tree())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    assert json.loads((out / "best" / "summary.json").read_text())["optimizer_state"] == "from the sweep"


def test_a_sequence_model_sweeps_over_a_warmup_cosine_learning_rate(tmp_path, x64):
    """An encoder-decoder on per-position labels, its learning rate swept under warmup_cosine (optax's own schedule
    refused a member's traced rate; the ensemble read one label per example): each member equals its single run
    (1e-12) and the ensemble's member columns equal the eval step's test metrics."""
    cfg = small_config(tmp_path, {"optimizer.lr": [0.003, 0.01]}, **{
        "data.name": "seq2seq", "data.kwargs": {"problem": "reverse", "num_examples": 400, "length": 5, "alphabet": 5},
        "model.name": "seq2seq", "model.kwargs": {"cell": "gru", "embed_dim": 8, "hidden": 8, "attention": "dot"},
        "train.loss": "sequence_cross_entropy", "optimizer.name": "adam", "optimizer.schedule": "warmup_cosine",
        "optimizer.warmup_steps": 4, "optimizer.eps": 1e-4, "train.steps": 12, "train.log_every": 6})
    summary = run_sweep(cfg, tmp_path / "sweep", log=lambda line: None)
    rows = summary["rows"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    ensemble = summary["ensemble_test"]
    assert ensemble["mean_member_accuracy"] == pytest.approx(np.mean([r["test_accuracy"] for r in rows]), abs=1e-9)
    assert ensemble["mean_member_nll"] == pytest.approx(np.mean([r["test_loss"] for r in rows]), rel=1e-9)
    assert 0 < ensemble["ensemble_accuracy"] <= 1
    plan = sweep_members(cfg)
    alone = train_from_config(member_config(cfg, plan, 1).replace(**{"name": "alone"}))
    np.testing.assert_allclose(rows[1]["test_loss"], alone["final"]["test_loss"], rtol=1e-12)


def test_killed_sweep_resumes_without_retraining_finished_chunks(tmp_path):
    cfg = small_config(tmp_path, {"optimizer.lr": [0.02, 0.05, 0.1, 0.2]}, **{"population.chunk": 2})
    out = tmp_path / "sweep"
    full = run_sweep(cfg, out, log=lambda line: None)
    with pytest.raises(RunFolderError, match="already holds a sweep: add --resume"):
        run_sweep(cfg, out, log=lambda line: None)
    # As if killed during the second chunk: its folder (written whole or not at all) and the outputs are missing.
    chunks = sorted((out / "chunks").iterdir())
    assert [c.name for c in chunks] == ["00000-00001", "00002-00003"]
    shutil.rmtree(chunks[1])
    for name in ("sweep.csv", "sweep.json"):
        (out / name).unlink()
    lines = []
    resumed = run_sweep(cfg, out, resume=True, log=lines.append)
    assert any("members 0-1: read from" in line for line in lines)
    assert not any("members 2-3: read from" in line for line in lines)
    assert resumed["rows"] == full["rows"]
    with pytest.raises(RunFolderError, match="differs from the saved one in optimizer.momentum"):
        run_sweep(cfg.replace(**{"optimizer.momentum": 0.5}), out, resume=True, log=lambda line: None)
    (chunks[0] / "state.npz").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="00000-00001 is unreadable"):
        run_sweep(cfg, out, resume=True, log=lambda line: None)


def test_dropout_members_equal_single_runs_with_that_rate(tmp_path, x64):
    cfg = small_config(tmp_path, {"dropout": [0.0, 0.3]}, **{"train.steps": 16})
    summary = run_sweep(cfg, tmp_path / "sweep", log=lambda line: None)
    plan = sweep_members(cfg)
    for index in range(2):
        member = member_config(cfg, plan, index)
        assert member.model.kwargs["dropout"] == [0.0, 0.3][index]
        alone = train_from_config(member.replace(**{"name": f"alone{index}"}))
        np.testing.assert_allclose(summary["rows"][index]["train_loss"], alone["final"]["train_loss"], rtol=1e-12)
    exported = load_run(tmp_path / "sweep" / "best")
    again = load_run(tmp_path / f"alone{summary['best_member']}")
    for a, b in zip(jax.tree.leaves(exported.state.params), jax.tree.leaves(again.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_a_dropout_sweep_reports_another_arguments_wrong_type_as_it_is(tmp_path):
    """The dropout sweep probes the model with a placeholder rate; a wrongly typed other argument (width=16.0) is
    reported as itself, not as 'takes no dropout rate'."""
    cfg = small_config(tmp_path, {"model.kwargs.dropout": [0.1, 0.2]},
                       **{"model.kwargs": {"width": 16.0, "depth": 1, "activation": "relu"}})
    with pytest.raises(TypeError, match=r"^get_model\('mlp'\): width: expected an integer >= 1, got float 16.0$"):
        run_sweep(cfg, tmp_path / "sweep", log=lambda line: None)
