"""tests/train checks that training is bit for bit the same across resumes, steps per call, devices and processes:
it runs at XLA's default optimisation level, as users do (the suite's root conftest lowers the level for the other
tests). Run on its own (as README's test command does), nothing has started jax's backend yet, so the user's
XLA_FLAGS are restored in time; collected together with the other folders in one process, the level stays lowered."""

import os

from jaxnn.runtime import jax_backend_started

if not jax_backend_started():
    os.environ["XLA_FLAGS"] = os.environ.get("JAXNN_TEST_XLA_FLAGS", "")
