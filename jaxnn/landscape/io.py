"""Surfaces to and from ``.npz``: the grid, every metric, the directions' descriptions and the non-finite counts.

Layout (``format = "jaxnn.landscape/1"``; ``<name>`` is the key given in ``surfaces``):

    <name>.kind            'line' | 'interpolation' | 'plane'
    <name>.alphas          (A,)
    <name>.betas           (B,)            planes only
    <name>.metric.<m>      (A,) or (A, B)  NaN where the value was not finite
    <name>.meta            JSON: directions, nonfinite_counts, num_examples, num_batches, timing
    trajectory.alphas / trajectory.betas   optional projected trajectory
    metadata               optional JSON of anything else (a report's configuration)

Everything is loadable with ``numpy.load(path)`` (no pickles).
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from jaxnn.landscape.surfaces import Surface

FORMAT = "jaxnn.landscape/1"


def _npz_path(path: Any) -> str:
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"path: expected a file name ending in .npz, got {path!r}")
    return path


def save_surfaces(path: Any, surfaces: Mapping[str, Surface], *, trajectory: tuple[Any, Any] | None = None,
                  metadata: Mapping[str, Any] | None = None) -> str:
    """Write several named surfaces (and optionally a projected trajectory ``(alphas, betas)``) to one ``.npz``."""
    path = _npz_path(path)
    if not surfaces:
        raise ValueError("surfaces: expected at least one surface, got none")
    arrays: dict[str, np.ndarray] = {"format": np.asarray(FORMAT)}
    for name, surface in surfaces.items():
        if not isinstance(surface, Surface):
            raise TypeError(f"surfaces[{name!r}]: expected a Surface, got {type(surface).__name__}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"surfaces: expected names that are identifiers, got {name!r}")
        arrays[f"{name}.kind"] = np.asarray(surface.kind)
        arrays[f"{name}.alphas"] = np.asarray(surface.alphas)
        if surface.betas is not None:
            arrays[f"{name}.betas"] = np.asarray(surface.betas)
        for metric, values in surface.metrics.items():
            arrays[f"{name}.metric.{metric}"] = np.asarray(values)
        meta = {
            "directions": [dict(d) for d in surface.directions],
            "nonfinite_counts": {k: int(v) for k, v in surface.nonfinite_counts.items()},
            "num_examples": int(surface.num_examples),
            "num_batches": int(surface.num_batches),
            "timing": {k: float(v) for k, v in surface.timing.items()},
        }
        arrays[f"{name}.meta"] = np.asarray(json.dumps(meta))
    if trajectory is not None:
        alphas, betas = (np.asarray(v, dtype=np.float64) for v in trajectory)
        if alphas.shape != betas.shape or alphas.ndim != 1:
            raise ValueError(
                f"trajectory: expected (alphas, betas) of equal 1-D shape, got {alphas.shape} and {betas.shape}")
        arrays["trajectory.alphas"], arrays["trajectory.betas"] = alphas, betas
    if metadata is not None:
        arrays["metadata"] = np.asarray(json.dumps(dict(metadata)))
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    np.savez(path, **arrays)
    return path


def save_surface(path: Any, surface: Surface, *, trajectory: tuple[Any, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> str:
    """Write one surface (key ``surface``) to ``path`` (``.npz``); see :func:`save_surfaces`."""
    return save_surfaces(path, {"surface": surface}, trajectory=trajectory, metadata=metadata)


def load_surfaces(path: Any) -> tuple[dict[str, Surface], dict[str, Any]]:
    """Read a file written by :func:`save_surfaces`: ``({name: Surface}, {"trajectory": (α, β) | None, "metadata"})``.

    A missing file is a ``FileNotFoundError``; a file that is not such an ``.npz`` is a ``ValueError`` naming it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no surface file at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(
            f"path: {path!r} is not a readable .npz surface file ({type(error).__name__}: {error})") from error
    if "format" not in contents or str(contents["format"]) != FORMAT:
        found = str(contents["format"]) if "format" in contents else "no 'format' entry"
        raise ValueError(f"path: {path!r} expected format {FORMAT!r}, got {found}")
    names = sorted({key[: -len(".kind")] for key in contents if key.endswith(".kind")})
    surfaces = {}
    for name in names:
        try:
            meta = json.loads(str(contents[f"{name}.meta"]))
            prefix = f"{name}.metric."
            metrics = {key[len(prefix):]: contents[key] for key in contents if key.startswith(prefix)}
            surfaces[name] = Surface(
                kind=str(contents[f"{name}.kind"]),
                alphas=contents[f"{name}.alphas"],
                betas=contents.get(f"{name}.betas"),
                metrics=metrics,
                nonfinite_counts=dict(meta["nonfinite_counts"]),
                directions=tuple(meta["directions"]),
                num_examples=int(meta["num_examples"]),
                num_batches=int(meta["num_batches"]),
                timing=dict(meta["timing"]),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(
                f"path: {path!r} surface {name!r} is incomplete or corrupt ({type(error).__name__}: {error})"
            ) from error
    trajectory = None
    if "trajectory.alphas" in contents:
        trajectory = (contents["trajectory.alphas"], contents["trajectory.betas"])
    metadata = json.loads(str(contents["metadata"])) if "metadata" in contents else None
    return surfaces, {"trajectory": trajectory, "metadata": metadata}


def load_surface(path: Any) -> Surface:
    """Read the single surface written by :func:`save_surface` (or the only surface of a file)."""
    surfaces, _ = load_surfaces(path)
    if len(surfaces) != 1:
        raise ValueError(f"path: {os.fspath(path)!r} expected one surface, got {sorted(surfaces)}; use load_surfaces")
    return next(iter(surfaces.values()))
