"""What ``fit(run_dir=...)`` leaves beside ``metrics.jsonl`` so that a script's run folder is one the CLI and
:func:`jaxnn.train.load_run` read like a config's: the final state as a checkpoint, ``config.yaml`` naming the
data, the model and the loss (when they are jaxnn's registered ones, by name), and ``fit.json`` recording what
config.yaml could not: the optimizer (an optax chain is not a name; analysis restores parameters without it), a
fingerprint of the training data (load_run checks that config.yaml rebuilds the same data), or why no config.yaml
was written (a model not built by ``models.get_model``, data not from ``data.load_dataset``, a loss function).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Callable

import numpy as np

from jaxnn import config as config_lib
from jaxnn import data as data_lib
from jaxnn import models

RECORD = "fit.json"


def data_fingerprint(split: data_lib.Split) -> str:
    """SHA-256 of a split's inputs and targets (shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for array in (split.x, split.y):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fit_config(apply_fn: Callable, dataset: data_lib.Dataset, loss: Any, *, batch_size: int, num_steps: int,
               seed: int, run_dir: pathlib.Path) -> tuple[config_lib.Config | None, list[str]]:
    """The config that rebuilds a fit's data, model and loss by name, or None and the reasons it cannot."""
    reasons = []
    spec = models.registry_spec(getattr(apply_fn, "__self__", None))
    if spec is None:
        owner = getattr(apply_fn, "__self__", apply_fn)
        reasons.append(f"the model ({type(owner).__name__}) was not built by jaxnn.models.get_model(name, ...), so "
                       "its name and settings are unknown")
    info = dataset.info
    split = info.get("split")
    if info.get("name") != dataset.name or not isinstance(split, dict):
        reasons.append(f"the data ({dataset.name!r}) was not loaded by jaxnn.data.load_dataset(name, ...)")
    elif info.get("dtype", "float32") != "float32":
        reasons.append(f"the data were loaded as {info['dtype']} (dtype=), which a config does not hold")
    if not isinstance(loss, str):
        reasons.append(f"the loss is a function ({getattr(loss, '__name__', type(loss).__name__)}), not a "
                       "registered loss name")
    if reasons:
        return None, reasons
    values = {
        "name": run_dir.name,  # `jaxnn train` of this config writes a fresh runs/NAME/version_N, not into here
        "data": {"name": dataset.name, "data_dir": str(pathlib.Path(info["directory"]).absolute())
                 if info.get("directory") else None, "seed": info["seed"],
                 "val_fraction": split["val_fraction"],
                 "test_fraction": split["test_fraction"] if split["test_fraction"] is not None else 0.2,
                 "standardize": bool((info.get("standardization") or {}).get("applied", False)),
                 "limit": split["limit"],
                 "kwargs": dict(info.get("options", {}))},
        "model": {"name": spec[0], "kwargs": spec[1]},
        "train": {"loss": loss, "batch_size": batch_size, "steps": num_steps, "seed": seed},
    }
    try:
        json.dumps(values)  # model settings such as a function have no name a config can hold
        return config_lib.validate(values), []
    except (TypeError, ValueError) as error:
        return None, [f"its settings do not make a valid config ({error})"]


def write_fit_record(run_dir: pathlib.Path, apply_fn: Callable, dataset: data_lib.Dataset, loss: Any, *,
                     batch_size: int, num_steps: int, seed: int) -> None:
    """config.yaml and fit.json (see the module docstring), replacing any earlier ones: fit saves its state into
    a folder that holds no checkpoint, so what was there described no saved state."""
    (run_dir / "config.yaml").unlink(missing_ok=True)
    cfg, reasons = fit_config(apply_fn, dataset, loss, batch_size=batch_size, num_steps=num_steps, seed=seed,
                              run_dir=run_dir)
    record = {"written_by": "jaxnn.train.fit", "config": cfg is not None, "why_no_config": reasons,
              "optimizer": "not recorded (an optax chain); analysis restores the parameters and model state only",
              "train_data_sha256": data_fingerprint(dataset.train)}
    if cfg is not None:
        config_lib.save_config(cfg, run_dir / "config.yaml")
    (run_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_fit_record(run_dir: pathlib.Path) -> dict | None:
    path = pathlib.Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.exists() else None
