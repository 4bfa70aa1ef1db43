"""rnn_gradient_flow at smoke size against oracles outside its code: the linear RNN's Jacobian norms are ‖W^t‖₂ by
numpy matrix powers, and the LSTM's one-step state Jacobian agrees with central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.experiment


def test_rnn_gradient_flow_smoke_against_matrix_powers_and_finite_differences(tmp_path):
    import flax.linen as nn

    from jaxnn.experiments import rnn_gradient_flow as experiment, run_experiment

    record = run_experiment("rnn_gradient_flow", smoke=True, out_dir=tmp_path, progress=False)
    config = record["setting"]
    assert (tmp_path / "rnn_gradient_flow.png").stat().st_size > 0
    t = np.arange(1, config["steps"] + 1)
    keep = t >= config["fit_from"]
    for radius in config["radii"]:
        for seed, measured in zip(config["matrix_seeds"], record["measured"]["elman"]["identity"][str(radius)]):
            w = experiment.scaled_gaussian(config["hidden"], radius, seed)
            norms, power = [], np.eye(config["hidden"])
            for _ in t:
                power = w @ power
                norms.append(np.linalg.norm(power, 2))
            expected = np.exp(np.polyfit(t[keep], np.log(np.array(norms)[keep]), 1)[0])
            assert measured == pytest.approx(expected, rel=1e-6)
    clipped = record["measured"]["clipping"]["clipped"]
    assert all(run["max_grad_norm"] > config["clip_norm"] for run in clipped)  # the clip was active

    with jax.enable_x64(True):
        cell = nn.LSTMCell(3, param_dtype=jnp.float64)
        carry = (jnp.full(3, 0.3), jnp.full(3, -0.2))
        params = cell.init(jax.random.PRNGKey(0), carry, jnp.zeros(2))["params"]
        x = jnp.array([[0.5, -1.0]])
        autodiff = experiment.jacobian_norms(cell, params, x, carry)[0]
        flat = np.concatenate([np.asarray(c) for c in carry])

        def step(state):
            new, _ = cell.apply({"params": params}, (jnp.asarray(state[:3]), jnp.asarray(state[3:])), x[0])
            return np.concatenate([np.asarray(c) for c in new])

        columns = []
        for i in range(6):
            e = np.zeros(6)
            e[i] = 1e-6
            columns.append((step(flat + e) - step(flat - e)) / 2e-6)
        assert autodiff == pytest.approx(np.linalg.norm(np.array(columns).T, 2), rel=1e-6)
