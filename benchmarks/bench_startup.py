"""Start-up and end-to-end wall times of the ``jaxnn`` command, each in fresh processes (best of ``--repeats``).

1. ``jaxnn --help`` and ``import jaxnn`` (the whole API) against a bare ``import jax`` and ``import jax, flax, optax``.
   Goals: help < 0.5 s; the API <= jax + flax + optax + 0.3 s.
2. ``jaxnn run`` (the main job with the full curvature + landscape report) with a cold persistent compilation cache
   (a new, empty cache folder) and a warm one (the folder a previous run filled), and ``--no-compile-cache``.
   Goals: cold <= 15 s, warm <= 10 s.
3. ``jaxnn curvature RUN_DIR`` twice on the same run with a fresh cache: the second run reads the compiled programs
   the first one wrote. Goal: second <= 40% of the first.

    python benchmarks/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def seconds(argv: list[str], env: dict, cwd: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def best(argv: list[str], env: dict, cwd: str, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        times.append(seconds(argv, env, cwd))
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    py = sys.executable
    work = tempfile.mkdtemp(prefix="jaxnn-bench-")
    # As a user has it: bytecode cached (with PYTHONDONTWRITEBYTECODE every process recompiles jaxnn's sources, ~0.4 s
    # of the import after an edit), no XLA flags of the caller's.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONDONTWRITEBYTECODE")}
    cache = os.path.join(work, "cache")
    env["JAXNN_CACHE_DIR"] = cache
    api = ("import jaxnn, jaxnn.train, jaxnn.curvature, jaxnn.landscape, jaxnn.data, jaxnn.models, jaxnn.analysis, "
           "jaxnn.config, jaxnn.optim, jaxnn.losses, jaxnn.parallel, jaxnn.plotting")
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores; best of {args.repeats} fresh processes")
        t_jax = best([py, "-c", "import jax"], env, work, args.repeats)
        t_jfo = best([py, "-c", "import jax, flax, flax.linen, optax"], env, work, args.repeats)
        t_api = best([py, "-c", api], env, work, args.repeats)
        t_help = best([py, "-m", "jaxnn.cli", "--help"], env, work, args.repeats)
        print("\n1. start-up")
        print(f"  import jax                 {t_jax:6.2f} s")
        print(f"  import jax, flax, optax    {t_jfo:6.2f} s")
        print(f"  import jaxnn (whole API)   {t_api:6.2f} s   = jax+flax+optax {t_api - t_jfo:+.2f} s (goal <= +0.3 s)")
        print(f"  jaxnn --help               {t_help:6.2f} s   ratio to import jax {t_help / t_jax:.2f} (goal < 0.5 s)")

        run = [py, "-m", "jaxnn.cli", "run", "--set", "train.progress=false", "--run-dir", os.path.join(work, "run")]
        fresh = lambda: (shutil.rmtree(os.path.join(work, "run"), ignore_errors=True),
                         shutil.rmtree(cache, ignore_errors=True))
        t_cold = best(run, env, work, args.repeats, before=fresh)
        warm_only = lambda: shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
        t_warm = best(run, env, work, args.repeats, before=warm_only)
        t_none = best(run + ["--no-compile-cache"], env, work, 1, before=warm_only)
        print("\n2. jaxnn run (digits MLP, 475 steps, curvature report with density, 21x21 landscape, all figures)")
        print(f"  cold compilation cache     {t_cold:6.2f} s   (goal <= 15 s)")
        print(f"  warm compilation cache     {t_warm:6.2f} s   (goal <= 10 s)")
        print(f"  --no-compile-cache         {t_none:6.2f} s")

        curvature = [py, "-m", "jaxnn.cli", "curvature", os.path.join(work, "run"), "--density"]
        firsts, seconds_ = [], []
        for _ in range(args.repeats):
            shutil.rmtree(cache, ignore_errors=True)
            firsts.append(seconds(curvature, env, work))
            seconds_.append(seconds(curvature, env, work))
        first, second = min(firsts), min(seconds_)
        print("\n3. jaxnn curvature RUN_DIR --density, same run twice, fresh cache before the first")
        print(f"  first {first:6.2f} s, second {second:6.2f} s, ratio {second / first:.2f} (goal <= 0.40)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
