"""The interface every product implementation (``impl=``) provides."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from pallas_kernels.topology import Topology

# (lhs [P, k], rhs [E, k, n] or [E, n, k], topo, transpose_rhs) -> [P, n] in lhs.dtype
GroupedProduct = Callable[[jax.Array, jax.Array, Topology, bool], jax.Array]
# (lhs [P, k], rhs [P, n], topo, out_dtype) -> [E, k, n]
WeightGradProduct = Callable[[jax.Array, jax.Array, Topology, object], jax.Array]


class RowMap(NamedTuple):
    """How the ``P`` rows of a layout map to ``T`` tokens (a pytree).

    Attributes:
      row_tokens: ``[P] int32`` token whose copy each row holds (any value in
        rows outside every group: they are never read).
      row_weights: ``[P]`` router weight of each row's assignment.
      token_rows: ``[T, k] int32`` row of each of a token's ``k`` assignments;
        ``P`` (out of range) for an assignment that has no row. None for a
        consumer that scatters the rows instead of gathering them
        (`pallas_kernels.fused_mlp.fused_expert_mlp`).
    """

    row_tokens: jax.Array
    row_weights: jax.Array
    token_rows: jax.Array | None = None


class ExpertWeights(NamedTuple):
    """The weights of ``E`` expert MLPs ``act(x @ w1, x @ w3) @ w2`` (a pytree).

    Attributes:
      w1: ``[E, d_model, d_ff]`` gate projection.
      w3: ``[E, d_model, d_ff]`` up projection, or None (no ``up`` input to the
        activation: ``"gelu"`` experts).
      w2: ``[E, d_ff, d_model]`` down projection.

    A dense MLP uses the same container without the leading ``E`` axis.
    """

    w1: jax.Array
    w3: jax.Array | None
    w2: jax.Array


# (x, rows: RowMap or None, topo, weights, activation name, recompute_hidden) -> y; see
# `pallas_kernels.expert_mlp.routed_mlp` for the shapes.
ExpertMLP = Callable[[jax.Array, RowMap | None, Topology, ExpertWeights, str, bool], jax.Array]


class Backend(NamedTuple):
    """Forward-only kernels; ``products.py`` wires their gradients.

    Each must honour the products' contract: input rows outside every group
    (``~topo.row_is_valid()``) are ignored and output rows there are zero;
    experts with no rows get exactly zero weight gradients.

    Attributes:
      sdd: dense x per-expert dense -> block-sparse (compact) output.
      dsd: block-sparse (compact) x per-expert dense -> dense output.
      dstd: per-expert ``lhs[rows_e]ᵀ @ rhs[rows_e]``.
      layout_block_size: maps the configured block size to the row alignment
        of the layout this backend computes on.
      expert_mlp: optional fused routed-expert MLP (differentiable), the unit
        a layer dispatches to (`pallas_kernels.expert_mlp.routed_mlp`); None
        composes it from ``sdd``, the activation and ``dsd``.
    """

    sdd: GroupedProduct
    dsd: GroupedProduct
    dstd: WeightGradProduct
    layout_block_size: Callable[[int], int]
    expert_mlp: ExpertMLP | None = None
