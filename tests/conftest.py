"""Shared test fixtures. float32 is the default; tests comparing to exact answers use the ``x64`` fixture."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield
