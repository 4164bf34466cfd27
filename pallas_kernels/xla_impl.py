"""XLA implementation of the products, fast on CPU.

A loop over experts (static trip count ``E``); each expert's rows are covered
by power-of-two chunks of ``tile * 2**j`` rows, one per set bit of its tile
count ``ceil(group_size / tile)`` (a 300-row group with 64-row tiles is one
256-row and one 64-row chunk), each chunk one dense matmul under a
``lax.cond``. The chunks are as large as the group allows, which is what a
CPU GEMM wants, yet the executed FLOPs are the useful FLOPs plus at most
``tile - 1`` rows per expert; empty experts and padding bins cost nothing, and
there is no host sync. ``jax.lax.ragged_dot`` on CPU instead expands to a
dense masked matmul over all experts (``E`` times the FLOPs).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.backend import Backend
from pallas_kernels.topology import Topology

# Rows of the smallest chunk: the most rows a group is rounded up by. It must
# divide the block size (a group's chunks then stay inside its bin).
TILE_ROWS = 64


def tile_rows(topo: Topology) -> int:
    """Rows of the smallest chunk for ``topo`` (a divisor of its block size)."""
    return min(topo.block_size, TILE_ROWS)


def _over_chunks(topo: Topology, expert, body: Callable, carry):
    """Folds ``body(carry, row, size, valid) -> carry`` over ``expert``'s chunks.

    ``row`` is the chunk's first layout row, ``size`` its static row count and
    ``valid`` a ``[size, 1]`` mask of the rows that hold assignments (only the
    last chunk of a group has rows past it). Chunks run largest first.
    """
    tile = tile_rows(topo)
    start = topo.expert_block_offsets[expert] * topo.block_size
    end = start + topo.group_sizes[expert]
    num_tiles = (topo.group_sizes[expert] + tile - 1) // tile
    levels = (topo.padded_rows // tile).bit_length()
    row = start
    for level in reversed(range(levels)):
        size = tile << level
        present = (num_tiles >> level) & 1

        def run(carry, row=row, size=size):
            valid = lax.broadcasted_iota(jnp.int32, (size, 1), 0) + row < end
            return body(carry, row, size, valid)

        carry = lax.cond(present == 1, run, lambda carry: carry, carry)
        row = row + present * size
    return carry


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, topo: Topology, transpose_rhs: bool):
    """``out[rows_e] = lhs[rows_e] @ rhs[e]`` (``rhs[e]ᵀ`` if transposed); ``[P, n]``."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)  # rhs[expert] needs a jax array
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]

    def per_expert(expert, out):
        weight = rhs[expert]

        def chunk(out, row, size, valid):
            rows = jnp.where(valid, lax.dynamic_slice_in_dim(lhs, row, size), 0)
            prod = lax.dot_general(rows, weight, contract, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(out, prod.astype(out.dtype), row, 0)

        return _over_chunks(topo, expert, chunk, out)

    out = jnp.zeros((topo.padded_rows, n), lhs.dtype)
    return lax.fori_loop(0, topo.num_experts, per_expert, out)


def grouped_weight_grad(lhs: jax.Array, rhs: jax.Array, topo: Topology, out_dtype):
    """``out[e] = lhs[rows_e]ᵀ @ rhs[rows_e]``: ``[E, k, n]``, zeros for empty experts."""
    shape = (lhs.shape[1], rhs.shape[1])

    def per_expert(expert):
        def chunk(acc, row, size, valid):  # mask both: 0 * inf garbage is nan
            a = jnp.where(valid, lax.dynamic_slice_in_dim(lhs, row, size), 0)
            b = jnp.where(valid, lax.dynamic_slice_in_dim(rhs, row, size), 0)
            return acc + lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

        acc = _over_chunks(topo, expert, chunk, jnp.zeros(shape, jnp.float32))
        return acc.astype(out_dtype)

    return lax.map(per_expert, jnp.arange(topo.num_experts))


BACKEND = Backend(
    sdd=grouped_matmul,
    dsd=grouped_matmul,
    dstd=grouped_weight_grad,
    layout_block_size=lambda block_size: block_size,
)
