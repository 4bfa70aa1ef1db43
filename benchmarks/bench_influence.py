"""jaxnn's influence functions vs a per-example loop and kronfluence's EKFAC, in one process, same model and data.

Setup (the MLP of ``jaxnn.experiments.influence_noisy_labels``, reusing its code): the embedded digits (1,438 training
images, 8x8x1), 10 % of the training labels flipped (seed 0), a tanh MLP 64-32-10 (2,410 parameters) trained in
float64 by L-BFGS to a minimum of R(θ) = mean CE + λ/2‖θ‖² (λ = 1e-3). Damping δ = 1e-3 · λmax(H), H the Hessian of R.

1. Influence of every training example on the loss of test point 0:
   - jaxnn:      ``curvature.influence`` (CG solve of (H + δI) s_test = ∇L_test, then one jvp pass), timed whole;
   - loop:       the same s_test, then a jitted per-example gradient and a dot product with s_test, in a Python loop
                 (checked against jaxnn to ~1e-8);
   - kronfluence: EKFAC factors (``fit_all_factors``) and ``compute_pairwise_scores``, timed apart, on an identical
                 torch float64 model. Its score is ∇L_testᵀ (F̂ + d I)⁻¹ ∇ℓ_i with F̂ the EKFAC approximation of the
                 Fisher of the mean CE (labels sampled from the model): n × jaxnn's removal effect, same sign.
2. Self-influence ∇ℓ_iᵀ (H + δI)⁻¹ ∇ℓ_i for flipped-label detection: jaxnn's exact dense route vs kronfluence's
   ``compute_self_scores`` on the same EKFAC factors; the fraction of flipped labels in each ranking's top m
   (m = number flipped) and the AUC flipped vs clean.

kronfluence does not know about the L2 term: its loss is the plain summed CE, so the closest equivalent of H + δI is
F̂ + (λ + δ) I, i.e. ``ScoreArguments(damping_factor=λ + δ)`` (kronfluence adds it to every EKFAC eigenvalue).
At δ = 1e-3 λmax the pairwise scores are dominated by low-curvature directions, where a Fisher from one sampled label
per example and its Kronecker factorisation differ most from H: expect loose agreement there, closer on self-influence.
Timings: first call (incl. JIT compilation / torch warm-up) and the median of warm calls.

    pip install --no-deps kronfluence==1.0.1 einconv einops accelerate safetensors   # beside the pinned torch
    python benchmarks/bench_influence.py [--steps 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

from _timing import timed  # benchmarks/_timing.py: the scripts run from this folder

try:
    import torch
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, Task, prepare_model
    from kronfluence import __version__ as kronfluence_version
except ImportError:
    sys.exit("bench_influence: needs torch (the test extra) and kronfluence, installed without its dependencies so that "
             "the pinned torch stays: pip install --no-deps kronfluence==1.0.1 einconv einops accelerate safetensors "
             "(../shared/PEERS.md)")



def _spearman(a, b) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:  # Pearson of the ranks (the scores here have no ties)
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        return float(np.corrcoef(rank(a), rank(b))[0, 1])
    return float(spearmanr(a, b).statistic)


class ClassificationTask(Task):
    """kronfluence's convention: the train loss summed over the batch; ``sample=True`` draws labels from the model's
    softmax (the true Fisher, as kronfluence's examples do); the measurement is the query's cross-entropy."""

    def compute_train_loss(self, batch, model, sample: bool = False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).flatten()
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model, sample=False)


def torch_copy(params, x, flax_logits):
    """The Flax MLP as torch.nn.Sequential in float64 (Flax Dense kernels are (in, out), torch weights (out, in));
    checks that the logits match."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 10)).double()
    with torch.no_grad():
        for layer, name in ((model[1], "dense_0"), (model[3], "head")):
            layer.weight.copy_(torch.from_numpy(np.array(params[name]["kernel"]).T))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
        difference = np.max(np.abs(model(torch.from_numpy(x)).numpy() - flax_logits))
    if difference > 1e-10:
        raise SystemExit(f"bench_influence: torch and Flax logits differ by {difference:.1e}")
    return model.eval(), difference


def kronfluence_side(params, x, y, x_test, y_test, flax_logits, damping, repeats, output_dir):
    """(logit difference, factor-fitting times, pairwise-scoring times, pairwise scores (n,), self-scoring times,
    self scores (n,)); every kronfluence dtype float64."""
    model, difference = torch_copy(params, x, flax_logits)
    task = ClassificationTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("bench_influence", model, task, cpu=True, disable_tqdm=True, output_dir=output_dir)
    f64 = torch.float64
    factor_args = FactorArguments(strategy="ekfac", activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                                  per_sample_gradient_dtype=f64, lambda_dtype=f64)
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                score_dtype=f64)
    train = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
    query = torch.utils.data.TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test).long())
    n = len(train)

    def fit():
        torch.manual_seed(0)  # the sampled labels of the Fisher
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=n, factor_args=factor_args,
                                 overwrite_output_dir=True)

    def pairwise():
        analyzer.compute_pairwise_scores("pairwise", "ekfac", query, train, per_device_query_batch_size=1,
                                         per_device_train_batch_size=n, score_args=score_args,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("pairwise")["all_modules"][0].numpy()

    def self_scores():
        analyzer.compute_self_scores("self", "ekfac", train, per_device_train_batch_size=n, score_args=score_args,
                                     overwrite_output_dir=True)
        return analyzer.load_self_scores("self")["all_modules"].numpy()

    fit_times = timed(fit, repeats)[:2]
    *pair_times, pair_scores = timed(pairwise, repeats)
    *self_times, self_values = timed(self_scores, repeats)
    return difference, fit_times, pair_times, pair_scores, self_times, self_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="L-BFGS steps (the experiment's 4000)")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per timing (dense self-influence: 1)")
    args = parser.parse_args()
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its torch.cuda.amp.GradScaler

    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from jaxnn import curvature, data, models
    from jaxnn.experiments.influence_noisy_labels import _regularised, auc, flip_labels, found_curve, lbfgs

    l2, damping_fraction = 1e-3, 1e-3
    d = data.load_dataset("digits", seed=0, val_fraction=0.0, test_fraction=0.2)
    labels, flipped = flip_labels(d.train.y, 0.1, d.num_classes, seed=0)
    x_np, y_np = np.asarray(d.train.x, np.float64), np.asarray(labels, np.int32)
    x_test, y_test = np.asarray(d.test.x[:1], np.float64), np.asarray(d.test.y[:1], np.int32)
    n, m = len(y_np), int(flipped.sum())
    model = models.get_model("mlp", num_classes=d.num_classes, width=32, depth=1, activation="tanh")

    with jax.enable_x64(True):
        x, y, test = jnp.asarray(x_np), jnp.asarray(y_np), (jnp.asarray(x_test), jnp.asarray(y_test))
        params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64),
                              models.init_model(model, jax.random.PRNGKey(0), x.shape[1:])[0])
        loss_fn, example_loss = _regularised(model, l2)
        started = time.perf_counter()
        params, gradient_norm = lbfgs(loss_fn, params, (x, y), args.steps)
        train_time = time.perf_counter() - started
        lam_max = float(curvature.top_eigenvalues(curvature.hessian(loss_fn, params, (x, y)), k=1,
                                                  progress=False)[0][0])
        damping = damping_fraction * lam_max
        print(f"jax {jax.__version__}, torch {torch.__version__}, kronfluence {kronfluence_version} "
              f"on CPU; digits: {n} training images ({m} labels flipped), MLP 64-32-10 tanh "
              f"({ravel_pytree(params)[0].size:,} params), float64")
        print(f"L-BFGS {args.steps} steps in {train_time:.1f} s: ||grad R|| = {gradient_norm:.1e}; "
              f"lambda_max = {lam_max:.4g}, delta = {damping_fraction:g} lambda_max = {damping:.3g}")

        # 1a. jaxnn: solve + one jvp pass over the training set.
        inf_first, inf_warm, result = timed(lambda: curvature.influence(
            loss_fn, params, (x, y), test, example_loss_fn=example_loss, damping=damping, method="cg", tol=1e-6),
            args.repeats)
        reference = result.removal_effect * n  # ∇L_testᵀ (H + δI)⁻¹ ∇ℓ_i

        # 1b. The loop a user would write: the same solve (timed alone here, as the loop's first step), then one
        # jitted per-example gradient (flattened) and a dot product each.
        test_gradient = jax.grad(lambda p: example_loss(p, test))(params)
        solve_first, solve_warm, _ = timed(lambda: curvature.solve(
            curvature.hessian(loss_fn, params, (x, y)), test_gradient, damping=damping, method="cg", tol=1e-6),
            args.repeats)
        flat_gradient = jax.jit(lambda p, batch: ravel_pytree(jax.grad(example_loss)(p, batch))[0])
        s_test = np.asarray(ravel_pytree(result.s_test)[0])

        def loop():
            return np.array([np.dot(np.asarray(flat_gradient(params, (x_np[i:i + 1], y_np[i:i + 1]))), s_test)
                             for i in range(n)])

        loop_first, loop_warm, looped = timed(loop, args.repeats)
        loop_error = np.max(np.abs(looped - reference)) / np.max(np.abs(reference))

        # 2. jaxnn self-influence, exact (dense H and eigh): seconds per call, so one warm call.
        self_first, self_warm, exact_self = timed(lambda: curvature.self_influence(
            loss_fn, params, (x, y), example_loss_fn=example_loss, damping=damping), 1)
        flax_logits = np.asarray(model.apply({"params": params}, x))

    output_dir = tempfile.mkdtemp(prefix="bench_influence_")
    try:
        difference, fit_times, pair_times, ekfac, self_times, ekfac_self = kronfluence_side(
            params, x_np, y_np, x_test, y_test, flax_logits, l2 + damping, args.repeats, output_dir)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)

    print(f"torch copy: max |logit difference| = {difference:.1e}")
    print(f"kronfluence: no L2 term in its loss; damping_factor = l2 + delta = {l2 + damping:.3g} (added to every "
          "EKFAC eigenvalue of the Fisher of the mean CE, the L2 Hessian l2*I folded in)")
    print(f"\n1. influence on test point 0 (label {int(y_test[0])}), n = {n}; times: first call / warm median")
    print(f"  jaxnn influence (CG, tol 1e-6)   {inf_first:7.3f} / {inf_warm:7.3f} s   CG {result.solve.num_iters} "
          f"iterations, relative residual {result.solve.relative_residual:.1e}")
    print(f"  its CG solve alone                {solve_first:7.3f} / {solve_warm:7.3f} s")
    print(f"  per-example loop (given s_test)   {loop_first:7.3f} / {loop_warm:7.3f} s   max rel. difference to "
          f"jaxnn {loop_error:.1e}")
    print(f"  kronfluence EKFAC fit_all_factors {fit_times[0]:7.3f} / {fit_times[1]:7.3f} s")
    print(f"  kronfluence pairwise scores       {pair_times[0]:7.3f} / {pair_times[1]:7.3f} s")
    scale = np.dot(ekfac, reference) / np.dot(reference, reference)
    print(f"  kronfluence vs jaxnn (n x removal effect): Pearson {np.corrcoef(ekfac, reference)[0, 1]:.3f}, "
          f"Spearman {_spearman(ekfac, reference):.3f}, least-squares scale {scale:.3f}, sign agreement "
          f"{np.mean(np.sign(ekfac) == np.sign(reference)):.3f}")

    print(f"\n2. self-influence, flipped-label detection (m = {m}; random finds {m / n:.3f} in its top m)")
    rankings = {"jaxnn exact (dense)": (self_first, self_warm, exact_self.scores),
                "kronfluence EKFAC": (self_times[0], self_times[1], ekfac_self)}
    for name, (first, warm, scores) in rankings.items():
        print(f"  {name:20s} {first:7.3f} / {warm:7.3f} s   found in top m {found_curve(scores, flipped)[m]:.3f}, "
              f"AUC {auc(scores, flipped):.3f}")
    print(f"  kronfluence vs jaxnn self-influence: Pearson {np.corrcoef(ekfac_self, exact_self.scores)[0, 1]:.3f}, "
          f"Spearman {_spearman(ekfac_self, exact_self.scores):.3f}")

    ekfac_pair = fit_times[1] + pair_times[1]
    ekfac_self_total = fit_times[1] + self_times[1]
    print("\nsummary (warm medians; kronfluence totals include factor fitting)")
    print(f"  {'task':<24s} {'jaxnn s':>8s} {'other':<22s} {'other s':>8s} {'other/jaxnn':>11s}")
    for task, ours, other, theirs in (("influence, 1 test point", inf_warm, "loop alone", loop_warm),
                                      ("influence, 1 test point", inf_warm, "CG solve + loop", solve_warm + loop_warm),
                                      ("influence, 1 test point", inf_warm, "kronfluence fit+score", ekfac_pair),
                                      ("influence, 1 test point", inf_warm, "kronfluence score only", pair_times[1]),
                                      ("self-influence, all n", self_warm, "kronfluence fit+score", ekfac_self_total),
                                      ("self-influence, all n", self_warm, "kronfluence score only", self_times[1])):
        print(f"  {task:<24s} {ours:8.3f} {other:<22s} {theirs:8.3f} {theirs / ours:11.2f}")


if __name__ == "__main__":
    main()
