"""TrainState: everything a step reads and writes, one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxnn.runtime import quick_jit


@flax.struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params``, ``model_state`` (e.g. ``{'batch_stats': ...}``), ``opt_state``,
    ``rng`` (raw uint32 PRNG key, for dropout). ``apply_fn`` and ``tx`` are static (not checkpointed)."""

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    input_shape: tuple | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, apply_fn, params, model_state, tx, rng) -> "TrainState":
        # One compiled call (not one per leaf), returning fresh buffers for every leaf: some optimizers' init
        # (optax.lbfgs) reuses one array in several places, which the donating train step would donate twice.
        opt_state = quick_jit(lambda p: jax.tree.map(lambda a: jnp.array(a, copy=True), tx.init(p)))(params)
        return cls(step=jnp.asarray(0, jnp.int32), params=params, model_state=dict(model_state or {}),
                   opt_state=opt_state, rng=jnp.asarray(rng), apply_fn=apply_fn, tx=tx)

    def checkpoint_tree(self) -> dict:
        """The arrays a checkpoint holds."""
        return {"step": self.step, "params": self.params, "model_state": self.model_state,
                "opt_state": self.opt_state, "rng": self.rng}

    def replace_from_checkpoint(self, tree: dict) -> "TrainState":
        return self.replace(step=tree["step"], params=tree["params"], model_state=tree["model_state"],
                            opt_state=tree["opt_state"], rng=tree["rng"])
