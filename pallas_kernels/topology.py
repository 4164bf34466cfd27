"""Block-sparse topology of a dropless MoE layer (MegaBlocks' dMoE structure).

Tokens are sorted by expert and each expert's group of rows is padded up to a
multiple of ``block_size`` (its *bin*). The first expert-MLP activation is then
a block-sparse matrix of logical shape ``[padded_rows, num_experts * d_ff]``
whose block row ``r`` holds exactly ``d_ff / block_size`` nonzero blocks: the
columns of the expert that owns row block ``r``.

Because every block row holds the same number of blocks, jmoe stores such a
matrix *compactly* as a dense ``[padded_rows, d_ff]`` array: block ``(r, j)``
(local column block ``j`` of expert ``block_row_expert[r]``) is the tile
``compact[r*bs:(r+1)*bs, j*bs:(j+1)*bs]``. This is the row-major block list of
MegaBlocks with static row offsets ``r * d_ff / bs``; only the block-row ->
expert map is data dependent.

The transposed view (blocks sorted by column, needed by the weight-gradient
products ``dW = Sᵀ D``) is equally simple: the blocks of column ``j`` of expert
``e`` are block rows ``expert_block_offsets[e] : expert_block_offsets[e + 1]``,
contiguous because rows are expert-sorted. ``expert_block_offsets`` is therefore
both the column-offset array of the transposed matrix and the bin table.

Everything is built on device, under ``jit``, with static worst-case shapes:
``num_block_rows`` is the most block rows any routing of ``num_rows``
assignments over ``num_experts`` experts can need; block rows past
``num_used_block_rows`` are padding and are marked with expert id
``num_experts``. Kernels skip them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["Topology", "make_topology", "max_block_rows"]


def _cdiv(a, b):
    return (a + b - 1) // b


def max_block_rows(num_rows: int, num_experts: int, block_size: int) -> int:
    """Static upper bound on the block rows of any routing.

    Each non-empty expert wastes at most ``block_size - 1`` padding rows, and
    at most ``min(num_experts, num_rows)`` experts are non-empty, so
    ``padded_rows <= num_rows + min(E, num_rows) * (block_size - 1)``.
    """
    nonempty = min(num_experts, num_rows)
    return max(1, (num_rows + nonempty * (block_size - 1)) // block_size)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "group_sizes",
        "expert_block_offsets",
        "block_row_expert",
        "num_used_block_rows",
    ],
    meta_fields=["block_size"],
)
@dataclasses.dataclass(frozen=True)
class Topology:
    """Routing-dependent metadata of the padded, expert-sorted row layout.

    Attributes:
      group_sizes: ``[E] int32`` rows (token assignments) routed to each expert.
      expert_block_offsets: ``[E + 1] int32`` first block row of each expert's
        bin; ``expert_block_offsets[E] == num_used_block_rows``. In the
        transposed (column-sorted) view these are the column offsets.
      block_row_expert: ``[num_block_rows] int32`` expert owning each block
        row; ``E`` for padding block rows past ``num_used_block_rows``.
      num_used_block_rows: ``[] int32`` block rows that belong to some bin.
      block_size: rows per block (static).
    """

    group_sizes: jax.Array
    expert_block_offsets: jax.Array
    block_row_expert: jax.Array
    num_used_block_rows: jax.Array
    block_size: int

    @property
    def num_experts(self) -> int:
        return self.group_sizes.shape[0]

    @property
    def num_block_rows(self) -> int:
        return self.block_row_expert.shape[0]

    @property
    def padded_rows(self) -> int:
        """Static row count of every array in this layout."""
        return self.num_block_rows * self.block_size

    @property
    def bin_starts(self) -> jax.Array:
        """``[E] int32`` first row of each expert's bin (the row offsets)."""
        return self.expert_block_offsets[:-1] * self.block_size

    @property
    def padded_group_sizes(self) -> jax.Array:
        """``[E] int32`` rows of each bin: group sizes rounded up to blocks."""
        return jnp.diff(self.expert_block_offsets) * self.block_size

    def row_expert(self) -> jax.Array:
        """``[padded_rows] int32`` expert of every row (``E`` for padding bins)."""
        return jnp.repeat(
            self.block_row_expert, self.block_size, total_repeat_length=self.padded_rows
        )

    def row_is_valid(self) -> jax.Array:
        """``[padded_rows] bool``: True where a row holds a real assignment.

        False for the padding rows at the end of each bin and for padding bins.
        """
        rows = jnp.arange(self.padded_rows, dtype=jnp.int32)
        expert = self.row_expert()
        safe = jnp.minimum(expert, self.num_experts - 1)
        rank = rows - self.bin_starts[safe]
        return (expert < self.num_experts) & (rank < self.group_sizes[safe])


def make_topology(group_sizes: ArrayLike, num_rows: int, block_size: int) -> Topology:
    """Builds the topology of ``num_rows`` assignments split as ``group_sizes``.

    Args:
      group_sizes: ``[E]`` integer rows per expert; must sum to at most
        ``num_rows`` (checked only when concrete: under ``jit`` the caller's
        routing guarantees it).
      num_rows: static number of assignments (tokens * top_k); it sizes the
        worst case.
      block_size: rows per block, a power of two (1 means no padding, the
        ragged layout used by grouped GEMM).

    Returns:
      A `Topology` whose arrays have static shapes depending only on
      ``(num_rows, E, block_size)``.
    """
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
    group_sizes = jnp.asarray(group_sizes)
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D [num_experts], got shape {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer, got {group_sizes.dtype}")
    num_experts = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    blocks_per_expert = _cdiv(group_sizes, block_size)
    expert_block_offsets = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(blocks_per_expert, dtype=jnp.int32)]
    )
    num_used = expert_block_offsets[-1]
    num_block_rows = max_block_rows(num_rows, num_experts, block_size)
    block_rows = jnp.arange(num_block_rows, dtype=jnp.int32)
    # Expert e owns block rows [offsets[e], offsets[e+1]); searchsorted on the
    # bin ends gives it, and lands on E past the last used block row.
    block_row_expert = jnp.searchsorted(expert_block_offsets[1:], block_rows, side="right").astype(
        jnp.int32
    )
    return Topology(
        group_sizes=group_sizes,
        expert_block_offsets=expert_block_offsets,
        block_row_expert=block_row_expert,
        num_used_block_rows=num_used,
        block_size=block_size,
    )
