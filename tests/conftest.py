"""Test setup: 8 simulated CPU devices (must be set before jax is imported).

``SAM_OPTAX_TEST_ON_DEVICE=1`` (benchmarks/accelerator.sh) runs on the default
backend (a GPU) instead: the CPU platform is not forced, and the tests marked
``multidevice`` are skipped when fewer than 8 devices are visible.
"""

import os

import pytest

ON_DEVICE = os.environ.get("SAM_OPTAX_TEST_ON_DEVICE", "") not in ("", "0")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

if not ON_DEVICE:
    jax.config.update("jax_platforms", "cpu")

# A worker process of test_multihost.py (reads sys.argv at import), not a test module.
collect_ignore = ["multihost_worker.py"]


def pytest_collection_modifyitems(config, items):
    if ON_DEVICE and jax.device_count() < 8:
        skip = pytest.mark.skip(reason=f"needs 8 devices, {jax.device_count()} {jax.default_backend()} visible")
        for item in items:
            if "multidevice" in item.keywords:
                item.add_marker(skip)
