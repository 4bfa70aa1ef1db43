"""jaxnn's Laplace approximation vs laplace-torch on the same model and data, in one process.

Issue 22's goal: fit + GLM predictive at least 2x faster than laplace-torch on this CPU. The model: a tanh MLP
64-32-10 (2,410 parameters) on the embedded digits, trained by a few hundred Adam steps in float64, copied into an
identical torch model (logits checked). For each structure (jaxnn "full" / "diag" / "kfac" / "last_layer" vs
laplace-torch's "full" / "diag" / "kron" / last-layer "full", all GGN, classification) the script times the fit on the 1,438 training images, the
marginal likelihood at one prior precision, and the probit GLM predictive on the 359 test images; it prints the
log marginal likelihoods side by side (full: they agree to ~1e-8, see tests/test_laplace.py; diag and K-FAC use
each library's own approximation of the same curvature) and the ratios. First calls (with compilation) apart from
warm medians.

    pip install --no-deps laplace-torch==0.3 curvlinops-for-pytorch backpack-for-pytorch einconv einops \\
        linear_operator jaxtyping wadler-lindig asdfghjkl torchmetrics lightning-utilities unfoldNd
    python benchmarks/bench_laplace.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from _timing import timed  # benchmarks/_timing.py: the scripts run from this folder

try:
    import torch
    from laplace import Laplace as TorchLaplace
except ImportError:
    sys.exit("bench_laplace: needs torch (the test extra) and laplace-torch installed without dependencies, see the "
             "module docstring (../shared/PEERS.md)")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prior-precision", type=float, default=1.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import jax
    import jax.numpy as jnp
    import optax

    from jaxnn import data, laplace as jaxnn_laplace, losses, models

    d = data.load_dataset("digits", seed=0, val_fraction=0.0, test_fraction=0.2)
    model = models.get_model("mlp", num_classes=10, width=32, depth=1, activation="tanh")
    delta = args.prior_precision
    with jax.enable_x64(True):
        x, y = jnp.asarray(d.train.x, jnp.float64), jnp.asarray(d.train.y)
        x_test = jnp.asarray(d.test.x, jnp.float64)
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64),
                              models.init_model(model, jax.random.PRNGKey(0), x.shape[1:])[0])
        loss_fn = losses.make_loss_fn(model.apply, "softmax_cross_entropy")
        tx = optax.adam(1e-2)

        @jax.jit
        def train(params):
            def step(carry, _):
                p, s = carry
                updates, s = tx.update(jax.grad(loss_fn)(p, (x, y)), s, p)
                return (optax.apply_updates(p, updates), s), None

            return jax.lax.scan(step, (params, tx.init(params)), None, length=300)[0][0]

        params = train(params)
        predict = lambda p, inputs: model.apply({"params": p}, inputs)  # noqa: E731

        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 10)).double()
        with torch.no_grad():
            for layer, name in ((net[1], "dense_0"), (net[3], "head")):
                layer.weight.copy_(torch.from_numpy(np.asarray(params[name]["kernel"]).T.copy()))
                layer.bias.copy_(torch.from_numpy(np.asarray(params[name]["bias"])))
            difference = np.max(np.abs(net(torch.from_numpy(np.asarray(x))).numpy() - np.asarray(predict(params, x))))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y)).long()), batch_size=len(y))
        x_test_torch = torch.from_numpy(np.asarray(x_test))
        print(f"jax {jax.__version__}, torch {torch.__version__} on CPU; digits MLP 64-32-10 tanh (2,410 params), "
              f"{len(y)} training / {len(x_test)} test images, float64; torch copy's logits within {difference:.1e}")
        print(f"{'structure':<18} {'jaxnn fit+ML+pred':>18} {'laplace-torch':>14} {'ratio':>7}   log ML jaxnn / torch")
        for ours_name, theirs_name in (("full", "full"), ("diag", "diag"), ("kfac", "kron"),
                                       ("last_layer", "last_layer")):
            def ours():
                fitted = jaxnn_laplace.laplace(predict, params, (x, y), structure=ours_name, prior_precision=delta)
                return fitted.log_marginal_likelihood(), fitted.predictive(x_test)

            def theirs():
                subset = "last_layer" if theirs_name == "last_layer" else "all"
                la = TorchLaplace(net, "classification", subset_of_weights=subset,
                                  hessian_structure="full" if subset == "last_layer" else theirs_name,
                                  prior_precision=delta)
                la.fit(loader)
                evidence = float(la.log_marginal_likelihood())
                return evidence, la(x_test_torch, pred_type="glm", link_approx="probit").detach().numpy()

            first, warm, (evidence, _) = timed(ours, args.repeats)
            torch_first, torch_warm, (torch_evidence, _) = timed(theirs, args.repeats)
            print(f"{ours_name + ' / ' + theirs_name:<18} {warm:8.3f} s ({first:5.2f}) {torch_warm:8.3f} s "
                  f"({torch_first:5.2f}) {torch_warm / warm:6.2f}x   {evidence:.6g} / {torch_evidence:.6g}")
    print("(times: warm median (first call); ratio = laplace-torch / jaxnn, goal >= 2)")


if __name__ == "__main__":
    main()
