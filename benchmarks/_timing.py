"""The benchmarks' one timer: compile time and steady state reported apart."""

from __future__ import annotations

import time


def timed(fn, repeats: int = 3):
    """(first call incl. compilation, median of ``repeats`` warm calls, in seconds; the last call's value)."""
    import jax
    import numpy as np

    started = time.perf_counter()
    value = jax.block_until_ready(fn())
    first = time.perf_counter() - started
    warm = []
    for _ in range(repeats):
        started = time.perf_counter()
        value = jax.block_until_ready(fn())
        warm.append(time.perf_counter() - started)
    return first, float(np.median(warm)), value


def interleaved(fns: dict, repeats: int = 15) -> dict:
    """{name: median warm seconds} of already-compiled ``fns`` called in turn, round after round, in a fresh random
    order each round: on a noisy machine a slow spell then hits every side alike instead of whichever ran during it,
    and no side always runs right after the same other one (a program that follows LAPACK's eigendecompositions ran
    up to 1.5x slower here)."""
    import jax
    import numpy as np

    names = list(fns)
    times: dict = {name: [] for name in names}
    order = np.random.default_rng(0)
    for _ in range(repeats):
        for index in order.permutation(len(names)):
            started = time.perf_counter()
            jax.block_until_ready(fns[names[index]]())
            times[names[index]].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in times.items()}
