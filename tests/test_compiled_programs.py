"""A process that compiles many programs: XLA:CPU keeps each cached program's machine code mapped into the process
(several memory mappings per program), and past Linux's vm.max_map_count (65,530 by default) the next compilation
crashes inside XLA (JAX issue #27201). Run in one process, the suite reached 25,089 mappings with the root conftest
releasing compiled programs after each module, and crashed after ~500 tests without it. These tests measure the
mechanism in a fresh process and check that jaxnn's long drivers release what they compiled."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

MAPS_PROBE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp

    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    def loss(ws, x):
        for w in ws:
            x = jnp.tanh(x @ w) + 0.1 * jnp.sin(x @ w)
        return jnp.mean(x ** 2)

    def compile_one(width):  # a program with several fusions, as a training step has
        ws = [jnp.full((width, width), 0.1) for _ in range(6)]
        jax.block_until_ready(jax.jit(jax.grad(loss))(ws, jnp.ones((2, width))))

    n, batch = int(sys.argv[1]), int(sys.argv[2])
    jax.clear_caches()
    start = mappings()
    for i in range(n):
        compile_one(4 + i)
    kept = mappings()
    jax.clear_caches()
    released = mappings()
    peak = released
    for i in range(n):
        compile_one(4 + n + i)
        peak = max(peak, mappings())
        if i % batch == batch - 1:
            jax.clear_caches()
    print(json.dumps({"start": start, "kept": kept, "released": released, "peak": peak}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory mappings")
def test_cached_programs_hold_mappings_and_releasing_them_bounds_a_long_process():
    """Compiling N distinct programs and keeping them cached grows the mappings by several per program; releasing them
    (jax.clear_caches) returns the count to where it started; compiling N more with a release every few programs
    keeps the peak to a batch's worth."""
    n, batch = 24, 6
    out = subprocess.run([sys.executable, "-c", MAPS_PROBE, str(n), str(batch)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    grown = counts["kept"] - counts["start"]
    assert grown >= 3 * n, counts  # the mechanism: cached programs hold mappings (measured: ~11 per program)
    assert counts["released"] - counts["start"] < 0.4 * grown, counts  # clear_caches returns most (measured: 73 %)
    assert counts["peak"] - counts["released"] < 0.5 * grown, counts  # a batch's worth, not all n programs


def test_an_experiment_run_releases_the_programs_it_compiled(tmp_path):
    """run_experiment empties the jit caches when the experiment ends (programs under long-lived functions, such as
    a module-level jit, would otherwise stay mapped for the rest of a notebook's or script's life)."""
    import jax
    import jax.numpy as jnp

    from jaxnn.experiments import run_experiment

    long_lived = jax.jit(lambda x: 2 * x)
    long_lived(jnp.ones(3))
    assert long_lived._cache_size() == 1
    run_experiment("losses", smoke=True, out_dir=tmp_path, progress=False)
    assert long_lived._cache_size() == 0
