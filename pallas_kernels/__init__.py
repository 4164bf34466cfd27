"""Block-sparse MoE products and their GPU kernels, in pure JAX (no Flax)."""

from pallas_kernels.products import IMPLS, dsd, dstd, layout_block_size, resolve_impl, sdd
from pallas_kernels.topology import Topology, make_topology, max_block_rows

__all__ = [
    "IMPLS",
    "Topology",
    "dsd",
    "dstd",
    "layout_block_size",
    "make_topology",
    "max_block_rows",
    "resolve_impl",
    "sdd",
]
