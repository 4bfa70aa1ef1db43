"""Run by test_multihost.py: for each triple RUN_DIR STEP OUT, write the checkpoint tree of RUN_DIR at STEP, restored
onto one device, to OUT.npy (several checkpoints in one process: each start of JAX and orbax costs seconds)."""

import sys

import jax
import numpy as np

from jaxnn.train import load_run

arguments = sys.argv[1:]
assert arguments and len(arguments) % 3 == 0, "usage: _read_checkpoint.py RUN_DIR STEP OUT [RUN_DIR STEP OUT ...]"
for run_dir, step, out in zip(arguments[0::3], arguments[1::3], arguments[2::3]):
    loaded = load_run(run_dir, step=int(step) if step.isdigit() else step, devices=1, optimizer_state=True)
    leaves = jax.tree.leaves(loaded.state.checkpoint_tree())
    np.save(out, np.concatenate([np.ravel(np.asarray(leaf)).astype(np.float64) for leaf in leaves]))
