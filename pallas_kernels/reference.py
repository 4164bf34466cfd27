"""Dense pure-jnp references of the products. For tests only: they gather one
weight matrix per row (``[P, k, n]`` memory), which no real layer could afford."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.topology import Topology


def _row_weights(rhs: jax.Array, topo: Topology) -> jax.Array:
    """``[P, k, n]`` weight of every row's expert (zeros for padding bins)."""
    padded = jnp.concatenate([rhs, jnp.zeros_like(rhs[:1])])
    return padded[topo.row_expert()]


def grouped_matmul(lhs, rhs, topo: Topology, transpose_rhs: bool = False):
    """Reference of ``sdd`` and ``dsd``: ``[P, k]`` x ``rhs[e]`` -> ``[P, n]``."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    rows = jnp.where(topo.row_is_valid()[:, None], lhs, 0).astype(jnp.float32)
    out = jnp.einsum(
        "pk,pkn->pn",
        rows,
        _row_weights(rhs.astype(jnp.float32), topo),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(lhs.dtype)


def grouped_weight_grad(lhs, rhs, topo: Topology):
    """Reference of ``dstd``: ``[P, k]``, ``[P, n]`` -> ``[E, k, n]`` (float32)."""
    valid = topo.row_is_valid()
    one_hot = (topo.row_expert()[:, None] == jnp.arange(topo.num_experts)) & valid[:, None]
    return jnp.einsum(
        "pe,pk,pn->ekn",
        one_hot.astype(jnp.float32),
        lhs.astype(jnp.float32),
        rhs.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
