"""Process-wide runtime settings: the persistent compilation cache, simulated CPU devices, quiet library logs.

These act on the whole process and most must happen before jax initialises its backend, which is why the ``jaxnn``
command applies them right after parsing its arguments and before importing anything heavy.

    jaxnn.enable_compilation_cache()          # compiled programs reused across processes (~/.cache/jaxnn/xla)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Mapping

CACHE_ENV = "JAXNN_CACHE_DIR"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"


def default_cache_dir() -> pathlib.Path:
    """``$JAXNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxnn/xla``, else ``~/.cache/jaxnn/xla``."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxnn" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 0.0) -> str:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`default_cache_dir`); returns the path.

    Every program that took at least ``min_compile_seconds`` to compile (default: all of them) is written there
    and read back by later processes instead of being compiled again: the second ``jaxnn curvature`` of a run, a
    rerun of a script, every test subprocess. Entries are keyed on the program, the jax/XLA versions and the
    devices, so a stale entry is never used. Safe to call more than once; a different path replaces the previous
    one. The cache is trusted code: keep it in a folder only you can write.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    folder = pathlib.Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"compilation cache: cannot create {folder} ({error}); set {CACHE_ENV} to a writable folder "
                      "or disable the cache (--no-compile-cache)") from None
    current = jax.config.jax_compilation_cache_dir
    if current is not None and os.path.abspath(current) != os.path.abspath(folder):
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold
    return str(folder)


def disable_compilation_cache() -> None:
    """Stop reading and writing the persistent compilation cache in this process."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir is not None:
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", None)


def jax_backend_started() -> bool:
    """Whether jax has created its devices already (after which XLA_FLAGS changes have no effect)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def simulated_device_flags(xla_flags: str, count: int) -> str:
    """``xla_flags`` with the CPU platform set to ``count`` devices. With more than one, Eigen's intra-op threads are
    turned off (``--xla_cpu_multi_thread_eigen=false``): the devices give the parallelism, and a device whose matrix
    product waits for pool threads that other devices hold in a collective's rendezvous deadlocks XLA:CPU
    (reproduced with 8 simulated devices on 2 cores)."""
    flags = [flag for flag in xla_flags.split()
             if not flag.startswith((f"{_DEVICE_FLAG}=", f"{_EIGEN_FLAG}="))]
    flags.append(f"{_DEVICE_FLAG}={count}")
    if count > 1:
        flags.append(f"{_EIGEN_FLAG}=false")
    return " ".join(flags)


ASYNC_DISPATCH_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"


def simulated_device_environment(environment: Mapping[str, str], count: int) -> dict[str, str]:
    """A copy of ``environment`` (e.g. ``os.environ``) for a process that should see ``count`` simulated CPU devices:
    ``XLA_FLAGS`` from :func:`simulated_device_flags`, and with more than one device CPU async dispatch off
    (``JAX_CPU_ENABLE_ASYNC_DISPATCH=false``, unless the caller set it). With async dispatch, XLA:CPU can start a
    collective program on seven devices while the eighth's launch waits for an in-flight slot that an earlier,
    queued program holds; the seven then wait 40 s in the rendezvous and abort the process (reproduced in about
    one run in three of ``jaxnn curvature --devices 8`` on 2 cores; 0 in 10 with dispatch synchronous, same speed)."""
    result = dict(environment)
    result["XLA_FLAGS"] = simulated_device_flags(result.get("XLA_FLAGS", ""), count)
    if count > 1:
        result.setdefault(ASYNC_DISPATCH_ENV, "false")
    return result


def simulate_cpu_devices(count: int) -> None:
    """Make the CPU platform expose ``count`` devices (``--xla_force_host_platform_device_count``; see
    :func:`simulated_device_flags`).

    Must run before jax starts its backend; accelerators are unaffected (their devices are real). Raises
    ``RuntimeError`` when the backend already runs with a different count, since the flag would be ignored.
    """
    if count < 1:
        raise ValueError(f"devices: expected a positive number of devices, got {count}")
    wanted = f"{_DEVICE_FLAG}={count}"
    if jax_backend_started():
        import jax

        if jax.default_backend() == "cpu" and jax.local_device_count() < count:
            raise RuntimeError(f"devices: {count} CPU devices asked for, but jax already started with "
                               f"{jax.local_device_count()} in this process; set XLA_FLAGS={wanted} before "
                               "importing jax")
        return
    os.environ.update(simulated_device_environment(os.environ, count))


# Messages orbax logs (through absl) when it opens a checkpoint folder read-only: expected, not a problem.
_READ_ONLY_NOISE = ("read_only=True", "directory is read only")


class _DropReadOnlyNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _READ_ONLY_NOISE)


