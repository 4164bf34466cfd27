"""Where the experts live on the ``"expert"`` axis, and how many rows a rank can receive.

Hidden sharding (MegaBlocks): with fewer experts than ``"expert"`` ranks
(``ep = s * E``), each expert's ``d_ff`` is split into ``s`` slices, giving
``ep`` virtual experts of width ``d_ff / s``, one per rank; a token routed to
expert ``e`` goes to all of ``e``'s slices with the same weight and the slice
outputs add up (the activation is elementwise over ``d_ff``, so this is exact).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jmoe.config import MoEConfig
from pallas_kernels.backend import ExpertWeights


@dataclasses.dataclass(frozen=True)
class ExpertSharding:
    """How ``E`` experts map onto the ``ep`` ranks of the ``"expert"`` axis.

    ``hidden_splits`` (``s``) is 1 when ``ep`` divides ``E`` and ``ep / E``
    when ``E`` divides ``ep`` (hidden sharding); virtual expert ``e*s + h`` is
    slice ``h`` of expert ``e``'s hidden units.
    """

    num_experts: int
    num_ranks: int
    hidden_splits: int

    @classmethod
    def create(cls, config: MoEConfig, num_ranks: int) -> ExpertSharding:
        experts = config.num_experts
        if experts % num_ranks == 0:
            return cls(experts, num_ranks, 1)
        if num_ranks % experts:
            raise ValueError(
                f"num_experts={experts} must be a multiple of the 'expert' mesh axis size "
                f"{num_ranks}, or divide it (hidden sharding)"
            )
        splits = num_ranks // experts
        if config.d_ff % splits:
            raise ValueError(
                f"hidden sharding splits each expert's d_ff={config.d_ff} over {splits} "
                f"ranks ('expert' axis {num_ranks} / num_experts {experts}): d_ff must be "
                f"divisible by {splits}"
            )
        try:
            config.replace(d_ff=config.d_ff // splits)
        except ValueError as error:
            raise ValueError(f"hidden sharding: d_ff / {splits} is not usable: {error}") from None
        return cls(experts, num_ranks, splits)

    @property
    def num_virtual(self) -> int:
        return self.num_experts * self.hidden_splits

    @property
    def num_local(self) -> int:
        return self.num_virtual // self.num_ranks

    def split_weights(self, weights: ExpertWeights) -> ExpertWeights:
        """``w1 [E, d, F]``, ``w3`` (same or None), ``w2 [E, F, d]`` ->
        ``[E*s, d, F/s]``, same or None, ``[E*s, F/s, d]``."""
        s = self.hidden_splits
        if s == 1:
            return weights
        w1, w3, w2 = weights

        def split_columns(w):
            experts, d_model, d_ff = w.shape
            w = w.reshape(experts, d_model, s, d_ff // s).transpose(0, 2, 1, 3)
            return w.reshape(experts * s, d_model, d_ff // s)

        experts, d_ff, d_model = w2.shape
        return ExpertWeights(
            split_columns(w1),
            None if w3 is None else split_columns(w3),
            w2.reshape(experts * s, d_ff // s, d_model),
        )

    def split_routing(self, gates: jax.Array, expert_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[T, k]`` -> ``[T, k*s]``: assignment ``(t, e)`` becomes every
        ``(t, e*s + h)``, with the same gate."""
        s = self.hidden_splits
        if s == 1:
            return gates, expert_ids
        tokens, top_k = expert_ids.shape
        virtual = expert_ids[:, :, None] * s + jnp.arange(s, dtype=expert_ids.dtype)
        return jnp.repeat(gates, s, axis=1), virtual.reshape(tokens, top_k * s)

    def capacity(self, local_tokens: int, top_k: int, capacity_factor: float | None) -> int:
        """Static receive-buffer rows per rank: the worst case, or
        ``ceil(c * T_local * k * s)`` (what a rank sends) for a capacity factor ``c``."""
        virtual_k = top_k * self.hidden_splits
        worst = self.num_ranks * local_tokens * min(virtual_k, self.num_local)
        if capacity_factor is None:
            return worst
        return min(worst, max(1, math.ceil(capacity_factor * local_tokens * virtual_k)))
