"""`jaxnn doctor`: a healthy model passes (exit 0), a badly initialised one with a tiny learning rate fails the
checks that should catch it (exit 1), an invalid config is a failed check."""

from jaxnn import config as config_lib
from jaxnn.cli import main
from jaxnn.train.doctor import doctor

SMALL = ["--set", "model.kwargs={width: 32, depth: 2, activation: relu, kernel_init: he}", "--overfit-steps", "80"]


def test_a_healthy_model_passes(capsys):
    assert main(["doctor", "digits_mlp", *SMALL, "--set", "optimizer.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "overfits 20 examples            PASS    training accuracy 100%" in out
    assert "gradient check (float64)        PASS    good" in out
    assert "every check passed" in out


def test_saturated_init_and_a_tiny_learning_rate_fail():
    cfg = config_lib.load_config("digits_mlp", overrides={
        "model.kwargs": {"width": 32, "depth": 2, "activation": "tanh", "kernel_init": "small_normal",
                         "kernel_init_kwargs": {"sigma": 1.0}},
        "optimizer.lr": 1e-7})
    checks = {check.name: check for check in doctor(cfg, overfit_steps=40)}
    assert checks["initial loss ~ ln(C)"].status == "fail"           # N(0, 1) weights: huge logits
    assert checks["overfits 20 examples"].status == "fail"           # lr 1e-7 cannot fit 20 examples in 40 steps
    assert checks["activations at init"].status == "fail" and "saturated" in checks["activations at init"].measured
    assert checks["regularisation raises the loss"].status == "pass"
    assert checks["gradient check (float64)"].status == "pass"       # wrong training, correct gradients
    assert checks["first update / weights"].status == "warn"


def test_an_invalid_config_is_a_failed_check(capsys):
    assert main(["doctor", "digits_mlp", "--set", "optimizer.lr=-1"]) == 1
    out = capsys.readouterr().out
    assert "config is valid  FAIL" in out and "optimizer.lr" in out
    assert main(["doctor", "digits_mlp", "--set", "model.name=resnet7"]) == 1  # a name only the registry knows
    out = capsys.readouterr().out
    assert "config is valid  FAIL" in out and "model.name" in out and "valid models: " in out
