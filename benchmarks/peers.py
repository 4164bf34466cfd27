"""Other projects' grouped GEMMs, benchmarked next to jmoe's kernels.

Each peer is a pair on the unpadded (ragged) layout, groups in order:

* ``gmm(x [m, k], w [E, k, n], group_sizes [E]) -> [m, n]`` (jmoe's ``sdd``);
* ``tgmm(x [m, k], dy [m, n], group_sizes [E]) -> [E, k, n]`` (jmoe's ``dstd``).

Peers: JAX's Hopper kernels ``ragged_dot_mgpu`` / ``transposed_ragged_dot_mgpu``
(``jax.experimental.pallas.ops.gpu``, with the tiles their autotuning mains
search: 128 x 128 x 64, 4 stages), and ``tokamax.ragged_dot`` when the package
is importable (its ``tgmm`` is the weight gradient of its ``ragged_dot``).
``jax.lax.ragged_dot`` is jmoe's own ``impl="ragged_dot"``. Off GPU the Mosaic
GPU peers run in interpret mode.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

__all__ = ["PEERS", "Peer", "available_peers"]

_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4)


class Peer(NamedTuple):
    gmm: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    tgmm: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None  # None: cannot run here


def _mode():
    """Interpret the Mosaic GPU kernels unless a GPU runs them."""
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    return plgpu.force_gpu_interpret_mode()


def _grid_block_n(n: int) -> int:
    """Widest tile-column band (<= 8) dividing the ``n / block_n`` tile columns."""
    columns = n // _TILES["block_n"]
    return next(b for b in (8, 4, 2, 1) if columns % b == 0)


def _mgpu_gmm(x, w, group_sizes):
    with _mode():
        return ragged_dot_mgpu.ragged_dot(
            x, w, group_sizes=group_sizes, grid_block_n=_grid_block_n(w.shape[2]), **_TILES
        )


def _mgpu_tgmm(x, dy, group_sizes):
    with _mode():
        return transposed_ragged_dot_mgpu.transposed_ragged_dot(
            x, dy, group_sizes=group_sizes, grid_block_n=1, **_TILES
        )


def _tokamax_gmm(x, w, group_sizes):
    import tokamax

    return tokamax.ragged_dot(x, w, group_sizes)


def _tokamax_tgmm(x, dy, group_sizes):
    num_groups = group_sizes.shape[0]
    w = jnp.zeros((num_groups, x.shape[1], dy.shape[1]), x.dtype)
    return jax.grad(lambda w: jnp.vdot(_tokamax_gmm(x, w, group_sizes), dy).real)(w)


PEERS = {
    "ragged_dot_mgpu": Peer(_mgpu_gmm, _mgpu_tgmm),
    "tokamax": Peer(_tokamax_gmm, _tokamax_tgmm),
}


def available_peers() -> dict[str, Peer]:
    """The peers that run here: tokamax only when installed (an optional wheel);
    off GPU no ``transposed_ragged_dot_mgpu``, which reads the device's SM count."""
    peers = dict(PEERS)
    if importlib.util.find_spec("tokamax") is None:
        del peers["tokamax"]
    if jax.default_backend() != "gpu":
        peers["ragged_dot_mgpu"] = peers["ragged_dot_mgpu"]._replace(tgmm=None)
    return peers
