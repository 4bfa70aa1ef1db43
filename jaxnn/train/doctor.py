"""``jaxnn doctor CONFIG``: the sanity checks a careful researcher runs on a new model before training it for real.

1. The loss at initialisation is ≈ ln(C) for C classes (softmax cross-entropy; within 25%, a warning within a
   factor 2): logits start small. A loss far from it means a wrong loss or badly scaled logits.
2. The model overfits a tiny subset (20 examples) to 100% training accuracy within a step budget, with the
   config's own optimizer: the model, loss and optimizer can learn at all.
3. Regularisation raises the loss: ½·wd·‖θ‖² added to the loss increases it by exactly that amount.
4. A gradient check (autodiff vs central differences, float64) on a small batch is good or acceptable.
5. At initialisation no layer reads mostly dead ReLUs or saturated tanh/sigmoid units, and activations neither
   vanish nor explode (``layer_statistics``); the optimizer's first update is ~1e-3 of the weights (a warning
   only: the rule of thumb is loose).

Each check gives pass / warn / fail with what was measured and what was expected; the command exits 0 when none
fails and 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STATUSES = ("pass", "warn", "fail", "skip")


@dataclasses.dataclass
class Check:
    name: str
    status: str
    measured: str
    expected: str


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  measured / expected"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status.upper():<6}  {c.measured}  (expected {c.expected})")
    failed = sum(c.status == "fail" for c in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed or warned" if failed else
                 "every check passed" + (" (with warnings)" if any(c.status == "warn" for c in checks) else ""))
    return "\n".join(lines)


def doctor(cfg: Any, *, overfit_examples: int = 20, overfit_steps: int = 300, seed: int = 0) -> list[Check]:
    """Run the checks of the module docstring on ``cfg`` (a validated :class:`jaxnn.config.Config`)."""
    from jaxnn import losses
    from jaxnn.diagnostics.gradcheck import gradient_check
    from jaxnn.diagnostics.layers import layer_statistics
    from jaxnn.train.run import build_state, load_dataset

    dataset = load_dataset(cfg)
    state, _, _ = build_state(cfg, dataset)
    classification = dataset.task == "classification"
    count = min(256, len(dataset.train))
    batch = (jnp.asarray(dataset.train.x[:count]), jnp.asarray(dataset.train.y[:count]))
    loss_fn = losses.make_loss_fn(state.apply_fn, cfg.train.loss, state.model_state)
    initial = float(loss_fn(state.params, batch))
    checks = []

    if classification and cfg.train.loss == "softmax_cross_entropy":
        chance = math.log(dataset.num_classes)
        status = ("pass" if abs(initial - chance) <= 0.25 * chance else
                  "warn" if 0.5 * chance <= initial <= 2 * chance else "fail")
        hint = "" if status == "pass" else (
            "; logits at init are large: scale down the last layer's init" if initial > chance else
            "; below chance at init: is the loss averaged over the classes or the labels leaking?")
        checks.append(Check("initial loss ~ ln(C)", status, f"{initial:.4g} on {count} examples",
                            f"ln({dataset.num_classes}) = {chance:.4g} within 25%{hint}"))
    else:
        checks.append(Check("initial loss ~ ln(C)", "skip", f"{initial:.4g}", "a softmax cross-entropy loss"))

    checks.append(_overfit_check(cfg, dataset, overfit_examples, overfit_steps, classification))

    strength = cfg.optimizer.weight_decay or 1e-2
    regularised = float(losses.make_loss_fn(state.apply_fn, cfg.train.loss, state.model_state,
                                            weight_decay=strength)(state.params, batch))
    penalty = 0.5 * strength * float(sum(jnp.vdot(p, p) for p in jax.tree.leaves(state.params)))
    ok = regularised > initial and math.isclose(regularised - initial, penalty, rel_tol=1e-3, abs_tol=1e-6)
    checks.append(Check("regularisation raises the loss", "pass" if ok else "fail",
                        f"{initial:.4g} -> {regularised:.4g} with weight decay {strength:g}",
                        f"+½·wd·‖θ‖² = +{penalty:.4g}"))

    with jax.enable_x64(True):
        state64, _, _ = build_state(cfg, dataset)
        small = (jnp.asarray(dataset.train.x[:8], jnp.float64), jnp.asarray(dataset.train.y[:8]))
        loss64 = losses.make_loss_fn(state64.apply_fn, cfg.train.loss, state64.model_state)
        report = gradient_check(loss64, state64.params, small, key=jax.random.PRNGKey(seed))
    status = {"good": "pass", "acceptable": "pass", "suspicious": "warn"}.get(report.verdict, "fail")
    where = f"; worst: {', '.join(report.worst_parameters[:3])}" if report.worst_parameters else ""
    checks.append(Check("gradient check (float64)", status,
                        f"{report.verdict}, max relative error {report.max_relative_error:.1e}{where}",
                        "good (< 1e-7) or acceptable (< 1e-4)"))

    stats = layer_statistics(state, batch, loss=cfg.train.loss)
    health = [flag for flag in stats.flags if "update/weight" not in flag]
    checks.append(Check("activations at init", "fail" if health else "pass",
                        "; ".join(health) or f"{len(stats.activations)} layers: no dead, saturated, vanishing or "
                                                "exploding activations",
                        "healthy activations in every layer"))
    ratios = [g["update_ratio"] for g in stats.gradients if g["update_ratio"] is not None
              and g["name"].endswith("kernel")]
    off = [flag.split(":")[0] for flag in stats.flags if "update/weight" in flag]
    checks.append(Check("first update / weights", "warn" if off else "pass",
                        f"{min(ratios):.1e} to {max(ratios):.1e}" + (f" (off: {', '.join(off)})" if off else "")
                        if ratios else "n/a", "~1e-3 (1e-4 to 1e-2)"))
    return checks


def _overfit_check(cfg, dataset, examples: int, steps: int, classification: bool) -> Check:
    from jaxnn import data as data_lib, optim
    from jaxnn.train.fit import create_train_state, fit
    from jaxnn.train.run import build_model

    examples = min(examples, len(dataset.train))
    tiny_split = data_lib.Split(dataset.train.x[:examples], dataset.train.y[:examples])
    tiny = dataclasses.replace(dataset, train=tiny_split, val=tiny_split)
    tx, schedule = optim.build_optimizer(cfg.optimizer, steps)
    state = create_train_state(build_model(cfg, dataset), tx, dataset.input_shape, jax.random.PRNGKey(cfg.train.seed))
    result = fit(state, tiny, loss=cfg.train.loss, batch_size=examples, num_steps=steps, schedule=schedule,
                 log_every=steps, eval_every=steps, progress=False, nan_guard=False)
    final = result.history[-1]
    if classification:
        accuracy = float(final.get("val_accuracy", float("nan")))
        ok = accuracy == 1.0
        return Check(f"overfits {examples} examples", "pass" if ok else "fail",
                     f"training accuracy {accuracy:.0%} after {steps} full-batch steps (loss "
                     f"{final.get('val_loss', float('nan')):.3g})",
                     "100%" + ("" if ok else ": the model, loss or optimizer cannot learn (lr too low/high?)"))
    first = float(result.history[0].get("loss", np.nan))
    last = float(final.get("val_loss", np.nan))
    ok = last < 0.01 * first
    return Check(f"overfits {examples} examples", "pass" if ok else "fail",
                 f"loss {first:.3g} -> {last:.3g} after {steps} steps", "below 1% of the first step's loss")
