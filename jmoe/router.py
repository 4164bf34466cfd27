"""Top-k routing: logits -> scores -> (weights, expert indices), and the aux losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.config import MoEConfig


def _router_init():
    return nnx.initializers.normal(stddev=0.02)


def select_experts(logits: jax.Array, config: MoEConfig):
    """Chooses ``top_k`` experts per token.

    Args:
      logits: ``[tokens, E]`` float32 router logits.
      config: routing options (score function, normalisation, uniform mode).

    Returns:
      ``(weights [tokens, k] float32, indices [tokens, k] int32,
      probs [tokens, E] float32)``; ``probs`` are the per-token expert
      probabilities the load-balancing loss averages (for sigmoid scoring, the
      scores normalised to sum to one).
    """
    if config.score_function == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    weights, indices = jax.lax.top_k(scores, config.top_k)
    if config.uniform_expert_assignment:
        tokens = logits.shape[0]
        flat = jnp.arange(tokens * config.top_k, dtype=jnp.int32) % config.num_experts
        indices = flat.reshape(tokens, config.top_k)
        weights = jnp.take_along_axis(scores, indices, axis=-1)
    if config.normalize_top_k is not None:
        norm = jnp.linalg.norm(weights, ord=config.normalize_top_k, axis=-1, keepdims=True)
        weights = weights / norm
    return weights, indices.astype(jnp.int32), probs


def load_balancing_loss(probs: jax.Array, tokens_per_expert: jax.Array, top_k: int):
    """Switch/MegaBlocks loss ``E / (T k) * dot(tokens_per_expert, mean_t(probs))``.

    Equals 1 for perfectly balanced routing with uniform probabilities.
    ``probs``: ``[tokens, E]``; ``tokens_per_expert``: ``[E]`` counts.
    """
    tokens, num_experts = probs.shape
    mean_probs = jnp.mean(probs, axis=0)
    scale = num_experts / (tokens * top_k)
    return scale * jnp.dot(tokens_per_expert.astype(jnp.float32), mean_probs)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss ``mean_t(logsumexp(logits)^2)`` of ``[tokens, E]`` logits."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def routing_aux(config: MoEConfig, logits, probs, tokens_per_expert, dropped_tokens,
                ep_rounds=None):
    """The aux dict every MoE layer returns (losses already weighted).

    ``ep_rounds`` (expert-parallel exchange rounds, `DroplessMoE` with
    ``ep_buffer_factor``) is added as an int32 scalar when not None, so the
    keys depend on the config only, never on the mesh.
    """
    aux = {
        "load_balancing_loss": config.load_balancing_loss_weight
        * load_balancing_loss(probs, tokens_per_expert, config.top_k),
        "router_z_loss": config.router_z_loss_weight * router_z_loss(logits),
        "tokens_per_expert": tokens_per_expert.astype(jnp.int32),
        "dropped_tokens": jnp.asarray(dropped_tokens, jnp.int32),
    }
    if ep_rounds is not None:
        aux["ep_rounds"] = jnp.asarray(ep_rounds, jnp.int32)
    return aux


class Router(nnx.Module):
    """Linear router ``logits = x @ kernel`` with ``kernel [d_model, E]``.

    Computes in float32 whatever the layer's dtype (as Mixtral does). With
    ``router_jitter_eps > 0`` and not in eval mode (``model.eval()`` sets
    ``deterministic``), the input is multiplied by ``U(1-eps, 1+eps)`` noise
    drawn from the ``jitter`` rng stream.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.kernel = nnx.Param(
            _router_init()(rngs.params(), (config.d_model, config.num_experts),
                           config.param_dtype))
        self.deterministic = False
        self.jitter_rngs = rngs.fork() if config.router_jitter_eps > 0 else None

    def __call__(self, x: jax.Array):
        """``x [tokens, d_model]`` -> ``(weights, indices, probs, logits)``."""
        x = x.astype(jnp.float32)
        eps = self.config.router_jitter_eps
        if eps > 0 and not self.deterministic:
            noise = jax.random.uniform(self.jitter_rngs.jitter(), x.shape, jnp.float32,
                                       1.0 - eps, 1.0 + eps)
            x = x * noise
        logits = x @ self.kernel.get_value().astype(jnp.float32)
        weights, indices, probs = select_experts(logits, self.config)
        return weights, indices, probs, logits
