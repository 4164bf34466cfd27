"""Token permutation: expert-sorted gather into a row layout, and the weighted inverse.

A `Dispatch` maps the ``tokens * top_k`` assignments (token ``t``, choice
``j``, flattened as ``t * k + j``) to rows of a layout:

* dropless: the padded block layout of a `Topology` (expert ``e``'s
  assignments fill the start of its bin, in token order);
* capacity (token-dropping): ``E`` fixed slots of ``capacity`` rows; an
  assignment whose rank within its expert is ``>= capacity`` is dropped.

An expert id of ``E`` (out of range) marks a masked token's assignment: it
gets no row and counts in no group (nor as dropped).

Both are built from one stable sort of the expert ids: no ``[tokens, E]``
one-hot dispatch tensor, static shapes, no host sync. `permute` and
`unpermute` are gathers, so autodiff gives the right gradients for the
tokens and for the router gates (``d gate[t, j] = <dy[t], y_row>``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import RowMap
from pallas_kernels.topology import Topology, make_topology


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["assignment_rows", "row_tokens"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Assignment <-> row maps of a layout with ``rows`` rows.

    Attributes:
      assignment_rows: ``[tokens * k] int32`` row of each assignment;
        ``rows`` (out of range) for a dropped assignment.
      row_tokens: ``[rows] int32`` token whose copy each row holds;
        ``tokens`` (out of range) for empty rows.
    """

    assignment_rows: jax.Array
    row_tokens: jax.Array


def rank_within_expert(flat_experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Position of each assignment among those of its expert, in token order.

    Args:
      flat_experts: ``[n]`` int32 expert of each flattened assignment.

    Returns:
      ``(rank [n] int32, group_sizes [E] int32)``.
    """
    n = flat_experts.shape[0]
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    sorted_rank = jnp.arange(n, dtype=jnp.int32) - group_starts[flat_experts[order]]
    rank = jnp.zeros((n,), jnp.int32).at[order].set(sorted_rank, unique_indices=True)
    return rank, group_sizes


def _dispatch(assignment_rows: jax.Array, num_rows: int, top_k: int) -> Dispatch:
    tokens_of_assignment = jnp.arange(assignment_rows.shape[0], dtype=jnp.int32) // top_k
    num_tokens = assignment_rows.shape[0] // top_k
    row_tokens = (
        jnp.full((num_rows,), num_tokens, jnp.int32)
        .at[assignment_rows]
        .set(tokens_of_assignment, mode="drop", unique_indices=True)
    )
    return Dispatch(assignment_rows=assignment_rows, row_tokens=row_tokens)


def dropless_dispatch(
    expert_ids: jax.Array, num_experts: int, block_size: int
) -> tuple[Dispatch, Topology]:
    """Plans the dropless layout for ``expert_ids [tokens, k]``.

    Returns:
      ``(Dispatch, Topology)``; the layout has ``topology.padded_rows`` rows.
    """
    tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    rank, group_sizes = rank_within_expert(flat, num_experts)
    topo = make_topology(group_sizes, tokens * top_k, block_size)
    rows = jnp.where(flat < num_experts, topo.bin_starts[flat] + rank, topo.padded_rows)
    return _dispatch(rows, topo.padded_rows, top_k), topo


def capacity_dispatch(
    expert_ids: jax.Array, num_experts: int, capacity: int
) -> tuple[Dispatch, jax.Array, jax.Array]:
    """Plans the token-dropping layout: ``E`` slots of ``capacity`` rows.

    Returns:
      ``(Dispatch, group_sizes [E] int32 before dropping, dropped [] int32)``;
      the layout has ``E * capacity`` rows, expert-major.
    """
    tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    rank, group_sizes = rank_within_expert(flat, num_experts)
    num_rows = num_experts * capacity
    routed = flat < num_experts
    kept = routed & (rank < capacity)
    rows = jnp.where(kept, flat * capacity + rank, num_rows)
    dropped = jnp.sum(routed & ~kept, dtype=jnp.int32)
    return _dispatch(rows, num_rows, top_k), group_sizes, dropped


def permute(x: jax.Array, dispatch: Dispatch) -> jax.Array:
    """Gathers ``x [tokens, d]`` into the layout: ``[rows, d]``, zeros in empty rows."""
    return jnp.take(x, dispatch.row_tokens, axis=0, mode="fill", fill_value=0)


def row_weights(gates: jax.Array, dispatch: Dispatch) -> jax.Array:
    """Router gates ``[tokens, k]`` moved to the layout: ``[rows]``, 0 in empty rows."""
    rows = dispatch.row_tokens.shape[0]
    return (
        jnp.zeros((rows,), gates.dtype)
        .at[dispatch.assignment_rows]
        .set(gates.reshape(-1), mode="drop", unique_indices=True)
    )


def row_map(gates: jax.Array, dispatch: Dispatch) -> RowMap:
    """The `RowMap` a routed MLP needs: row tokens, `row_weights` and, for
    each token, its ``k`` rows (``[tokens, k]``)."""
    return RowMap(
        row_tokens=dispatch.row_tokens,
        row_weights=row_weights(gates, dispatch),
        token_rows=dispatch.assignment_rows.reshape(gates.shape),
    )


def unpermute(y: jax.Array, dispatch: Dispatch, gates: jax.Array) -> jax.Array:
    """Inverse of `permute`, weighted by the gates and summed over the k choices.

    Args:
      y: ``[rows, d]`` expert outputs in the layout.
      gates: ``[tokens, k]`` router gates (dropped assignments add 0).

    Returns:
      ``[tokens, d]`` in ``y.dtype``; sums accumulate in float32.
    """
    tokens, top_k = gates.shape
    chosen = jnp.take(y, dispatch.assignment_rows, axis=0, mode="fill", fill_value=0)
    chosen = chosen.reshape(tokens, top_k, y.shape[-1])
    out = jnp.einsum(
        "tk,tkd->td", gates.astype(jnp.float32), chosen, preferred_element_type=jnp.float32
    )
    return out.astype(y.dtype)
