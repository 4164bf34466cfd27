"""Top-k routing: logits -> scores -> (gates, expert ids), and the aux losses."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jmoe.config import MoEConfig


class RouterOutput(NamedTuple):
    """What `Router` returns for ``tokens`` input rows.

    Attributes:
      gates: ``[tokens, k]`` float32 weight of each chosen expert's output.
      expert_ids: ``[tokens, k]`` int32 chosen experts.
      probs: ``[tokens, E]`` float32 expert probabilities the load-balancing
        losses average (see `select_experts`).
      logits: ``[tokens, E]`` float32 router logits.
    """

    gates: jax.Array
    expert_ids: jax.Array
    probs: jax.Array
    logits: jax.Array


def _router_init():
    return nnx.initializers.normal(stddev=0.02)


class ExpertBias(nnx.Variable):
    """Aux-loss-free balancing bias ``[E]`` float32 (DeepSeek-V3).

    Not an ``nnx.Param``: ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``
    skip it; `update_expert_bias` moves it. It is part of ``nnx.state(model)``,
    so checkpoints of the full state save and restore it.
    """


def _group_mask(choice: jax.Array, config: MoEConfig) -> jax.Array:
    """``[tokens, E]`` bool: the experts of each token's ``top_k_groups`` best
    groups, a group scoring the sum of its two highest ``choice`` scores (ties
    go to the lower group id)."""
    tokens, num_experts = choice.shape
    groups = config.num_expert_groups
    grouped = choice.reshape(tokens, groups, num_experts // groups)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [tokens, G]
    _, best = jax.lax.top_k(group_scores, config.top_k_groups)
    keep = jnp.any(best[..., None] == jnp.arange(groups), axis=-2)  # [tokens, G]
    return jnp.repeat(keep, num_experts // groups, axis=-1)


def select_experts(
    logits: ArrayLike, config: MoEConfig, bias: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chooses ``top_k`` experts per token.

    Selection ranks ``scores + bias`` (``bias [E]``, aux-loss-free balancing)
    among the experts of the ``top_k_groups`` best groups (group-limited
    routing, ``num_expert_groups > 1``); the gates are the unbiased scores
    of the chosen experts, optionally p-norm renormalised, times
    ``routed_scaling_factor``. Ties go to the lower expert id.

    Args:
      logits: ``[tokens, E]`` float32 router logits.
      config: routing options (score function, groups, normalisation,
        scaling, uniform mode).
      bias: None or ``[E]`` float32 selection bias.

    Returns:
      ``(gates [tokens, k] float32, expert_ids [tokens, k] int32,
      probs [tokens, E] float32)``; ``probs`` are the per-token expert
      probabilities the load-balancing losses average (for sigmoid scoring, the
      scores normalised to sum to one).
    """
    logits = jnp.asarray(logits)
    if config.score_function == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    choice = jax.lax.stop_gradient(scores if bias is None else scores + bias)
    if config.num_expert_groups > 1:
        choice = jnp.where(_group_mask(choice, config), choice, -jnp.inf)
    _, expert_ids = jax.lax.top_k(choice, config.top_k)
    if config.uniform_expert_assignment:
        tokens = logits.shape[0]
        flat = jnp.arange(tokens * config.top_k, dtype=jnp.int32) % config.num_experts
        expert_ids = flat.reshape(tokens, config.top_k)
    gates = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if config.normalize_top_k is not None:
        norm = jnp.linalg.norm(gates, ord=config.normalize_top_k, axis=-1, keepdims=True)
        gates = gates / norm
    if config.routed_scaling_factor != 1.0:
        gates = gates * config.routed_scaling_factor
    return gates, expert_ids.astype(jnp.int32), probs


def _token_weights(tokens: int, mask: ArrayLike | None) -> jax.Array:
    """``[tokens] float32``: 1 for real tokens (``mask`` True or None), 0 for masked."""
    if mask is None:
        return jnp.ones((tokens,), jnp.float32)
    return jnp.asarray(mask, jnp.float32).reshape(tokens)


