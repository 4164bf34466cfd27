"""The routed-expert MLP: the unit a dMoE layer dispatches to (MegaBlocks' dMLP).

``routed_mlp`` is called by both the single-device layer and the
expert-parallel one, so an ``impl`` runs the same code with or without a mesh.
It uses the backend's fused ``expert_mlp`` when it has one (``impl="xla"``:
`fused_mlp.fused_expert_mlp`) and otherwise composes the products::

    rows = x[row_tokens]                   permute    [P, d_model]
    h    = activation(sdd(rows, w1), sdd(rows, w3))   [P, d_ff]
    out  = dsd(h, w2)                                 [P, d_model]
    y[t] = sum_j row_weights[r] * out[r],  r = token_rows[t, j]    (unpermute)

The combine is a gather (each token reads its ``k`` rows), so it needs no
scatter-add and is deterministic on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import products
from pallas_kernels.activations import get_activation
from pallas_kernels.backend import ExpertWeights, RowMap
from pallas_kernels.topology import Topology

__all__ = ["ExpertWeights", "RowMap", "composed_expert_mlp", "routed_mlp"]


def composed_expert_mlp(
    impl: str,
    x: jax.Array,
    rows: RowMap | None,
    topo: Topology,
    weights: ExpertWeights,
    activation: str,
) -> jax.Array:
    """`routed_mlp` from ``impl``'s products (for backends without a fused one)."""
    act = get_activation(activation)
    permuted = (
        x if rows is None else jnp.take(x, rows.row_tokens, axis=0, mode="fill", fill_value=0)
    )
    w1, w3, w2 = weights
    gate = products.sdd(permuted, w1, topo, impl=impl)
    up = None if w3 is None else products.sdd(permuted, w3, topo, impl=impl)
    out = products.dsd(act(gate, up), w2, topo, impl=impl)
    if rows is None:
        return out
    chosen = jnp.take(out, rows.token_rows, axis=0, mode="fill", fill_value=0)  # [T, k, d]
    gates = jnp.take(rows.row_weights, rows.token_rows, mode="fill", fill_value=0)
    y = jnp.einsum(
        "tk,tkd->td", gates.astype(jnp.float32), chosen, preferred_element_type=jnp.float32
    )
    return y.astype(x.dtype)


def routed_mlp(
    x: jax.Array,
    rows: RowMap | None,
    topo: Topology,
    weights: ExpertWeights,
    *,
    activation: str,
    impl: str = "auto",
    recompute_hidden: bool = False,
) -> jax.Array:
    """Routed experts' weighted outputs, summed per token (differentiable).

    Args:
      x: ``[tokens, d_model]`` in the compute dtype; with ``rows=None``,
        ``[P, d_model]`` rows already in ``topo``'s layout (``P = topo.padded_rows``).
      rows: how the layout's rows map to ``x``'s tokens (`RowMap`), or None
        (``x`` is the layout: identity gather, unit weights).
      topo: the row layout; its block size must be
        ``products.layout_block_size(impl, ...)``.
      weights: ``w1 [E, d_model, d_ff]``, ``w3`` (the same or None:
        ``"gelu"``), ``w2 [E, d_ff, d_model]``, in ``x.dtype``.
      activation: a name in `pallas_kernels.activations.ACTIVATIONS`
        (``"gelu"``, or ``"swiglu"`` with ``w3``).
      impl: as in `products`; ``"auto"`` is resolved for ``x.dtype``.
      recompute_hidden: keep no ``[P, d_ff]`` activations for the backward
        pass, which recomputes them (`jax.checkpoint` of the composed MLP; the
        fused one recomputes them chunk by chunk): for callers that recompute
        the forward pass anyway.

    Returns:
      ``[tokens, d_model]`` (``[P, d_model]`` with ``rows=None``; zero in rows
      outside every group) in ``x.dtype``; sums accumulate in float32.
    """
    get_activation(activation)  # a bad name fails here, before any kernel
    impl = products.resolve_impl(impl, x.dtype)
    fused = products.backend(impl).expert_mlp
    if fused is None:
        composed = composed_expert_mlp
        if recompute_hidden:
            composed = jax.checkpoint(composed, static_argnums=(0, 5))
        return composed(impl, x, rows, topo, weights, activation)
    return fused(x, rows, topo, weights, activation, recompute_hidden)
