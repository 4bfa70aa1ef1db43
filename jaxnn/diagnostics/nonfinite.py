"""Where a NaN/Inf comes from: the layer and the operation that first produced it.

    report = find_nonfinite(state, batch)     # the state before the step that went non-finite, and its batch
    print(report)

Three looks at one training step, each naming something:

* the forward pass with every module intercepted (``flax.linen.intercept_methods``): the first module, in the
  order the calls return (innermost first), whose output holds a NaN/Inf while its inputs do not — and the
  parameter arrays that were non-finite already;
* ``jax.experimental.checkify`` with NaN and division checks on the loss and on its gradient: the first primitive
  that generated a NaN and the source line that called it;
* the gradient and the optimizer's update, leaf by leaf: which parameters would receive non-finite values.

When the NaN guard of a config-driven run stops training, the run is replayed from its last checkpoint to the
step before, and this report is appended to the error (``jaxnn train`` prints it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


@dataclasses.dataclass
class NonFiniteReport:
    """``first_layer``: the module whose output first went non-finite (None if the forward pass is finite);
    ``forward_error`` / ``gradient_error``: checkify's message for the loss / its gradient (None if clean);
    ``bad_params`` / ``bad_gradients`` / ``bad_updates``: parameter paths holding non-finite values."""

    loss: float
    first_layer: str | None
    forward_error: str | None
    gradient_error: str | None
    bad_params: list[str]
    bad_gradients: list[str]
    bad_updates: list[str]
    step: int | None = None

    @property
    def clean(self) -> bool:
        return (self.first_layer is None and self.forward_error is None and self.gradient_error is None
                and not (self.bad_params or self.bad_gradients or self.bad_updates) and np.isfinite(self.loss))

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        if self.clean:
            return f"non-finite hunt{at}: the loss, its gradient and the update are finite on this batch"
        lines = [f"non-finite hunt{at}: loss {self.loss}"]
        if self.bad_params:
            lines.append(f"  parameters already non-finite before the step: {', '.join(self.bad_params[:6])}")
        if self.first_layer is not None:
            lines.append(f"  first layer whose output is non-finite (its inputs finite): {self.first_layer}")
        if self.forward_error:
            lines.append(f"  forward: {self.forward_error}")
        if self.gradient_error:
            lines.append(f"  backward: {self.gradient_error}")
        if self.bad_gradients:
            lines.append(f"  non-finite gradients: {', '.join(self.bad_gradients[:6])}")
        if self.bad_updates:
            lines.append(f"  non-finite updates: {', '.join(self.bad_updates[:6])}")
        return "\n".join(lines)


def _path_names(tree: Any, bad: Any) -> list[str]:
    return ["/".join(str(getattr(key, "key", key)) for key in path)
            for (path, _), flag in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(bad)) if flag]


def _nonfinite(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: ~jnp.all(jnp.isfinite(leaf)), tree)


def _first_nonfinite_layer(apply_fn, variables, x) -> str | None:
    """Run the model eagerly (a one-off diagnosis) with every module call intercepted; the first call to return
    (innermost first) with non-finite output from finite inputs."""
    found: list[str] = []

    def finite(tree) -> bool:
        return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree)
                   if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact))

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if not found and context.method_name == "__call__" and finite((args, kwargs)) and not finite(out):
            found.append("/".join(context.module.path) or type(context.module).__name__)
        return out

    with nn.intercept_methods(interceptor):
        apply_fn(variables, x, train=False)
    return found[0] if found else None


def _checkify_message(fn, *args) -> str | None:
    """checkify's first NaN / division error of ``fn(*args)``: the primitive and the innermost calling line outside
    jax, flax and optax (e.g. the loss function's line), or None when there is none."""
    error, _ = jax.jit(checkify.checkify(fn, errors=checkify.float_checks))(*args)
    exception = error.get_exception()
    if exception is None:
        return None
    message = str(exception).strip().rstrip(".")
    frames = [line.strip() for line in str(getattr(exception, "traceback_info", "") or "").splitlines()]
    library = ("/jax/", "/jaxlib/", "/flax/", "/optax/", "/checkify.py")
    user = [frame for frame in frames if frame and not any(part in frame for part in library)]
    return f"{message}, in {user[0]}" if user else message


def find_nonfinite(state: Any, batch: Any, *, loss: Any = "softmax_cross_entropy",
                   step: int | None = None) -> NonFiniteReport:
    """Hunt the first NaN/Inf of one training step of ``state`` on ``batch`` = (x, y) (see the module docstring)."""
    from jaxnn.losses import make_loss_fn

    x, y = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    loss_fn = make_loss_fn(state.apply_fn, loss, state.model_state)
    value = float(loss_fn(state.params, (x, y)))
    bad_params = _path_names(state.params, jax.device_get(_nonfinite(state.params)))
    first_layer = _first_nonfinite_layer(state.apply_fn, {"params": state.params, **state.model_state}, x)
    forward_error = _checkify_message(loss_fn, state.params, (x, y))
    gradient_error = _checkify_message(jax.grad(loss_fn), state.params, (x, y))
    grads = jax.grad(loss_fn)(state.params, (x, y))
    bad_gradients = _path_names(state.params, jax.device_get(_nonfinite(grads)))
    bad_updates: list[str] = []
    try:
        updates, _ = state.tx.update(grads, state.opt_state, state.params)
        bad_updates = _path_names(state.params, jax.device_get(_nonfinite(updates)))
    except TypeError:  # an optimizer whose update needs more than the gradient (a line search)
        pass
    return NonFiniteReport(loss=value, first_layer=first_layer, forward_error=forward_error,
                           gradient_error=gradient_error, bad_params=bad_params, bad_gradients=bad_gradients,
                           bad_updates=bad_updates, step=step)
