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
atexit.register(shutil.rmtree, os.environ["JAXNN_CACHE_DIR"], ignore_errors=True)


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
