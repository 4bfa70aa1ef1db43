"""Run by test_multihost.py: write the checkpoint tree of RUN_DIR at STEP, restored onto one device, to OUT.npy."""

import sys

import jax
import numpy as np

from jaxnn.train import load_run

run_dir, step, out = sys.argv[1], sys.argv[2], sys.argv[3]
loaded = load_run(run_dir, step=int(step) if step.isdigit() else step, devices=1)
leaves = jax.tree.leaves(loaded.state.checkpoint_tree())
np.save(out, np.concatenate([np.ravel(np.asarray(leaf)).astype(np.float64) for leaf in leaves]))
