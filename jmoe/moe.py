"""The MoE layers: dropless (MegaBlocks dMoE) and token-dropping (capacity factor)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jmoe import parallel, permutation
from jmoe.config import MoEConfig
from jmoe.dense import DenseMLP
from jmoe.experts import ExpertWeights, MLPWeights, batched_mlp, expert_mlp
from jmoe.router import Router, routing_aux
from jmoe.validation import check_input
from pallas_kernels.products import layout_block_size


def dropless_ffn(
    config: MoEConfig,
    x: jax.Array,
    gates: jax.Array,
    expert_ids: jax.Array,
    w1: jax.Array,
    w3: jax.Array | None,
    w2: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Routed experts of a dropless MoE on one device.

    Args:
      x: ``[tokens, d_model]`` in the compute dtype.
      gates, expert_ids: ``[tokens, k]`` router output (`RouterOutput`).
      w1, w3, w2: ``[E, d_model, d_ff]``, same or None, ``[E, d_ff, d_model]``.

    Returns:
      ``(y [tokens, d_model], tokens_per_expert [E] int32)``.
    """
    block = layout_block_size(config.impl, config.block_size)
    dispatch, topo = permutation.dropless_dispatch(expert_ids, config.num_experts, block)
    rows = permutation.row_map(gates, dispatch)
    y = expert_mlp(config, x, rows, topo, ExpertWeights(w1, w3, w2))
    return y, topo.group_sizes


def capacity(config: MoEConfig, num_tokens: int) -> int:
    """Static slots per expert: ``int(cf * k * T / E)``, or ``T`` (drops nothing) at cf 0."""
    if config.capacity_factor == 0:
        return num_tokens
    per_expert = config.capacity_factor * config.top_k * num_tokens / config.num_experts
    return max(1, int(per_expert))


