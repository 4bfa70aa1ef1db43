"""transformer_block_hessian: a smoke run (every step of run() on tiny settings; ~25 s, compiling one Hessian-vector
program per block), and its measuring pieces against closed forms: the Jensen–Shannon distance
of equal, disjoint and two-point distributions, the blurred densities of hand-made SLQ nodes, the noise floor
between halves of the probes, and the blocks it compares."""

import math

import numpy as np
import pytest

pytestmark = pytest.mark.experiment


def test_js_distance_and_densities_against_closed_forms():
    from jaxnn.curvature.blocks import BlockSpectra, BlockSpectrum
    from jaxnn.experiments import transformer_block_hessian as experiment

    p = np.array([0.5, 0.5, 0.0, 0.0])
    assert experiment.js_distance(p, p) == 0.0
    assert experiment.js_distance(p, p[::-1]) == pytest.approx(1.0)  # disjoint supports: 1 bit
    q = np.array([1.0, 0.0, 0.0, 0.0])
    # JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (0.75, 0.25): ½(0.5 log2(0.5/0.75) + 0.5 log2(0.5/0.25)) + ½ log2(1/0.75)
    divergence = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(2.0)) + 0.5 * math.log2(1 / 0.75)
    assert experiment.js_distance(p, q) == pytest.approx(math.sqrt(divergence))
    assert experiment.heterogeneity(np.array([p, p[::-1], p])) == pytest.approx(2 / 3)

    def block(name, nodes):
        nodes = np.array([nodes], float)
        return BlockSpectrum(name, 2, nodes[0, -1:], np.zeros(1), np.ones(1, bool), 0.0, 0.0, nodes,
                             np.full_like(nodes, 1 / nodes.shape[1]))

    spectra = BlockSpectra([block("a", [0.0, 1.0]), block("b", [0.0, 1.0]), block("c", [9.0, 10.0])], 2, 1, 1e-3)
    grid, densities = experiment.block_densities(spectra, 0.01, 3001)
    np.testing.assert_allclose(densities.sum(1), 1.0)
    assert grid[0] < 0 and grid[-1] > 10
    np.testing.assert_allclose(densities[0], densities[1])
    assert experiment.js_distance(densities[0], densities[2]) == pytest.approx(1.0, abs=1e-9)
    mean = grid @ densities[2]
    assert mean == pytest.approx(9.5, abs=1e-4)  # the blur is symmetric: the nodes' mean is kept (up to the grid)

    # the noise floor: two probes with the same nodes give 0; disjoint probes of one block give 1 (for each block)
    def two_probes(name, first, second):
        nodes = np.array([first, second], float)
        return BlockSpectrum(name, 2, nodes[0, -1:], np.zeros(1), np.ones(1, bool), 0.0, 0.0, nodes,
                             np.full_like(nodes, 0.5))

    same = BlockSpectra([two_probes("a", [0.0, 1.0], [0.0, 1.0]), two_probes("b", [3.0, 4.0], [3.0, 4.0])], 2, 2, 1e-3)
    assert experiment.noise_floor(same, 0.01, 3001) == pytest.approx(0.0, abs=1e-12)
    apart = BlockSpectra([two_probes("a", [0.0, 1.0], [9.0, 10.0]), two_probes("b", [0.0, 1.0], [0.0, 1.0])], 2, 2,
                         1e-3)
    assert experiment.noise_floor(apart, 0.01, 3001) == pytest.approx(0.5, abs=1e-9)  # mean of 1 and 0


def test_the_blocks_are_every_weight_matrix_and_no_bias():
    import jax

    from jaxnn import models
    from jaxnn.experiments import transformer_block_hessian as experiment

    built = experiment.models_for({**experiment.CONFIG, **experiment.SMOKE})
    params, _ = models.init_model(built["LeNet"], jax.random.PRNGKey(0), (8, 8, 1))
    assert experiment.weight_blocks(params) == ["conv_0/kernel", "conv_1/kernel", "dense_0/kernel", "dense_1/kernel",
                                                "head/kernel"]
    params, _ = models.init_model(built["Transformer"], jax.random.PRNGKey(0), (8, 8))
    # Flax's attention biases are (heads, head_dim) arrays: two axes, yet biases (the key bias's Hessian is 0)
    assert experiment.weight_blocks(params) == [
        "encoder/block_0/attention/key/kernel", "encoder/block_0/attention/out/kernel",
        "encoder/block_0/attention/query/kernel", "encoder/block_0/attention/value/kernel",
        "encoder/block_0/mlp_in/kernel", "encoder/block_0/mlp_out/kernel", "encoder/embed/kernel",
        "encoder/positions", "head/kernel"]


def test_smoke_run_measures_every_seed_and_block(tmp_path):
    from jaxnn.experiments import run_experiment

    result = run_experiment("transformer_block_hessian", smoke=True, out_dir=tmp_path, progress=False)
    measured = result["measured"]
    for name, blocks in (("Transformer", 9), ("LeNet", 5)):
        row = measured[name]
        assert len(row["blocks"]) == blocks and len(row["block_lambda_max"][0]) == blocks
        assert 0 < row["heterogeneity"][0] <= 1 and 0 <= row["noise_floor"][0] <= 1
        assert row["gap"][0] == row["sgd"][0]["final_train_loss"] - row["adam"][0]["final_train_loss"]
    assert len(result["checks"]) == 3 and (tmp_path / "transformer_block_hessian.png").is_file()
