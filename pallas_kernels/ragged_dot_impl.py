"""``jax.lax.ragged_dot`` implementation of the products.

XLA's own grouped matmul: on GPU it lowers to a grouped GEMM; on CPU it expands
to a dense masked matmul over all experts (``E`` times the FLOPs), which is why
it is the comparison point of ``benchmarks/cpu_layer_bench.py`` and never the
CPU default. It computes on the unpadded (ragged) layout: block size 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.backend import Backend
from pallas_kernels.topology import Topology


def _masked(x: jax.Array, topo: Topology) -> jax.Array:
    if topo.block_size == 1:  # ragged layout: every row before the end is valid
        return x
    return jnp.where(topo.row_is_valid()[:, None], x, 0)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, topo: Topology, transpose_rhs: bool):
    """``out[rows_e] = lhs[rows_e] @ rhs[e]`` via ``ragged_dot``; ``[P, n]``."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    out = lax.ragged_dot(
        _masked(lhs, topo), rhs, topo.padded_group_sizes, preferred_element_type=jnp.float32
    )
    return out.astype(lhs.dtype)


def grouped_weight_grad(lhs: jax.Array, rhs: jax.Array, topo: Topology, out_dtype):
    """``out[e] = lhs[rows_e]ᵀ @ rhs[rows_e]``: a ragged contraction over rows."""
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    out = lax.ragged_dot_general(
        _masked(lhs, topo),
        _masked(rhs, topo),
        topo.padded_group_sizes,
        dims,
        preferred_element_type=jnp.float32,
    )
    return out.astype(out_dtype)


BACKEND = Backend(
    sdd=grouped_matmul,
    dsd=grouped_matmul,
    dstd=grouped_weight_grad,
    layout_block_size=lambda block_size: 1,
)