def capacity_ffn(
    config: MoEConfig,
    x: jax.Array,
    gates: jax.Array,
    expert_ids: jax.Array,
    w1: jax.Array,
    w3: jax.Array | None,
    w2: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Routed experts of a token-dropping MoE (GShard/Switch style).

    Same arguments as `dropless_ffn`. Returns ``(y, tokens_per_expert, dropped)``
    where ``dropped`` counts the assignments past an expert's capacity (later
    tokens are dropped first).
    """
    slots = capacity(config, x.shape[0])
    dispatch, group_sizes, dropped = permutation.capacity_dispatch(
        expert_ids, config.num_experts, slots
    )
    buffer = permutation.permute(x, dispatch).reshape(config.num_experts, slots, -1)
    out = batched_mlp(config, buffer, ExpertWeights(w1, w3, w2))
    out = out.reshape(config.num_experts * slots, -1)
    return permutation.unpermute(out, dispatch, gates), group_sizes, dropped


class _MoE(nnx.Module):
    """Router, routed experts and optional shared experts; subclasses route the FFN."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.router = Router(config, rngs=rngs)
        self.experts = MLPWeights(config, (config.num_experts,), config.d_ff, rngs=rngs)
        self.shared = (
            DenseMLP(config, d_ff=config.shared_hidden, rngs=rngs)
            if config.num_shared_experts
            else None
        )
        self.shared_gate = (
            nnx.Param(
                nnx.initializers.normal(0.02)(
                    rngs.params(), (config.d_model, 1), config.param_dtype
                )
            )
            if self.shared is not None and config.shared_expert_gate
            else None
        )

    def _routed(self, x, gates, expert_ids):
        """``-> (y [tokens, d_model], tokens_per_expert [E], dropped [], ep_rounds)``;
        ``ep_rounds`` is None unless the layer reports it (`DroplessMoE` with
        ``ep_buffer_factor``)."""
        raise NotImplementedError

    def _shared(self, x):
        out = self.shared.forward(x)
        if self.shared_gate is not None:
            gate = x.astype(jnp.float32) @ self.shared_gate.get_value().astype(jnp.float32)
            out = (jax.nn.sigmoid(gate) * out).astype(out.dtype)
        return out

    def __call__(
        self, x: ArrayLike, mask: ArrayLike | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x [..., d_model]`` -> ``(y [..., d_model], aux)``.

        ``mask``: None or ``[...]`` bool (``x.shape[:-1]``, e.g. ``[batch, seq]``
        or ``[tokens]``), True for real tokens. A masked token (padding) is
        routed to no expert, adds nothing to ``tokens_per_expert``, the aux
        losses (they average over real tokens only) or the expert-bias update,
        and its output is 0.

        ``aux``: ``load_balancing_loss``, ``router_z_loss`` and
        ``sequence_aux_loss`` (scalars, already weighted by the config; the
        sequence-wise loss takes each row of ``x [batch, seq, d_model]`` as a
        sequence, all tokens of a 2-D ``x`` as one), ``tokens_per_expert [E]
        int32`` (assignments routed to each expert), ``dropped_tokens`` (int32
        scalar); with ``ep_buffer_factor`` set, ``ep_rounds`` (int32 scalar, 1
        without a mesh); ``router_probs [tokens, E]`` float32 and ``expert_ids
        [tokens, k]`` int32 (tokens flattened), for the model's ``"global"``
        balancing loss (`jmoe.loss_scope`).
        """
        check_input(x, self.config, mask)
        lead = x.shape[:-1]
        tokens = x.reshape(-1, self.config.d_model).astype(self.config.dtype)
        routing = self.router(tokens)
        gates, expert_ids = routing.gates, routing.expert_ids
        if mask is not None:
            mask = jnp.asarray(mask).reshape(-1)
            gates = jnp.where(mask[:, None], gates, 0.0)
            expert_ids = jnp.where(mask[:, None], expert_ids, self.config.num_experts)
        y, tokens_per_expert, dropped, ep_rounds = self._routed(tokens, gates, expert_ids)
        if self.shared is not None:
            y = y + self._shared(tokens)
        if mask is not None:
            y = jnp.where(mask[:, None], y, jnp.zeros((), y.dtype))
        aux = routing_aux(
            self.config,
            routing.logits,
            routing.probs,
            tokens_per_expert,
            dropped,
            expert_ids,
            num_sequences=math.prod(lead[:-1]),
            ep_rounds=ep_rounds,
            mask=mask,
        )
        aux.update(router_probs=routing.probs, expert_ids=routing.expert_ids)
        return y.reshape(*lead, self.config.d_model), aux


class DroplessMoE(_MoE):
    """MegaBlocks' dropless MoE: no token dropped, groups padded only to blocks.

    Parameters: ``router.kernel [d_model, E]``, ``experts.w1 [E, d_model, d_ff]``,
    ``experts.w3`` (glu), ``experts.w2 [E, d_ff, d_model]``, optional ``shared``
    (a `DenseMLP`) and ``shared_gate [d_model, 1]``.
    """

    def _routed(self, x, gates, expert_ids):
        w1, w3, w2 = self.experts.weights(self.config.dtype)
        in_rounds = self.config.ep_buffer_factor is not None
        if parallel.context_mesh() is not None:  # jax.set_mesh mesh with an "expert" axis
            y, tokens_per_expert, dropped, rounds = parallel.expert_parallel_ffn(
                self.config, x, gates, expert_ids, w1, w3, w2, return_rounds=True
            )
            return y, tokens_per_expert, dropped, rounds if in_rounds else None
        y, tokens_per_expert = dropless_ffn(self.config, x, gates, expert_ids, w1, w3, w2)
        rounds = jnp.ones((), jnp.int32) if in_rounds else None
        return y, tokens_per_expert, jnp.zeros((), jnp.int32), rounds


class CapacityMoE(_MoE):
    """Token-dropping MoE with a static capacity per expert (same parameters as
    `DroplessMoE`). ``capacity_factor=0`` sizes for the worst case: drops nothing."""

    def _routed(self, x, gates, expert_ids):
        return *capacity_ffn(
            self.config, x, gates, expert_ids, *self.experts.weights(self.config.dtype)
        ), None