def load_balancing_loss(
    probs: ArrayLike, tokens_per_expert: ArrayLike, top_k: int, mask: ArrayLike | None = None
) -> jax.Array:
    """Switch/MegaBlocks loss ``E / (T k) * dot(tokens_per_expert, mean_t(probs))``.

    Equals 1 for perfectly balanced routing with uniform probabilities.
    ``probs``: ``[tokens, E]``; ``tokens_per_expert``: ``[E]`` counts;
    ``mask``: None or ``[tokens]`` bool, only True tokens count in ``T`` and
    the mean (0 when none is).
    """
    probs = jnp.asarray(probs)
    tokens, num_experts = probs.shape
    weights = _token_weights(tokens, mask)
    real = jnp.maximum(jnp.sum(weights), 1.0)
    mean_probs = jnp.sum(weights[:, None] * probs, axis=0) / real  # no [E, T] transpose
    scale = num_experts / (real * top_k)
    return scale * jnp.dot(jnp.asarray(tokens_per_expert, jnp.float32), mean_probs)


def router_z_loss(logits: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    """ST-MoE z-loss ``mean_t(logsumexp(logits)^2)`` of ``[tokens, E]`` logits
    (the mean over the True tokens of a ``[tokens]`` bool ``mask``; 0 if none)."""
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    weights = _token_weights(z.shape[0], mask)
    return weights @ z / jnp.maximum(jnp.sum(weights), 1.0)


def sequence_aux_loss(
    probs: ArrayLike,
    expert_ids: ArrayLike,
    num_sequences: int = 1,
    mask: ArrayLike | None = None,
) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss, unweighted.

    The ``tokens`` rows form ``num_sequences`` consecutive sequences of
    ``T_seq`` tokens. Per sequence, ``f_e = E / (k T_seq) * (assignments to
    e)`` and ``P_e = mean over its tokens of probs[:, e]``; returns the mean
    over sequences of ``sum_e f_e P_e`` (1 when balanced and uniform). With a
    ``mask``, only its True tokens count (in ``T_seq``, the assignments and
    the mean) and sequences without any are left out of the mean.

    Args:
      probs: ``[tokens, E]`` normalised scores.
      expert_ids: ``[tokens, k]`` chosen experts (``E`` for none).
      num_sequences: divides ``tokens``.
      mask: None or ``[tokens]`` bool, True for real tokens.
    """
    probs, expert_ids = jnp.asarray(probs), jnp.asarray(expert_ids)
    tokens, num_experts = probs.shape
    top_k = expert_ids.shape[-1]
    weights = _token_weights(tokens, mask).reshape(num_sequences, -1)  # [S, T_seq]
    by_sequence = lambda a: a.reshape(num_sequences, -1, num_experts)  # [S, T_seq, E]
    chosen = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)  # id E: no expert
    counts = jnp.sum(weights[..., None] * by_sequence(jnp.sum(chosen, axis=1)), axis=1)
    real = jnp.sum(weights, axis=1)  # [S]
    mean_probs = jnp.sum(weights[..., None] * by_sequence(probs), axis=1)
    mean_probs = mean_probs / jnp.maximum(real, 1.0)[:, None]
    f = num_experts / top_k * counts / jnp.maximum(real, 1.0)[:, None]
    present = (real > 0).astype(jnp.float32)
    return present @ jnp.sum(f * mean_probs, axis=-1) / jnp.maximum(jnp.sum(present), 1.0)


def routing_aux(
    config: MoEConfig,
    logits: ArrayLike,
    probs: ArrayLike,
    tokens_per_expert: ArrayLike,
    dropped_tokens: ArrayLike,
    expert_ids: ArrayLike | None = None,
    num_sequences: int = 1,
    ep_rounds: ArrayLike | None = None,
    mask: ArrayLike | None = None,
) -> dict[str, jax.Array]:
    """The aux dict every MoE layer returns (losses already weighted).

    ``expert_ids [tokens, k]`` and ``num_sequences`` (the ``tokens`` rows form
    that many consecutive sequences) feed the sequence-wise loss; ``expert_ids``
    may be None when ``sequence_aux_loss_weight`` is 0. ``ep_rounds``
    (expert-parallel exchange rounds, `DroplessMoE` with ``ep_buffer_factor``)
    is added as an int32 scalar when not None, so the keys depend on the
    config only, never on the mesh. ``mask`` (None or ``[tokens]`` bool): the
    losses average over its True tokens only.
    """
    sequence_loss = jnp.zeros((), jnp.float32)
    if config.sequence_aux_loss_weight > 0:
        if expert_ids is None:
            raise ValueError("routing_aux needs expert_ids when sequence_aux_loss_weight > 0")
        sequence_loss = config.sequence_aux_loss_weight * sequence_aux_loss(
            probs, expert_ids, num_sequences, mask
        )
    aux = {
        "load_balancing_loss": config.load_balancing_loss_weight
        * load_balancing_loss(probs, tokens_per_expert, config.top_k, mask),
        "router_z_loss": config.router_z_loss_weight * router_z_loss(logits, mask),
        "sequence_aux_loss": sequence_loss,
        "tokens_per_expert": jnp.asarray(tokens_per_expert, jnp.int32),
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

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.kernel = nnx.Param(
            _router_init()(rngs.params(), (config.d_model, config.num_experts), config.param_dtype)
        )
        self.deterministic = False
        self.jitter_rngs = rngs.fork() if config.router_jitter_eps > 0 else None
        self.expert_bias = (
            ExpertBias(jnp.zeros((config.num_experts,), jnp.float32))
            if config.expert_bias
            else None
        )

    def __call__(self, x: ArrayLike) -> RouterOutput:
        """``x [tokens, d_model]`` -> ``(gates, expert_ids, probs, logits)``."""
        x = jnp.asarray(x, jnp.float32)
        eps = self.config.router_jitter_eps
        if eps > 0 and not self.deterministic:
            noise = jax.random.uniform(
                self.jitter_rngs.jitter(), x.shape, jnp.float32, 1.0 - eps, 1.0 + eps
            )
            x = x * noise
        logits = x @ self.kernel.get_value().astype(jnp.float32)
        bias = None if self.expert_bias is None else self.expert_bias.get_value()
        return RouterOutput(*select_experts(logits, self.config, bias), logits)


def expert_bias_update(bias: ArrayLike, tokens_per_expert: ArrayLike, rate: float) -> jax.Array:
    """``bias + rate * sign(mean_load - load)`` over the last axis (``[..., E]``):
    experts above the mean load move down by ``rate``, those below move up."""
    load = jnp.asarray(tokens_per_expert, jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_expert_bias(model: nnx.Module, aux: dict) -> None:
    """Aux-loss-free balancing step: moves every ``router.expert_bias`` of
    ``model`` (in place) from the step's ``aux["tokens_per_expert"]``.

    Call it once per training step, after the optimizer update, with the aux
    of that step's forward pass (it works inside ``nnx.jit``). ``model`` is a
    MoE layer (``tokens_per_expert [E]``) or a model whose biased routers, in
    `nnx.iter_modules` order, match the rows of ``tokens_per_expert [L, E]``
    (`jmoe.transformer.MoETransformer`); a router stacked by ``scan_layers``
    (bias ``[groups, E]``) takes that many consecutive rows. Under expert
    parallelism the layers' counts are already summed over the mesh, so every
    replica applies the same update. No-op for a model without expert bias.
    """
    routers = [
        m for _, m in nnx.iter_modules(model) if isinstance(m, Router) and m.expert_bias is not None
    ]
    if not routers:
        return
    counts = jnp.asarray(aux["tokens_per_expert"])
    counts = counts.reshape(-1, counts.shape[-1])
    rows = [r.expert_bias.get_value().size // r.config.num_experts for r in routers]
    if counts.shape != (sum(rows), routers[0].config.num_experts):
        raise ValueError(
            f"aux['tokens_per_expert'] must have one row of "
            f"{routers[0].config.num_experts} counts per biased router layer "
            f"({sum(rows)}), got shape {tuple(counts.shape)}"
        )
    first = 0
    for router, n in zip(routers, rows):
        bias = router.expert_bias.get_value()
        layer_counts = counts[first : first + n].reshape(bias.shape)
        first += n
        router.expert_bias.set_value(
            expert_bias_update(bias, layer_counts, router.config.expert_bias_update_rate)
        )


def expert_biases(model: nnx.Module) -> jax.Array | None:
    """``[L, E]`` float32: the ``router.expert_bias`` of every biased router of
    ``model`` in `nnx.iter_modules` order (stacked ones row by row), or None if it has none."""
    biases = [
        m.expert_bias.get_value().reshape(-1, m.config.num_experts)
        for _, m in nnx.iter_modules(model)
        if isinstance(m, Router) and m.expert_bias is not None
    ]
    return jnp.concatenate(biases) if biases else None
