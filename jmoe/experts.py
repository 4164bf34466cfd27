"""Expert weights and the expert MLP computed three ways: routed (the dropless
layout, `expert_mlp`), on capacity slots, and densely."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jmoe.config import MoEConfig
from pallas_kernels.activations import get_activation
from pallas_kernels.expert_mlp import ExpertWeights, RowMap, routed_mlp
from pallas_kernels.topology import Topology

# expert_type -> activation name (`pallas_kernels.activations`).
EXPERT_ACTIVATIONS = {"mlp": "gelu", "glu": "swiglu"}


def weight_init():
    """Fan-in scaled truncated normal over the last two axes (any leading expert axis)."""
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1
    )


def activate(config: MoEConfig, gate: jax.Array, up: jax.Array | None) -> jax.Array:
    """``gelu(gate)`` for ``mlp`` experts, ``silu(gate) * up`` for ``glu`` (SwiGLU)."""
    return get_activation(EXPERT_ACTIVATIONS[config.expert_type])(gate, up)


class MLPWeights(nnx.Module):
    """``w1 [*lead, d_model, d_ff]``, ``w3`` (glu only), ``w2 [*lead, d_ff, d_model]``.

    ``lead`` is ``(num_experts,)`` for routed experts and ``()`` for dense MLPs.
    """

    def __init__(self, config: MoEConfig, lead: tuple[int, ...], d_ff: int, *, rngs: nnx.Rngs):
        init, dtype = weight_init(), config.param_dtype
        self.w1 = nnx.Param(init(rngs.params(), (*lead, config.d_model, d_ff), dtype))
        self.w3 = (
            nnx.Param(init(rngs.params(), (*lead, config.d_model, d_ff), dtype))
            if config.expert_type == "glu"
            else None
        )
        self.w2 = nnx.Param(init(rngs.params(), (*lead, d_ff, config.d_model), dtype))

    def weights(self, dtype: DTypeLike) -> ExpertWeights:
        """``(w1, w3 or None, w2)`` cast to the compute dtype."""
        cast = lambda p: None if p is None else p.get_value().astype(dtype)
        return ExpertWeights(cast(self.w1), cast(self.w3), cast(self.w2))


def expert_mlp(
    config: MoEConfig,
    x: jax.Array,
    rows: RowMap | None,
    topo: Topology,
    weights: ExpertWeights,
    recompute_hidden: bool = False,
) -> jax.Array:
    """The routed experts' MLP with ``config``'s activation and ``impl``.

    The one call of the single-device (`jmoe.moe.dropless_ffn`) and the
    expert-parallel (``_local_ffn``) layers: `pallas_kernels.expert_mlp.routed_mlp`.
    ``x [tokens, d_model]`` with a `RowMap` -> ``[tokens, d_model]``, weighted
    and summed over each token's rows; ``x [P, d_model]`` already in ``topo``'s
    layout with ``rows=None`` -> ``[P, d_model]``. ``recompute_hidden``: keep
    no ``[P, d_ff]`` activations for the backward pass (it recomputes them).
    """
    return routed_mlp(
        x,
        rows,
        topo,
        weights,
        activation=EXPERT_ACTIVATIONS[config.expert_type],
        impl=config.impl,
        recompute_hidden=recompute_hidden,
    )


def batched_mlp(config: MoEConfig, slots: jax.Array, weights: ExpertWeights) -> jax.Array:
    """Expert MLP on capacity slots: ``[E, capacity, d_model]`` -> same shape."""
    w1, w3, w2 = weights
    mm = lambda x, w: jnp.einsum("ecd,edf->ecf", x, w, preferred_element_type=jnp.float32).astype(
        x.dtype
    )
    up = None if w3 is None else mm(slots, w3)
    return mm(activate(config, mm(slots, w1), up), w2)


def dense_mlp(config: MoEConfig, x: jax.Array, weights: ExpertWeights) -> jax.Array:
    """Plain MLP: ``[..., d_model]`` -> ``[..., d_model]`` (``weights`` without the ``E`` axis)."""
    w1, w3, w2 = weights
    mm = lambda a, w: jnp.matmul(a, w, preferred_element_type=jnp.float32).astype(a.dtype)
    up = None if w3 is None else mm(x, w3)
    return mm(activate(config, mm(x, w1), up), w2)
