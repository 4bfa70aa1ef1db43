"""Shared by the multi-device and multi-process tests: one run trained on one device and its one-device analysis,
the reference every split of the same analysis is compared with (computed once per session)."""

import os
import subprocess
import sys
import types

import pytest

ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXNN_COORDINATOR")}
CURVATURE = ["--k", "5", "--density", "--x64"]
LANDSCAPE = ["--grid", "5", "--x64"]


def _jaxnn(*args):
    out = subprocess.run([sys.executable, "-m", "jaxnn.cli", *map(str, args)], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="session")
def analysed_run(tmp_path_factory):
    """``run``: a digits MLP (width 24) trained for 30 steps on one device; ``one_device``: the folder of its
    one-device curvature.json and landscape.npz, computed with the CLI options ``curvature`` and ``landscape``
    (float64), which the split runs repeat."""
    root = tmp_path_factory.mktemp("analysed")
    run, out = root / "run", root / "one_device"
    _jaxnn("train", "digits_mlp", "--run-dir", run, "--set", "train.steps=30", "--set", "train.progress=false",
           "--set", "model.kwargs={width: 24, depth: 1}", "--devices", 1)
    _jaxnn("curvature", run, *CURVATURE, "--devices", 1, "--out", out)
    _jaxnn("landscape", run, *LANDSCAPE, "--devices", 1, "--out", out)
    return types.SimpleNamespace(run=run, one_device=out, curvature=CURVATURE, landscape=LANDSCAPE)
