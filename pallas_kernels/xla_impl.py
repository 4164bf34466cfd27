"""XLA implementation of the products, fast on CPU.

A loop over experts (static trip count ``E``); each expert's rows are covered
by a few large chunks, each one dense matmul (`over_chunks`): a group of up to
768 rows is a single GEMM of its size rounded up to ``TILE_ROWS`` (a 300-row
group is one 320-row GEMM), so the executed FLOPs are the useful FLOPs plus at
most ``TILE_ROWS - 1`` rows per expert. Large chunks are what a CPU GEMM wants,
and each XLA:CPU op has a fixed dispatch cost (docs/cpu_path.md), so few ops
per expert matter as much as FLOPs. Empty experts and padding rows cost
nothing, and there is no host sync. ``jax.lax.ragged_dot`` on CPU instead
expands to a dense masked matmul over all experts (``E`` times the FLOPs).

The layout is the unpadded (ragged) one, layout block size 1: a chunk may run
past its group into the next group's rows (or be shifted back from the end of
the array), and every chunk carries the mask of the rows it owns; writes keep
the other rows as they were. A layout of at most ``TILE_ROWS`` rows (a decode
step: ``batch x top_k`` rows) uses chunks of the group's size rounded up to a
power of two instead, so each expert's GEMM has about as many rows as the
expert has assignments. (The dMoE layer's fused MLP runs such layouts as
batched GEMMs instead: `fused_mlp`.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.backend import Backend
from pallas_kernels.topology import Topology

# Chunks are whole tiles: a group's rows are rounded up to TILE_ROWS.
TILE_ROWS = 32
# A group of n tiles is covered by `_chunk_schedule` chunks of FULL_CHUNK_TILES
# tiles (512 rows) and one last chunk of the rest, 1..MAX_LAST_TILES tiles (up to
# 768 rows; at least 9 tiles once there are full chunks, so a group is never split
# into a big and a tiny GEMM). One static GEMM shape per last-chunk size: more
# sizes waste fewer rows but compile longer (docs/cpu_path.md).
FULL_CHUNK_TILES = 16
MAX_LAST_TILES = 24


def _chunk_schedule(group_sizes):
    """``(full chunks, tiles of the last chunk)`` per group size; 0 tiles only when empty."""
    tiles = -(-group_sizes // TILE_ROWS)
    full = jnp.maximum(tiles - MAX_LAST_TILES + FULL_CHUNK_TILES - 1, 0) // FULL_CHUNK_TILES
    return full, tiles - full * FULL_CHUNK_TILES


def chunk_rows(group_sizes, padded_rows: int):
    """Rows `over_chunks` multiplies for each group size (executed-FLOP counts)."""
    if padded_rows <= TILE_ROWS:
        sizes = jnp.asarray(small_chunk_sizes(padded_rows))
        rows = sizes[jnp.minimum(jnp.searchsorted(sizes, group_sizes), len(sizes) - 1)]
        return jnp.where(group_sizes == 0, 0, rows)
    full, last = _chunk_schedule(group_sizes)
    return full * FULL_CHUNK_TILES * TILE_ROWS + jnp.minimum(last * TILE_ROWS, padded_rows)


def _run_chunk(body: Callable, carry, first, size: int, rows_total: int, end):
    """``body`` on the chunk of ``size`` rows from ``first`` (shifted back to end
    by ``rows_total``), owning the rows in ``[first, end)``."""
    row = jnp.minimum(first, rows_total - size)
    rows = lax.iota(jnp.int32, size) + row
    return body(carry, row, (rows >= first) & (rows < end))


def over_chunks(topo: Topology, expert, body: Callable, carry):
    """Folds ``body(carry, row, owned) -> carry`` over ``expert``'s row chunks.

    ``row`` is the chunk's first layout row and ``owned`` a ``[size] bool``
    mask (``size`` static) of the rows in ``[row, row + size)`` that belong to
    ``expert`` and to no earlier chunk: every row of the group is owned by
    exactly one chunk. A group of ``n = ceil(group_size / TILE_ROWS)`` tiles is
    covered by full chunks of ``FULL_CHUNK_TILES`` tiles (a ``fori_loop``, only
    for groups of more than ``MAX_LAST_TILES`` tiles) and one last chunk of the
    remaining tiles (a ``lax.switch`` over its ``MAX_LAST_TILES`` sizes). A group
    of up to 768 rows is thus a single GEMM, and at most ``TILE_ROWS - 1`` rows
    per group are computed for nothing. A chunk that would run past the last
    layout row is shifted back to end there (``row + size <= topo.padded_rows``).
    """
    rows_total = topo.padded_rows
    start = topo.bin_starts[expert]
    end = start + topo.group_sizes[expert]
    if rows_total <= TILE_ROWS:
        return _over_small_chunks(rows_total, start, end, body, carry)
    num_full, last_tiles = _chunk_schedule(topo.group_sizes[expert])
    full_rows = FULL_CHUNK_TILES * TILE_ROWS

    def run(carry, first, size):
        return _run_chunk(body, carry, first, size, rows_total, end)

    if rows_total > MAX_LAST_TILES * TILE_ROWS:  # otherwise num_full is always 0
        carry = lax.fori_loop(
            0, num_full, lambda i, carry: run(carry, start + i * full_rows, full_rows), carry
        )
    last_first = start + num_full * full_rows
    # Sizes past the layout's rows collapse into one (tiny layouts): dedupe.
    sizes = sorted({min(tiles * TILE_ROWS, rows_total) for tiles in range(1, MAX_LAST_TILES + 1)})
    branches = [lambda carry: carry] + [
        functools.partial(lambda carry, size: run(carry, last_first, size), size=size)
        for size in sizes
    ]
    return lax.switch(jnp.minimum(last_tiles, len(sizes)), branches, carry)


def small_chunk_sizes(rows_total: int) -> list[int]:
    """Chunk sizes of a layout of at most ``TILE_ROWS`` rows: powers of two below
    ``rows_total``, then ``rows_total``."""
    return sorted({min(1 << i, rows_total) for i in range(rows_total.bit_length() + 1)})


def _over_small_chunks(rows_total: int, start, end, body: Callable, carry):
    """`over_chunks` of a tiny layout (decoding: ``batch x top_k`` rows): one
    chunk of the group's size rounded up to a power of two, so an expert's
    GEMM has about as many rows as it has assignments, not ``rows_total``."""
    sizes = small_chunk_sizes(rows_total)
    run = lambda carry, size: _run_chunk(body, carry, start, size, rows_total, end)
    branches = [lambda carry: carry] + [functools.partial(run, size=size) for size in sizes]
    group = end - start
    index = jnp.where(group == 0, 0, jnp.searchsorted(jnp.asarray(sizes), group) + 1)
    return lax.switch(index, branches, carry)


def masked_update(buffer: jax.Array, update: jax.Array, row, owned: jax.Array) -> jax.Array:
    """Writes ``update [size, ...]`` at ``buffer[row:row + size]`` on the ``owned`` rows only."""
    old = lax.dynamic_slice_in_dim(buffer, row, update.shape[0])
    owned = owned.reshape(owned.shape + (1,) * (update.ndim - 1))
    return lax.dynamic_update_slice_in_dim(buffer, jnp.where(owned, update, old), row, 0)


def owned_rows(array: jax.Array, row, owned: jax.Array) -> jax.Array:
    """``array[row:row + size]`` with the rows not ``owned`` zeroed (they may be inf/nan)."""
    return jnp.where(owned[:, None], lax.dynamic_slice_in_dim(array, row, owned.shape[0]), 0)


def scheduled_after(anchor, buffers):
    """``buffers`` (a pytree of fresh loop-carry arrays, typically zeros), computed no
    earlier than ``anchor`` (an input of the loop that starts with them).

    XLA:CPU's scheduler hoists a constant initialisation (a broadcast zero and the copy
    the while loop needs of it) to the start of the program, so in a training step every
    layer's gradient accumulators would be live through the whole forward pass (80 of
    the `s` preset's 86 MB of temporaries under ``remat="block"``). An optimization
    barrier that ties them to ``anchor`` keeps each where its loop runs.
    """
    return lax.optimization_barrier((anchor, buffers))[1]


def transposed_lhs_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [rows, k]ᵀ @ b [rows, n] -> [k, n]`` in float32, with ``aᵀ`` materialised.

    XLA:CPU runs a plain dot on its fast (YNNPACK) GEMM but a dot that
    contracts the lhs's leading dimension on a slower Eigen path, and its
    simplifier folds a bare transpose back into the dot; the barrier keeps the
    transpose, whose copy of one chunk costs less than the difference
    (docs/benchmarks.md).
    """
    return lax.dot_general(
        lax.optimization_barrier(a.T),
        b,
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, topo: Topology, transpose_rhs: bool):
    """``out[rows_e] = lhs[rows_e] @ rhs[e]`` (``rhs[e]ᵀ`` if transposed); ``[P, n]``."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)  # rhs[expert] needs a jax array
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]

    def per_expert(expert, out):
        weight = rhs[expert]

        def chunk(out, row, owned):
            prod = lax.dot_general(
                owned_rows(lhs, row, owned), weight, contract, preferred_element_type=jnp.float32
            )
            return masked_update(out, prod.astype(out.dtype), row, owned)

        return over_chunks(topo, expert, chunk, out)

    out = scheduled_after(lhs, jnp.zeros((topo.padded_rows, n), lhs.dtype))
    return lax.fori_loop(0, topo.num_experts, per_expert, out)


def grouped_weight_grad(lhs: jax.Array, rhs: jax.Array, topo: Topology, out_dtype):
    """``out[e] = lhs[rows_e]ᵀ @ rhs[rows_e]``: ``[E, k, n]``, zeros for empty experts."""
    shape = (lhs.shape[1], rhs.shape[1])

    def per_expert(expert):
        def chunk(acc, row, owned):  # mask both: 0 * inf garbage is nan
            return acc + transposed_lhs_dot(
                owned_rows(lhs, row, owned), owned_rows(rhs, row, owned)
            )

        return over_chunks(topo, expert, chunk, jnp.zeros(shape, jnp.float32)).astype(out_dtype)

    return lax.map(per_expert, jnp.arange(topo.num_experts))


BACKEND = Backend(
    sdd=grouped_matmul,
    dsd=grouped_matmul,
    dstd=grouped_weight_grad,
    layout_block_size=lambda block_size: 1,
)
