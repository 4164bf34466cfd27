"""The 8 host CPU devices the multi-device tests build their meshes on."""

import jax


def host_cpus() -> list:
    """All host CPU devices; asserts there are at least 8 (see conftest.py)."""
    devices = jax.devices("cpu")
    assert len(devices) >= 8, (
        "needs 8 host CPU devices: run under pytest (tests/conftest.py sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported)"
    )
    return devices
