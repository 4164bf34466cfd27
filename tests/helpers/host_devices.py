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


def held_bytes(tree) -> int:
    """The most bytes any one device holds of the arrays in ``tree``, counted from the
    shards they really have there (to check `jmoe.parallel.mesh.bytes_per_device`)."""
    held: dict = {}
    for array in jax.tree.leaves(tree):
        for shard in array.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())
