"""The products on the Mosaic GPU kernels: ``sdd`` and ``dsd`` -> `gmm`, ``dstd`` -> `tgmm`.

Layout: ``layout_block_size`` is 1 whatever the configured block size, so jmoe
hands these kernels the unpadded ragged layout: expert ``e``'s rows are the
contiguous range ``[bin_starts[e], bin_starts[e] + group_sizes[e])``,
``padded_rows`` is exactly ``tokens * top_k``, and no FLOPs, bytes or memory go
to padding rows. Grouped GEMMs need no block alignment: TMA loads tiles at any
row offset and the kernels handle group boundaries inside a tile (``gmm.py``,
``tgmm.py``). The one alignment TMA needs, whole arrays of a multiple of 8
rows, is met by padding the rows of an array inside the kernels' wrappers, a
copy made only when ``tokens * top_k`` is not a multiple of 8. The adapter
passes ``topo.bin_starts`` and ``topo.group_sizes`` explicitly, so a topology
with padded bins (block size > 1, built by hand) works too: its padding rows
belong to no group, are ignored on input and zero on output.

Dtypes: wgmma multiplies bfloat16 / float16 with float32 accumulation, which
these kernels use. float32 operands would run as tf32 (10-bit mantissa), a
silent precision loss, so float32 products fall back to the ``impl="xla"``
path (``pallas_kernels/xla_impl.py``: XLA dots at JAX's default matmul
precision, set by ``jax_default_matmul_precision``; correct but not fast on a
GPU). Use bfloat16 or float16 compute (``MoEConfig(dtype=...)``) for the
Hopper kernels.
"""

from __future__ import annotations

import jax

from pallas_kernels import xla_impl
from pallas_kernels.backend import Backend
from pallas_kernels.mosaic.common import KERNEL_DTYPES
from pallas_kernels.mosaic.gmm import gmm
from pallas_kernels.mosaic.tgmm import tgmm
from pallas_kernels.topology import Topology

__all__ = ["BACKEND"]


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, topo: Topology, transpose_rhs: bool):
    """``[P, k]`` x ``rhs[e]`` (``[E, k, n]`` or ``[E, n, k]``) -> ``[P, n]`` in lhs's dtype."""
    if lhs.dtype not in KERNEL_DTYPES:
        return xla_impl.grouped_matmul(lhs, rhs, topo, transpose_rhs)
    return gmm(
        lhs, rhs, topo.group_sizes, group_starts=topo.bin_starts, transpose_rhs=transpose_rhs
    )


def grouped_weight_grad(lhs: jax.Array, rhs: jax.Array, topo: Topology, out_dtype):
    """``[P, k]``, ``[P, n]`` -> ``[E, k, n]`` in ``out_dtype``."""
    if lhs.dtype not in KERNEL_DTYPES:
        return xla_impl.grouped_weight_grad(lhs, rhs, topo, out_dtype)
    return tgmm(lhs, rhs, topo.group_sizes, group_starts=topo.bin_starts, out_dtype=out_dtype)


BACKEND = Backend(
    sdd=grouped_matmul,
    dsd=grouped_matmul,
    dstd=grouped_weight_grad,
    layout_block_size=lambda block_size: 1,
)
