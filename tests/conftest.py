"""Shared test fixtures. float32 is the default; tests comparing to exact answers use the ``x64`` fixture.

The persistent compilation cache is isolated: every process the suite starts uses a fresh folder of this session
(never the developer's ~/.cache/jaxnn/xla), and a test that turns the cache on in this process (the CLI called
in-process does) has it turned off again afterwards, so later tests compile instead of reading entries that
other processes of the suite may be writing at the same time (a CI run segfaulted in the cache reader)."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

os.environ["JAXNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxnn-test-xla-")
# Data sets that are not embedded (MNIST) are read from the repository's neighbour ../shared/data, as the experiments
# and the library read $JAXNN_DATA/<name>; a developer's own JAXNN_DATA wins.
_SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                            "data")
if os.path.isdir(_SHARED_DATA):
    os.environ.setdefault("JAXNN_DATA", _SHARED_DATA)
atexit.register(shutil.rmtree, os.environ["JAXNN_CACHE_DIR"], ignore_errors=True)

# XLA:CPU's backend (LLVM) optimisation level 0 in this process and the processes it starts with its environment:
# most of the suite's time is compiling programs that then run for milliseconds. Measured on 2 cores, back to back:
# the subpackage tests 438 -> 368 s, tests/test_*.py's experiments 362 -> 298 s; results agree to rounding (every
# comparison there has a tolerance). The bit-identity checks of tests/train that matter most (resume after SIGKILL,
# 8 devices, 2 processes) start their processes without these flags, at XLA's default level, as users run; its
# in-process checks compare programs compiled at the same level on both sides.
# One OpenBLAS thread for numpy's and scipy's LAPACK (the dense eigendecompositions and solves that are the oracles of
# many tests), here and in the processes the suite starts. On 2 cores shared with XLA's own threads (and other
# processes) OpenBLAS's spinning threads made one float64 eigvalsh of a 1,482 x 1,482 Hessian take 0.3-6 s; with one
# thread it takes 0.19 s every time. Only the thread count changes: the same LAPACK routines, the same checks. numpy
# is already imported when this file runs (a pytest plugin imports it), so its library is limited at run time too.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
try:
    import threadpoolctl

    threadpoolctl.threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")
except ImportError:  # threadpoolctl comes with scikit-learn (a test extra); without it only the speed differs
    pass

os.environ["JAXNN_TEST_XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = (os.environ["JAXNN_TEST_XLA_FLAGS"] + " --xla_backend_optimization_level=0").strip()


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _no_compilation_cache_after_the_test():
    yield
    if jax.config.jax_compilation_cache_dir is not None:
        from jaxnn.runtime import disable_compilation_cache

        disable_compilation_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_after_the_module():
    """Release every compiled program after each test module (``jax.clear_caches()``). XLA:CPU maps each compiled
    program's code into the process (LLVM's JIT: several memory mappings per program, never returned while the
    program is cached); the whole suite in one process compiles enough programs to pass Linux's default
    vm.max_map_count of 65,530 mappings, and the next compilation then crashes inside XLA (JAX issue #27201).
    Measured: tests/curvature alone grew the mappings from 1,482 to 22,566 without this."""
    yield
    jax.clear_caches()
