"""One validated dataclass configures every FFN layer jmoe builds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from pallas_kernels.products import IMPLS, size_rule

EXPERT_TYPES = ("mlp", "glu")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
BLOCK_SIZES = (32, 64, 128)
EP_EXCHANGES = ("auto", "ragged", "padded")


def require(condition: bool, message: str) -> None:
    """Raises ``ValueError(message)`` unless ``condition`` (config validation)."""
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Configuration of `DroplessMoE`, `CapacityMoE` and `DenseMLP`.

    Attributes:
      d_model: model width.
      d_ff: hidden width of each expert (of the dense MLP for `DenseMLP`).
      num_experts: number of routed experts ``E``.
      top_k: experts per token ``k`` (``1 <= k <= E``).
      expert_type: ``"mlp"`` (GeLU, ``w1``/``w2``) or ``"glu"`` (SwiGLU,
        ``w1`` gate, ``w3`` up, ``w2`` down).
      score_function: ``"softmax"`` over all experts (Mixtral, Qwen3, OLMoE)
        or ``"sigmoid"`` per expert (DeepSeek-V3).
      normalize_top_k: ``None`` keeps the top-k scores as they are; a number
        ``p`` divides them by their p-norm (1.0 reproduces Mixtral's
        renormalisation; MegaBlocks' ``moe_normalize_expert_weights``).
      router_jitter_eps: multiplies the router input by ``U(1-eps, 1+eps)`` in
        training mode (needs an ``rngs.jitter`` stream); 0 disables it.
      uniform_expert_assignment: route assignment ``i`` of the flattened
        ``[tokens, top_k]`` to expert ``i mod E`` (for benchmarking).
      capacity_factor: `CapacityMoE` only. Capacity per expert is
        ``int(capacity_factor * top_k * tokens / E)``; 0 means the static
        worst case (``tokens``), which drops nothing.
      ep_capacity_factor: `DroplessMoE` under expert parallelism only. None
        (default) sizes each rank's receive buffer for the worst case, so no
        token is dropped; ``c > 0`` bounds it to ``ceil(c * T_local * top_k)``
        rows (times the hidden splits) to save memory, and assignments past it
        are dropped and counted in ``aux["dropped_tokens"]`` (see `jmoe.parallel`).
      ep_buffer_factor: `DroplessMoE` under expert parallelism only. None
        (default): one exchange with the worst-case buffer (or
        ``ep_capacity_factor``'s). ``f > 0`` bounds each rank's receive buffer
        to ``ceil(f * T_local * top_k)`` rows (times the hidden splits) and
        exchanges in as many rounds as the routing needs, dropping nothing;
        ``aux["ep_rounds"]`` reports the rounds (docs/expert_parallel_rounds.md).
        Exclusive with ``ep_capacity_factor``.
      ep_exchange: `DroplessMoE` under expert parallelism only: how token rows
        move between ranks. ``"auto"`` (default): ``ragged_all_to_all`` on
        GPU/TPU, the padded ``all_to_all`` elsewhere; ``"ragged"`` or
        ``"padded"`` force one (``"padded"`` works around a misbehaving
        ragged all-to-all; docs/expert_parallel.md).
      block_size: rows per block of the block-sparse layout (32, 64 or 128).
      load_balancing_loss_weight: weight of the Switch/MegaBlocks loss
        ``E / (T k) * dot(tokens_per_expert, mean_t(probs))``.
      router_z_loss_weight: weight of ``mean_t(logsumexp(logits)^2)``.
      num_shared_experts: experts every token goes through (DeepSeek, Qwen2);
        they form one MLP of hidden width ``num_shared_experts * shared_d_ff``.
      shared_d_ff: hidden width of one shared expert (default ``d_ff``).
      shared_expert_gate: scale the shared output by ``sigmoid(x @ gate)``
        (Qwen2-MoE) instead of adding it unweighted (DeepSeek).
      num_expert_groups: ``G``: group-limited routing (DeepSeek-V3) splits the
        experts into ``G`` equal groups of consecutive ids; 1 disables it.
      top_k_groups: groups a token may route to: those with the largest sum
        of their two highest selection scores (``1 <= top_k_groups <= G``).
      routed_scaling_factor: multiplies the final top-k weights (after the
        optional renormalisation); DeepSeek-V3 uses 2.5.
      expert_bias: aux-loss-free balancing (DeepSeek-V3): a float32 bias
        ``router.expert_bias [E]`` (an `ExpertBias`, not an ``nnx.Param``)
        added to the scores to choose the experts only; the weights use the
        unbiased scores. Move it with `jmoe.update_expert_bias`.
      expert_bias_update_rate: ``gamma`` of the bias update
        ``b_e += gamma * sign(mean_load - load_e)``.
      sequence_aux_loss_weight: weight of DeepSeek-V3's sequence-wise balance
        loss (``aux["sequence_aux_loss"]``; see `jmoe.router.sequence_aux_loss`).
      dtype: compute dtype of the expert products (float32, bfloat16, float16).
        The router always computes in float32.
      param_dtype: dtype of the parameters.
      impl: product kernels: ``"auto"``, ``"xla"``, ``"ragged_dot"``,
        ``"triton"`` or ``"mosaic"`` (see `pallas_kernels.products` and
        docs/gpu.md). An explicit impl's size rule is checked here:
        ``"triton"`` needs ``d_model`` and ``d_ff`` multiples of
        ``block_size``, ``"mosaic"`` multiples of 64. ``"auto"`` on an NVIDIA
        GPU needs ``dtype`` bfloat16 or float16.
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    top_k: int = 2
    expert_type: str = "mlp"
    score_function: str = "softmax"
    normalize_top_k: float | None = None
    router_jitter_eps: float = 0.0
    uniform_expert_assignment: bool = False
    capacity_factor: float = 1.0
    ep_capacity_factor: float | None = None
    ep_buffer_factor: float | None = None
    ep_exchange: str = "auto"
    block_size: int = 128
    load_balancing_loss_weight: float = 0.1
    router_z_loss_weight: float = 0.0
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    num_expert_groups: int = 1
    top_k_groups: int = 1
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    sequence_aux_loss_weight: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value >= 1,
                f"{name} must be a positive int, got {value!r}",
            )
        require(
            self.top_k <= self.num_experts,
            f"top_k must be <= num_experts={self.num_experts}, got {self.top_k}",
        )
        require(
            self.expert_type in EXPERT_TYPES,
            f"expert_type must be one of {EXPERT_TYPES}, got {self.expert_type!r}",
        )
        require(
            self.score_function in SCORE_FUNCTIONS,
            f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}",
        )
        require(
            self.normalize_top_k is None or self.normalize_top_k > 0,
            f"normalize_top_k must be None or a p > 0, got {self.normalize_top_k!r}",
        )
        require(
            0.0 <= self.router_jitter_eps < 1.0,
            f"router_jitter_eps must be in [0, 1), got {self.router_jitter_eps}",
        )
        require(
            self.capacity_factor >= 0, f"capacity_factor must be >= 0, got {self.capacity_factor}"
        )
        require(
            self.ep_capacity_factor is None or self.ep_capacity_factor > 0,
            f"ep_capacity_factor must be None or > 0, got {self.ep_capacity_factor!r}",
        )
        require(
            self.ep_buffer_factor is None or self.ep_buffer_factor > 0,
            f"ep_buffer_factor must be None or > 0, got {self.ep_buffer_factor!r}",
        )
        require(
            self.ep_buffer_factor is None or self.ep_capacity_factor is None,
            f"ep_buffer_factor={self.ep_buffer_factor} (bounded buffer, no drop) and "
            f"ep_capacity_factor={self.ep_capacity_factor} (bounded buffer, drops) are "
            "exclusive: set at most one of them",
        )
        require(
            self.ep_exchange in EP_EXCHANGES,
            f"ep_exchange must be one of {EP_EXCHANGES}, got {self.ep_exchange!r}",
        )
        require(
            self.block_size in BLOCK_SIZES,
            f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}",
        )
        require(self.impl in IMPLS, f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.impl != "auto":  # "auto" is checked by the kernel it resolves to
            multiple, rule = size_rule(self.impl, self.block_size)
            require(
                self.d_ff % multiple == 0 and self.d_model % multiple == 0,
                f"impl={self.impl!r} needs d_ff and d_model to be multiples of {rule}, "
                f"got d_ff={self.d_ff}, d_model={self.d_model}",
            )
        require(
            self.num_shared_experts >= 0,
            f"num_shared_experts must be >= 0, got {self.num_shared_experts}",
        )
        require(
            self.shared_d_ff is None or self.shared_d_ff >= 1,
            f"shared_d_ff must be None or positive, got {self.shared_d_ff}",
        )
        self._check_deepseek_routing()
        for name in ("dtype", "param_dtype"):
            dtype = jnp.dtype(getattr(self, name))
            require(
                jnp.issubdtype(dtype, jnp.floating), f"{name} must be a floating dtype, got {dtype}"
            )

    def _check_deepseek_routing(self):
        groups = self.num_expert_groups
        require(
            isinstance(groups, int) and groups >= 1,
            f"num_expert_groups must be a positive int, got {groups!r}",
        )
        require(
            self.num_experts % groups == 0,
            f"num_expert_groups must divide num_experts={self.num_experts}, got {groups}",
        )
        per_group = self.num_experts // groups
        require(
            groups == 1 or per_group >= 2,
            f"num_expert_groups={groups} leaves {per_group} expert per group; a group's "
            f"score sums its top 2, so num_experts / num_expert_groups must be >= 2",
        )
        require(
            isinstance(self.top_k_groups, int) and 1 <= self.top_k_groups <= groups,
            f"top_k_groups must be an int in [1, num_expert_groups={groups}], "
            f"got {self.top_k_groups!r}",
        )
        require(
            self.top_k <= self.top_k_groups * per_group,
            f"top_k={self.top_k} must be <= top_k_groups * num_experts / num_expert_groups"
            f" = {self.top_k_groups * per_group} (the experts of the eligible groups)",
        )
        require(
            self.routed_scaling_factor > 0,
            f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}",
        )
        require(
            self.expert_bias_update_rate >= 0,
            f"expert_bias_update_rate must be >= 0, got {self.expert_bias_update_rate}",
        )
        require(
            self.sequence_aux_loss_weight >= 0,
            f"sequence_aux_loss_weight must be >= 0, got {self.sequence_aux_loss_weight}",
        )

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the fused shared-expert MLP (0 without one)."""
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)