@contextlib.contextmanager
def read_only_notices_dropped():
    """Drop orbax's read-only notices while a checkpoint folder is opened for reading (library users included)."""
    logger = logging.getLogger("absl")
    noise = _DropReadOnlyNotices()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def quiet_library_logs() -> None:
    """Library log messages below ERROR (absl/orbax, jax) off for the ``jaxnn`` command; ``--debug`` keeps them."""
    for name in ("absl", "jax", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ INFO/WARNING lines


# LLVM optimisation off: halves XLA:CPU compile time of programs dominated by elementwise code (threefry random
# numbers, initialisers: 1.3 s -> 0.6 s for an MLP's init, measured) and changes results only in the last bit.
QUICK_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def quick_jit(fun=None, **jit_options):
    """``jax.jit`` for programs that run once or a few times (initialisation, random directions and probes): on
    CPU they are compiled with :data:`QUICK_COMPILE_OPTIONS`, since their run time is negligible and their compile
    time is not. Elsewhere it is plain ``jax.jit``. Usable as ``@quick_jit`` or ``quick_jit(static_argnames=...)``."""
    import functools

    if fun is None:
        return functools.partial(quick_jit, **jit_options)
    import jax

    compiled: dict[bool, object] = {}

    @functools.wraps(fun)
    def call(*args, **kwargs):
        # Compiler options only apply to a top-level program: when traced inside another jit (or eval_shape) the
        # function is plain jax.jit.
        quick = jax.default_backend() == "cpu" and not any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        if quick not in compiled:
            options = dict(jit_options, compiler_options=QUICK_COMPILE_OPTIONS) if quick else jit_options
            compiled[quick] = jax.jit(fun, **options)
        return compiled[quick](*args, **kwargs)

    return call


# --------------------------------------------------------------------------------------------------------------
# How repeated work is laid out: one rule, one set of names for every engine (curvature operators and estimators,
# population curvature, landscape grids, population training).

#: ``"vmap"``: the items (members, grid points) batched into one program. ``"scan"``: one item after another inside
#: one compiled program (``lax.scan``/``lax.map``/``while_loop``). ``"python"``: a Python loop dispatching one
#: compiled step per item or iteration (asynchronously: no host synchronisation per step). ``"auto"``: see
#: :func:`prefers_python_loops` and each engine's docstring.
STRATEGIES = ("auto", "vmap", "scan", "python")
# The names each engine used before they were unified; accepted, with a DeprecationWarning.
_FORMER_NAMES = {"vmapped": "vmap", "map": "scan", "compiled": "scan", "per_point": "python", "loop": "python",
                 "unrolled": "python"}


def resolve_strategy(strategy: str, allowed: tuple[str, ...], name: str = "strategy") -> str:
    """``strategy`` as one of ``allowed`` (a subset of :data:`STRATEGIES`); a former name is translated with a
    DeprecationWarning; anything else raises naming the argument and the valid names."""
    if isinstance(strategy, str) and strategy in _FORMER_NAMES and _FORMER_NAMES[strategy] in allowed:
        import warnings

        warnings.warn(f"{name}={strategy!r} is now {name}={_FORMER_NAMES[strategy]!r}", DeprecationWarning,
                      stacklevel=3)
        return _FORMER_NAMES[strategy]
    if strategy not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {strategy!r}")
    return strategy


def applies_convolution(jaxpr) -> bool:
    """Whether a jaxpr (or any sub-jaxpr: pjit, custom_jvp, scan, ...) applies ``conv_general_dilated``."""
    for equation in jaxpr.eqns:
        if equation.primitive.name.startswith("conv_general_dilated"):
            return True
        for value in equation.params.values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns") and applies_convolution(inner):
                    return True
    return False


def prefers_python_loops(fn, *example_args) -> bool:
    """The one rule behind every ``"auto"`` strategy: on CPU, a function that applies a convolution runs its loops
    from Python (``"python"``), since XLA:CPU runs the backward convolutions of a gradient or Hessian product 10-30x
    slower inside a compiled loop (``lax.scan``/``while_loop``) or batched by ``vmap`` than at the top level of a
    program (https://github.com/jax-ml/jax/issues/12868; measured here: a LeNet population step 119 ms per member
    vmapped, 17 ms looped). Elsewhere (accelerators, dense models) loops stay compiled. ``example_args``: arrays or
    shape-dtype structs ``fn`` is traced with (nothing is computed)."""
    import jax

    if jax.default_backend() != "cpu":
        return False
    return applies_convolution(jax.make_jaxpr(fn)(*example_args).jaxpr)

MAP_COUNT_LIMIT_FILE = "/proc/sys/vm/max_map_count"
"""Linux's limit on a process's memory mappings (default 65,530)."""


def memory_mappings() -> tuple[int, int] | None:
    """(mappings this process holds, the system's limit), or None where ``/proc`` does not tell (not Linux)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            used = sum(1 for _ in maps)
        with open(MAP_COUNT_LIMIT_FILE) as limit:
            return used, int(limit.read().strip())
    except (OSError, ValueError):
        return None


_clearing_did_not_help_at: list[int] = []  # the mappings left after a release that did not get below the threshold


def release_programs_near_map_limit(fraction: float = 0.75) -> bool:
    """Empty JAX's compiled-program caches (``jax.clear_caches()``) when this process holds more than ``fraction`` of
    Linux's memory mappings, with a warning; True when it did.

    XLA:CPU keeps the machine code of every cached program mapped into the process (JAX issue #27201). A script that
    compiles many programs in one process (a loop of ``fit`` calls over learning rates, each its own program) passes
    the limit, and the next compilation fails with "LLVM compilation error: Cannot allocate memory", then crashes or
    hangs. Released programs compile again when next used; ``fit`` checks before it starts. When a release leaves
    the process above the threshold (the mappings belong to programs the caller still holds, or to something else),
    that is said once and nothing is released again until the count has grown by another 5% of the limit."""
    held = memory_mappings()
    if held is None or held[0] <= fraction * held[1]:
        return False
    used, limit = held
    if _clearing_did_not_help_at and used <= _clearing_did_not_help_at[-1] + 0.05 * limit:
        return False
    import jax

    jax.clear_caches()
    after = memory_mappings()
    left = used if after is None else after[0]
    message = (f"jaxnn: this process held {used:,} of the system's {limit:,} memory mappings (XLA:CPU keeps every "
               f"compiled program mapped); released JAX's compiled programs (jax.clear_caches()) so that the next "
               f"compilation does not fail ({left:,} left). They compile again when used.")
    if left > fraction * limit:
        _clearing_did_not_help_at.append(left)
        message += (" Releasing did not bring the count below the threshold: the mappings belong to programs still "
                    "held elsewhere; nothing more is released until the count grows further.")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return True
