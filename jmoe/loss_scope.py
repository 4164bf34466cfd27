"""How a model combines its MoE layers' routing losses
(`TransformerConfig.load_balancing_loss_scope`).

* ``"layer_mean"`` (MegaBlocks): each layer computes its own losses; the
  model's loss is their mean over the MoE layers.
* ``"global"`` (transformers' ``load_balancing_loss_func``, Mixtral, Qwen-MoE,
  OLMoE): one balancing loss over all MoE layers' tokens pooled,
  ``E * sum_e f_e P_e`` with ``f_e`` the share of pooled rows (summed over the
  ``k`` slots) routed to ``e`` and ``P_e`` the pooled mean router probability;
  with a mask, both are taken over the real tokens only. It is ``k`` at
  perfect balance (the per-layer loss is 1), times
  ``load_balancing_loss_weight`` (transformers' ``router_aux_loss_coef``).
  The router z-loss and the sequence-wise loss are the layers' mean (the
  z-loss pooled over all layers' tokens is that mean; transformers' MoE
  models have neither).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_SCOPES = ("layer_mean", "global")


def pooled_load_balancing_loss(
    probs: jax.Array, expert_ids: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` (unweighted).

    Args:
      probs: ``[layers, tokens, E]`` router probabilities of every MoE layer.
      expert_ids: ``[layers, tokens, k]`` int chosen experts.
      mask: None or ``[tokens]`` (or ``[batch, seq]`` flattening to it): nonzero
        for real tokens; padding is left out of both means.

    Returns:
      scalar float32 ``E * sum_e f_e P_e`` (``k`` when balanced and uniform).
    """
    layers, tokens, num_experts = probs.shape
    weight = jnp.ones((tokens,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if weight.size != tokens:
        raise ValueError(
            f"mask must have {tokens} entries (one per token), got shape {weight.shape}"
        )
    weight = jnp.broadcast_to(weight.reshape(1, tokens), (layers, tokens))
    rows = jnp.sum(weight)
    ids = expert_ids.reshape(-1)
    slot_weight = jnp.repeat(weight.reshape(-1), expert_ids.shape[-1])
    counts = jnp.zeros((num_experts,), jnp.float32).at[ids].add(slot_weight)  # [E]
    mean_probs = jnp.einsum("lt,lte->e", weight, probs.astype(jnp.float32)) / rows
    return num_experts * jnp.dot(counts / rows, mean_probs)


def combine_losses(
    layer_aux: list[dict],
    moe_layers: tuple[int, ...],
    scope: str,
    balance_weight: float,
    mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """``load_balancing_loss``, ``router_z_loss`` and ``sequence_aux_loss`` of a
    model from its blocks' aux dicts (dense blocks' losses are zero).

    Args:
      layer_aux: one aux dict per block; the routed ones (``moe_layers``)
        carry ``router_probs [tokens, E]`` and ``expert_ids [tokens, k]``.
      scope: one of `LOSS_SCOPES`.
      balance_weight: ``load_balancing_loss_weight`` (``"global"`` applies it).
      mask: ``"global"`` only: the real tokens (see `pooled_load_balancing_loss`).
    """
    if scope not in LOSS_SCOPES:
        raise ValueError(f"load_balancing_loss_scope must be one of {LOSS_SCOPES}, got {scope!r}")
    count = max(1, len(moe_layers))
    mean = lambda key: sum(aux[key] for aux in layer_aux) / count
    balance = mean("load_balancing_loss")
    if scope == "global":
        balance = jnp.zeros((), jnp.float32)
        if moe_layers and balance_weight:
            routed = [layer_aux[i] for i in moe_layers]
            balance = balance_weight * pooled_load_balancing_loss(
                jnp.stack([aux["router_probs"] for aux in routed]),
                jnp.stack([aux["expert_ids"] for aux in routed]),
                mask,
            )
    elif mask is not None:
        raise ValueError(
            "mask: only load_balancing_loss_scope='global' takes a mask here "
            "(each layer computes its own 'layer_mean' losses)"
        )
    return {
        "load_balancing_loss": balance,
        "router_z_loss": mean("router_z_loss"),
        "sequence_aux_loss": mean("sequence_aux_loss"),
    }
