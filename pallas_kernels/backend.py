"""The interface every product implementation (``impl=``) provides."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from pallas_kernels.topology import Topology

# (lhs [P, k], rhs [E, k, n] or [E, n, k], topo, transpose_rhs) -> [P, n] in lhs.dtype
GroupedProduct = Callable[[jax.Array, jax.Array, Topology, bool], jax.Array]
# (lhs [P, k], rhs [P, n], topo, out_dtype) -> [E, k, n]
WeightGradProduct = Callable[[jax.Array, jax.Array, Topology, object], jax.Array]


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
    """

    sdd: GroupedProduct
    dsd: GroupedProduct
    dstd: WeightGradProduct
    layout_block_size: Callable[[int], int]
