"""Every notebook under notebooks/ runs top to bottom in a fresh interpreter (code cells executed in order in one
namespace, as a kernel would), at smoke size (JAXNN_SMOKE=1); each ends with cells that check its own results.
A fresh process per notebook: a notebook may configure JAX before importing it (04 asks for 8 CPU devices)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
RUNNER = """
import json, sys
import matplotlib
matplotlib.use("Agg")
path = sys.argv[1]
cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
assert cells, path + " has no code cells"
namespace = {"__name__": "__notebook__"}
for index, cell in enumerate(cells):
    exec(compile("".join(cell["source"]), f"{path}[code cell {index}]", "exec"), namespace)
"""


def test_notebooks_are_numbered_and_stripped():
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(1, len(NOTEBOOKS) + 1)]
    for path in NOTEBOOKS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in cells), f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    env = {**os.environ, "JAXNN_SMOKE": "1"}
    # The suite's compiler flags (tests/conftest.py: optimisation level 0) without a device count: 04 asks for 8
    # simulated devices itself (part of what it shows), as it would in a fresh kernel.
    env["XLA_FLAGS"] = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                if not flag.startswith("--xla_force_host_platform_device_count"))
    done = subprocess.run([sys.executable, "-c", RUNNER, str(path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"{path.name} failed:\n{done.stderr[-4000:]}"
