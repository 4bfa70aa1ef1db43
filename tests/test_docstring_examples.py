"""The code examples in module docstrings run (issue 27's guard, with tests/test_readme.py for the README): each
indented example block of a module's docstring is executed with the module's own names and a small shared setting
(a two-layer Flax MLP named as Flax names layers, Dense_0 and Dense_1, on 64 digits); sizes a test cannot afford are
shrunk as the README's smoke comments do (SMOKE below: each replacement must match)."""

import ast
import importlib
import re
import textwrap

import pytest

MODULES = ["jaxnn.curvature", "jaxnn.curvature.blocks", "jaxnn.curvature.population", "jaxnn.diagnostics.gradcheck",
           "jaxnn.diagnostics.layers", "jaxnn.diagnostics.nonfinite", "jaxnn.landscape", "jaxnn.models",
           "jaxnn.models.nnx", "jaxnn.train.population"]
SMOKE = {"jaxnn.landscape": {"np.linspace(-1, 1, 51)": "np.linspace(-1, 1, 5)"},
         "jaxnn.train.population": {"num_steps=500": "num_steps=10"},
         "jaxnn.curvature": {"num_samples=100": "num_samples=12"}}

SETTING = """
import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from flax import nnx
import jaxnn
from jaxnn import curvature, data as data_lib, losses, models
from jaxnn.train import create_train_state

class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))

ds = data_lib.load_dataset("digits")
x, y = ds.train.x[:64], ds.train.y[:64]
batch = data = train = (x, y)
test = (x[:2], y[:2])
batches = [(x[:32], y[:32]), (x[32:], y[32:])]
key = jax.random.key(0)
state = create_train_state(Net(), optax.sgd(0.1), ds.input_shape, key)
params = state.params
loss_fn = losses.make_loss_fn(state.apply_fn, "softmax_cross_entropy")
accuracy_fn = losses.make_metric_fn(state.apply_fn)
b = jax.tree.map(jnp.ones_like, params)
predict_fn = lambda p, inputs: state.apply_fn({"params": p}, inputs)
output_loss = lambda logits, labels: -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.size), labels])
"""
EXTRA = {  # names a module's example uses differently
    "jaxnn.models": "x = jnp.zeros((2, 32, 32, 3))",
    "jaxnn.curvature.population": "state = jaxnn.train.train_population(Net(), optax.sgd, ds, num_steps=2, "
                                  "members={'seed': [0, 1], 'learning_rate': [0.1, 0.2]}, progress=False).state",
}


def examples(module_name: str) -> list[str]:
    """The indented blocks of the module's docstring that are Python."""
    doc = ast.get_docstring(ast.parse(importlib.util.find_spec(module_name).loader.get_source(module_name))) or ""
    found = []
    for block in re.findall(r"\n\n((?:    .*\n?|\n)+)", doc + "\n"):
        code = textwrap.dedent(block).strip() + "\n"
        found.append(code)  # every indented block of these modules is code: one that does not parse fails
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    blocks = examples(module_name)
    assert blocks, f"{module_name}: no example found in its docstring"
    monkeypatch.chdir(tmp_path)  # figures an example saves land here
    module = importlib.import_module(module_name)
    namespace = {**vars(module), **{name: getattr(module, name) for name in getattr(module, "__all__", [])}}
    exec(compile(SETTING + EXTRA.get(module_name, ""), "setting", "exec"), namespace)
    for code in blocks:
        for old, new in SMOKE.get(module_name, {}).items():
            if old in code:
                code = code.replace(old, new)
        exec(compile(code, f"{module_name} docstring", "exec"), namespace)


def test_smoke_replacements_still_match():
    for module_name, replacements in SMOKE.items():
        text = "".join(examples(module_name))
        assert all(old in text for old in replacements), module_name
