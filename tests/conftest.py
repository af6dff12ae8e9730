"""Test set-up: 8 simulated CPU devices for sharding tests, and a float64 switch."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test in float64 (``jnp.asarray`` of Python floats gives float64)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Run the test once per precision; yields the dtype name with x64 switched accordingly."""
    with jax.enable_x64(request.param == "float64"):
        yield request.param
