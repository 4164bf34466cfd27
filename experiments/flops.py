"""Parameter counts, useful training FLOPs per token and device peaks, from a model config alone.

`param_counts` -> ``(total, active)`` parameters; `flops_per_token` -> training FLOPs of
one token (forward + backward): ``6 * matmul_params_active + 6 * layers * heads * head_dim
* seq`` (causal attention: the score and value products of the positions each query sees,
``seq / 2`` on average, 2 FLOPs per multiply-add, 3x for forward and backward);
`peak_flops` -> the dense bfloat16 peak of an accelerator, or None when unknown. MFU is
``tokens/s * flops_per_token / (devices * peak)``.
"""

from __future__ import annotations

import functools

from jmoe.transformer import TransformerConfig

# Dense bfloat16 tensor-core peaks in FLOP/s (NVIDIA datasheets; "with sparsity" halved),
# matched against ``jax.Device.device_kind`` in this order.
PEAK_BF16_FLOPS = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
)


def _attention(config: TransformerConfig) -> tuple[int, int]:
    """``(projection weights, QK-norm scales)`` of one block's attention."""
    q = config.num_heads * config.head_size
    kv = config.kv_heads * config.head_size
    norms = {None: 0, "projection": q + kv, "head": 2 * config.head_size}[config.qk_norm]
    return config.d_model * (2 * q + 2 * kv), norms


def _mlp(config: TransformerConfig, d_ff: int) -> int:
    """Weights of one MLP (an expert, shared or dense) of hidden width ``d_ff``."""
    return (3 if config.moe.expert_type == "glu" else 2) * config.d_model * d_ff


def _ffn(config: TransformerConfig, routed: bool) -> tuple[int, int]:
    """``(total, active per token)`` weights of one block's FFN (all matmuls)."""
    moe = config.moe
    mlp = functools.partial(_mlp, config)
    if not routed:
        return mlp(config.dense_d_ff), mlp(config.dense_d_ff)
    gate = config.d_model if moe.shared_expert_gate and moe.num_shared_experts else 0
    always = config.d_model * moe.num_experts + mlp(moe.shared_hidden) + gate  # router, shared
    return always + moe.num_experts * mlp(moe.d_ff), always + moe.top_k * mlp(moe.d_ff)


def ffn_params_active(config: TransformerConfig) -> int:
    """FFN weights one token multiplies by, over all blocks: router, the ``top_k``
    routed experts, shared experts (and their gate), dense MLPs."""
    routed = set(config.moe_layers)
    return sum(_ffn(config, i in routed)[1] for i in range(config.num_layers))


def block_params(config: TransformerConfig, routed: bool, expert_shards: int = 1) -> float:
    """Weights of one block's matmuls (attention, router, experts, shared and dense
    MLPs) held by one device when the routed experts are split over ``expert_shards``."""
    moe = config.moe
    total = _attention(config)[0] + _ffn(config, routed)[0]
    if not routed:
        return total
    experts = moe.num_experts * _mlp(config, moe.d_ff)
    return total - experts + experts / expert_shards


def attention_params(config: TransformerConfig) -> int:
    """Attention projection weights over all blocks."""
    return config.num_layers * _attention(config)[0]


def matmul_params_active(config: TransformerConfig) -> int:
    """Weights one token multiplies by: attention projections, the FFNs'
    (`ffn_params_active`) and the output projection (tied or not); not the
    embedding lookup or the norm scales."""
    return attention_params(config) + ffn_params_active(config) + config.vocab_size * config.d_model


def param_counts(config: TransformerConfig) -> tuple[int, int]:
    """``(total, active)`` parameters: all of them, and those one token uses
    (``top_k`` of each layer's routed experts; embeddings and norms count in both)."""
    routed = set(config.moe_layers)
    embed = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    norms = (2 * config.num_layers + 1) * config.d_model + config.num_layers * sum(
        _attention(config)
    )
    ffns = [_ffn(config, i in routed) for i in range(config.num_layers)]
    return embed + norms + sum(t for t, _ in ffns), embed + norms + sum(a for _, a in ffns)


def flops_per_token(config: TransformerConfig, seq_len: int | None = None) -> float:
    """Useful training FLOPs (forward + backward) per token at sequences of
    ``seq_len`` (default ``config.max_seq_len``); see the module docstring."""
    seq = config.max_seq_len if seq_len is None else seq_len
    attention = 6 * config.num_layers * config.num_heads * config.head_size * seq
    return 6.0 * matmul_params_active(config) + attention


def peak_flops(device_kind: str) -> float | None:
    """Dense bfloat16 peak FLOP/s of one device of ``device_kind`` (e.g.
    ``"NVIDIA H100 80GB HBM3"``), or None when not in `PEAK_BF16_FLOPS`."""
    kind = device_kind.upper()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)
