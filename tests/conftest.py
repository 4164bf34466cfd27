"""Session setup: 8 host CPU devices, so the expert-parallel tests can build
2 x 4 and 1 x 8 meshes in the same pytest process as every other test.

XLA reads the flag when its CPU client starts, so it must be set before jax is
first imported; pytest imports this file before any test module. Single-device
tests are unaffected: they run on device 0 exactly as before. Tests marked
``gpu`` skip without a GPU.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip without a GPU (``pytest -m gpu`` selects only them)."""
    import jax
    import pytest

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
