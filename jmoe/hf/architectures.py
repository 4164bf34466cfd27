"""What differs between the Hugging Face MoE architectures jmoe reads and writes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One ``config.json`` ``model_type``.

    Attributes:
      model_type, class_name: ``config.json``'s ``model_type`` and ``architectures[0]``.
      moe_prefix: module of a layer's MoE block in the per-expert layout
        (``model.layers.L.<moe_prefix>.gate.weight``); the fused layout
        always uses ``mlp``.
      expert_names: per-expert tensor names of the gate, up and down
        projections (``<moe_prefix>.experts.{i}.<name>.weight``).
      qk_norm: jmoe's `TransformerConfig.qk_norm` for this architecture.
      d_ff_key: ``config.json`` key of the per-expert hidden width.
      experts_keys: keys the number of experts may be stored under (the
        first is written; transformers 5 writes Qwen3-MoE's as
        ``num_local_experts``, Hub checkpoints as ``num_experts``).
      always_renormalize: the top-k weights are always renormalised (Mixtral);
        otherwise ``norm_topk_prob`` decides.
      has_head_dim: ``config.json`` may set ``head_dim`` (else it is
        ``hidden_size / num_attention_heads``).
      default_rope_theta: RoPE base when ``config.json`` names none.
      dense_layers: how ``config.json`` names the dense-MLP blocks:
        ``"qwen"`` (``mlp_only_layers`` and ``decoder_sparse_step``),
        ``"deepseek"`` (the first ``first_k_dense_replace``) or None (none).
      shared_expert: module of the shared expert(s) in the MoE block, or None.
      shared_expert_gate: module of the shared expert's sigmoid gate, or None.
      latent_attention: multi-head latent attention (`jmoe.mla`).
    """

    model_type: str
    class_name: str
    moe_prefix: str
    expert_names: tuple[str, str, str]
    qk_norm: str | None
    d_ff_key: str
    experts_keys: tuple[str, ...]
    always_renormalize: bool
    has_head_dim: bool
    default_rope_theta: float
    dense_layers: str | None = None
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    latent_attention: bool = False


ARCHITECTURES = {
    arch.model_type: arch
    for arch in (
        Architecture(
            "mixtral",
            "MixtralForCausalLM",
            "block_sparse_moe",
            ("w1", "w3", "w2"),
            None,
            "intermediate_size",
            ("num_local_experts",),
            True,
            True,
            1e6,
        ),
        Architecture(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "head",
            "moe_intermediate_size",
            ("num_experts", "num_local_experts"),
            False,
            True,
            10_000.0,
            dense_layers="qwen",
        ),
        Architecture(
            "olmoe",
            "OlmoeForCausalLM",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "projection",
            "intermediate_size",
            ("num_experts",),
            False,
            False,
            10_000.0,
        ),
        Architecture(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            None,
            "moe_intermediate_size",
            ("num_experts",),
            False,
            False,
            10_000.0,
            dense_layers="qwen",
            shared_expert="shared_expert",
            shared_expert_gate="shared_expert_gate",
        ),
        Architecture(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            None,
            "moe_intermediate_size",
            ("n_routed_experts", "num_local_experts"),
            False,
            False,
            10_000.0,
            dense_layers="deepseek",
            shared_expert="shared_experts",
            latent_attention=True,
        ),
    )
}
MODEL_TYPES = tuple(ARCHITECTURES)
