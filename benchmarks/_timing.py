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
