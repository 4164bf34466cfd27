"""XLA implementation of the products, fast on CPU.

Two nested loops: over experts (static trip count ``E``), then over the
``tile``-row tiles that hold the expert's assignments (dynamic trip count
``ceil(group_size / tile)``, a ``while`` loop, no host sync). Each expert's
weight is sliced once and each tile is one small dense matmul, so the executed
FLOPs are the useful FLOPs plus at most ``tile - 1`` rows per expert; empty
experts and padding bins cost nothing. ``jax.lax.ragged_dot`` on CPU instead
expands to a dense masked matmul over all experts (``E`` times the FLOPs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.backend import Backend
from pallas_kernels.topology import Topology

# Rows per matmul tile. Small enough that little work is wasted at the end of
# each group, large enough for a CPU GEMM to run near peak (see
# benchmarks/cpu_layer_bench.py); it must divide the block size.
MAX_TILE_ROWS = 64


def tile_rows(topo: Topology) -> int:
    """Rows per tile for ``topo`` (a divisor of its block size)."""
    return min(topo.block_size, MAX_TILE_ROWS)


def _expert_tiles(topo: Topology, expert, tile: int):
    """(first row, number of tiles) of ``expert``'s assignments."""
    start = topo.expert_block_offsets[expert] * topo.block_size
    count = topo.group_sizes[expert]
    return start, count, (count + tile - 1) // tile


def _valid_rows(count, tile_index, tile: int):
    """``[tile, 1]`` bool: which rows of tile ``tile_index`` are assignments."""
    return (lax.broadcasted_iota(jnp.int32, (tile, 1), 0) + tile_index * tile) < count


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, topo: Topology, transpose_rhs: bool):
    """``out[rows_e] = lhs[rows_e] @ rhs[e]`` (``rhs[e]ᵀ`` if transposed); ``[P, n]``."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)  # rhs[expert] needs a jax array
    tile = tile_rows(topo)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = jnp.zeros((topo.padded_rows, n), lhs.dtype)

    def per_expert(expert, out):
        weight = rhs[expert].T if transpose_rhs else rhs[expert]
        start, count, num_tiles = _expert_tiles(topo, expert, tile)

        def per_tile(i, out):
            row = start + i * tile
            rows = lax.dynamic_slice_in_dim(lhs, row, tile)
            rows = jnp.where(_valid_rows(count, i, tile), rows, 0)
            prod = jnp.dot(rows, weight, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(out, prod.astype(out.dtype), row, 0)

        return lax.fori_loop(0, num_tiles, per_tile, out)

    return lax.fori_loop(0, topo.num_experts, per_expert, out)


def grouped_weight_grad(lhs: jax.Array, rhs: jax.Array, topo: Topology, out_dtype):
    """``out[e] = lhs[rows_e]ᵀ @ rhs[rows_e]``: ``[E, k, n]``, zeros for empty experts."""
    tile = tile_rows(topo)
    shape = (lhs.shape[1], rhs.shape[1])

    def per_expert(expert):
        start, count, num_tiles = _expert_tiles(topo, expert, tile)

        def per_tile(i, acc):
            row = start + i * tile
            valid = _valid_rows(count, i, tile)  # mask both: 0 * inf garbage is nan
            a = jnp.where(valid, lax.dynamic_slice_in_dim(lhs, row, tile), 0)
            b = jnp.where(valid, lax.dynamic_slice_in_dim(rhs, row, tile), 0)
            return acc + lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, num_tiles, per_tile, jnp.zeros(shape, jnp.float32))
        return acc.astype(out_dtype)

    return lax.map(per_expert, jnp.arange(topo.num_experts))


BACKEND = Backend(
    sdd=grouped_matmul,
    dsd=grouped_matmul,
    dstd=grouped_weight_grad,
    layout_block_size=lambda block_size: block_size,
)
