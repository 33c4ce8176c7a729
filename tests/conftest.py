"""Test setup: 8 simulated CPU devices (must be set before jax is imported)."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

# A worker process of test_multihost.py (reads sys.argv at import), not a test module.
collect_ignore = ["multihost_worker.py"]
