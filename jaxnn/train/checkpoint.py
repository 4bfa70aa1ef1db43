"""Checkpoints with orbax: keep the last k plus the best, saved atomically, restored with clear errors.

Orbax writes each step into a temporary folder and renames it into place when complete, so a run killed
mid-save leaves the previous checkpoints intact and no half-written one visible. This module never deletes
or overwrites a checkpoint it cannot read. orbax is imported when a Checkpointer is made, not with this module.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from jaxnn.runtime import read_only_notices_dropped


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model it is restored into."""


class Checkpointer:
    """``save(step, tree, metrics)`` / ``restore(template, step=None)`` over an orbax CheckpointManager."""

    def __init__(self, directory: str | pathlib.Path, *, keep_last: int = 3, keep_best: bool = True,
                 best_metric: str = "val_loss", best_mode: str = "min", read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as ocp_managers

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.best_metric = best_metric
        policies = [ocp_managers.LatestN(n=keep_last)]
        if keep_best:
            # BestN keeps the last n of the checkpoints sorted by the metric (checked on orbax 0.12.8):
            # reverse=True sorts descending, so the smallest value survives.
            policies.append(ocp_managers.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                               n=1, keep_checkpoints_without_metrics=False))
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint folder at {self.directory}")
        # Registering the handler up front lets a fresh process read metadata before any save or restore.
        with read_only_notices_dropped():
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
                best_fn=(lambda m: m[best_metric]) if keep_best else None, best_mode=best_mode,
                enable_async_checkpointing=False, create=not read_only, read_only=read_only)
            self.manager = _unless_corrupt(self.directory, lambda: ocp.CheckpointManager(
                self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()))

    def all_steps(self) -> list[int]:
        return sorted(_unless_corrupt(self.directory, self.manager.all_steps))

    def latest_step(self) -> int | None:
        return _unless_corrupt(self.directory, self.manager.latest_step)

    def best_step(self) -> int | None:
        return _unless_corrupt(self.directory, self.manager.best_step)

    def save(self, step: int, tree: Any, metrics: dict | None = None) -> None:
        """Save ``tree`` (arrays only) as ``step``; refuses non-finite values so a NaN never replaces good state."""
        bad = [jax.tree_util.keystr(path) for (path, _), count in zip(jax.tree_util.tree_leaves_with_path(tree),
                                                                       _nonfinite_counts(tree)) if count]
        if bad:
            raise CheckpointError(f"refusing to checkpoint step {step}: non-finite values in {', '.join(bad[:5])}")
        if step in self.manager.all_steps():
            raise CheckpointError(f"checkpoint for step {step} already exists in {self.directory}; not overwriting it")
        self.manager.save(step, args=self._ocp.args.StandardSave(tree),
                          metrics={k: float(v) for k, v in (metrics or {}).items()} or None)
        self.manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None, partial: bool = False) -> Any:
        """Restore into the structure, shapes, dtypes and shardings of ``template`` (arrays, or ShapeDtypeStructs
        with shardings), whatever devices the checkpoint was saved from; clear errors otherwise. ``partial``: the
        template (a dict) names only some of the saved tree's top-level entries (e.g. ``params`` and
        ``model_state`` without the ``opt_state`` of an optimizer the reader does not know); only those return."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        path = self.directory / str(step)
        try:
            saved = self.manager.item_metadata(step)
        except Exception as exc:  # noqa: BLE001 - orbax raises many types for unreadable metadata
            raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template)
        if partial:
            tree = getattr(saved, "tree", saved)
            missing = sorted(set(abstract) - set(tree or {}))
            if missing:
                raise CheckpointError(f"checkpoint {path} does not match this model: it holds no {missing}")
            _check_compatible({key: tree[key] for key in abstract}, abstract, path)
            # The entries not asked for are read into host memory (this process's CPU device) and dropped
            # (StandardRestore in orbax 0.12.8 takes no placeholder for an entry it should skip).
            here = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
            rest = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), value,
                                      is_leaf=lambda m: hasattr(m, "shape"))
                    for key, value in tree.items() if key not in abstract}
            wanted, abstract = set(abstract), {**rest, **abstract}
        else:
            _check_compatible(saved, template, path)
        try:
            restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is corrupt or incompatible with this model: {exc}") from exc
        return {key: restored[key] for key in wanted} if partial else restored

    def close(self) -> None:
        self.manager.close()


def _nonfinite_counts(tree: Any) -> list[int]:
    """NaN/inf entries per leaf; for arrays spread over processes a compiled count (the same answer everywhere, so
    every process refuses, or saves, together)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(leaf, "is_fully_addressable", True) for leaf in leaves):
        return [int(np.count_nonzero(~np.isfinite(np.asarray(leaf)))) if np.issubdtype(np.asarray(leaf).dtype,
                                                                                          np.inexact) else 0
                for leaf in leaves]
    import jax.numpy as jnp
    from jaxnn.parallel import to_host

    counts = jax.jit(lambda ls: [jnp.sum(~jnp.isfinite(l)) if jnp.issubdtype(l.dtype, jnp.inexact) else jnp.int32(0)
                                 for l in ls])(leaves)
    return [int(c) for c in to_host(counts)]


def _unless_corrupt(directory: pathlib.Path, fn):
    """Run an orbax call; any failure to read what is on disk becomes a CheckpointError naming the folder."""
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - orbax raises json, OSError, ValueError... for unreadable files
        raise CheckpointError(f"checkpoints in {directory} are corrupt or unreadable "
                              f"({type(exc).__name__}: {exc}); they were left untouched") from exc


def _check_compatible(saved_metadata: Any, template: Any, path: pathlib.Path) -> None:
    """Compare the saved tree's structure and shapes with the template's, naming the first difference."""
    if saved_metadata is None:
        raise CheckpointError(f"checkpoint {path} has no readable metadata (corrupt or not a jaxnn checkpoint)")
    saved_metadata = getattr(saved_metadata, "tree", saved_metadata)
    saved = {_path_name(p): leaf for p, leaf in
             jax.tree_util.tree_leaves_with_path(saved_metadata, is_leaf=lambda x: hasattr(x, "shape"))}
    wanted = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(template)}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match this model: missing {missing[:5]}, unexpected {extra[:5]} "
            "(different model, optimizer or config?)")
    for key, leaf in wanted.items():
        got = tuple(getattr(saved[key], "shape", ()) or ())
        want = tuple(np.shape(leaf))
        if got != want:
            raise CheckpointError(f"checkpoint {path} does not match this model: {key} has shape {got}, "
                                  f"the model expects {want}")


def _path_name(path) -> str:
    """'opt_state/1/count' for both a namedtuple attribute and the dict key orbax's metadata stores it as."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)
