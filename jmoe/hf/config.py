"""``config.json`` of a Hugging Face MoE model <-> `TransformerConfig`."""

from __future__ import annotations

import jax.numpy as jnp

from jmoe.config import MoEConfig
from jmoe.hf import families
from jmoe.hf.architectures import ARCHITECTURES, MODEL_TYPES, Architecture
from jmoe.transformer import TransformerConfig


def _refuse(condition: bool, message: str):
    if condition:
        raise ValueError(f"config.json: {message}")


def architecture(hf: dict) -> Architecture:
    """The `Architecture` of ``config.json``'s ``model_type`` (refuses others)."""
    model_type = hf.get("model_type")
    _refuse(
        model_type not in ARCHITECTURES,
        f"model_type must be one of {MODEL_TYPES}, got {model_type!r}",
    )
    return ARCHITECTURES[model_type]


def _rope_theta(hf: dict, arch: Architecture) -> float:
    params = hf.get("rope_parameters") or {}
    for key in ("rope_parameters", "rope_scaling"):
        rope_type = (hf.get(key) or {}).get("rope_type", (hf.get(key) or {}).get("type"))
        if arch.latent_attention and rope_type == "yarn":  # read by families.yarn_of
            continue
        _refuse(
            rope_type not in (None, "default"),
            f"{key}.rope_type must be 'default' (no RoPE scaling), got {rope_type!r}",
        )
    return float(params.get("rope_theta", hf.get("rope_theta", arch.default_rope_theta)))


def _refuse_unsupported(hf: dict, arch: Architecture):
    """Options of these architectures jmoe does not implement."""
    _refuse(
        hf.get("hidden_act", "silu") != "silu",
        f"hidden_act must be 'silu', got {hf.get('hidden_act')!r}",
    )
    _refuse(bool(hf.get("attention_bias")), "attention_bias=true is not supported")
    _refuse(hf.get("clip_qkv") is not None, f"clip_qkv must be null, got {hf.get('clip_qkv')!r}")
    _refuse(
        arch.dense_layers != "qwen" and bool(hf.get("mlp_only_layers")),
        f"mlp_only_layers must be empty (every layer an MoE), got {hf.get('mlp_only_layers')}",
    )
    _refuse(
        arch.dense_layers != "qwen" and hf.get("decoder_sparse_step", 1) != 1,
        f"decoder_sparse_step must be 1, got {hf.get('decoder_sparse_step')}",
    )
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch.model_type == "mixtral")
    _refuse(
        uses_window
        and window is not None
        and window < hf.get("max_position_embeddings", window + 1),
        f"sliding_window attention is not supported, got sliding_window={window}",
    )
    families.refuse_unsupported(hf, arch, _refuse)
    _refuse(
        not arch.has_head_dim
        and not arch.latent_attention
        and hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]),
        f"head_dim of {arch.model_type} must be hidden_size / num_attention_heads",
    )


def from_hf(hf: dict, *, dtype=jnp.float32, impl: str = "auto") -> TransformerConfig:
    """`TransformerConfig` of a ``config.json`` dict (dropless MoE blocks, dense
    MLPs where the architecture puts them)."""
    arch = architecture(hf)
    _refuse_unsupported(hf, arch)
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            arch.d_ff_key,
            "num_experts_per_tok",
        )
        if k not in hf
    ]
    num_experts = next((hf[k] for k in arch.experts_keys if k in hf), None)
    _refuse(
        bool(missing) or num_experts is None, f"missing keys {missing or list(arch.experts_keys)}"
    )
    renormalize = arch.always_renormalize or bool(hf.get("norm_topk_prob", False))
    moe = MoEConfig(
        d_model=hf["hidden_size"],
        d_ff=hf[arch.d_ff_key],
        num_experts=num_experts,
        top_k=hf["num_experts_per_tok"],
        expert_type="glu",
        normalize_top_k=1.0 if renormalize else None,
        dtype=dtype,
        param_dtype=dtype,
        impl=impl,
        **{
            "load_balancing_loss_weight": float(hf.get("router_aux_loss_coef", 0.0)),
            **families.moe_options(hf, arch),
        },
    )
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        moe=moe,
        ffn="dmoe",
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=(hf.get("head_dim") if arch.has_head_dim else None),
        qk_norm=arch.qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_base=_rope_theta(hf, arch),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **families.model_options(hf, arch),
    )


def model_type_of(config: TransformerConfig) -> str:
    """The architecture a jmoe model is saved as: DeepSeek-V3 with latent
    attention, Qwen2-MoE with a gated shared expert, otherwise chosen by its
    QK-norm (none: Mixtral, per head: Qwen3-MoE, whole projection: OLMoE)."""
    if config.mla is not None:
        return "deepseek_v3"
    if config.moe.shared_expert_gate:
        return "qwen2_moe"
    return {None: "mixtral", "head": "qwen3_moe", "projection": "olmoe"}[config.qk_norm]


def to_hf(config: TransformerConfig) -> dict:
    """``config.json`` dict of a model that `from_hf` maps back to ``config``
    (refuses what the target architecture cannot express)."""
    arch = ARCHITECTURES[model_type_of(config)]
    moe = config.moe
    problems = {
        "ffn": (config.ffn, "dmoe"),
        "moe_every": (config.moe_every, 1),
        "moe.expert_type": (moe.expert_type, "glu"),
        "moe.score_function": (moe.score_function, "softmax"),
        "moe.num_shared_experts": (moe.num_shared_experts, 0),
        "moe.uniform_expert_assignment": (moe.uniform_expert_assignment, False),
    }
    problems = families.save_problems(config, arch, problems)
    if arch.always_renormalize:
        problems["moe.normalize_top_k"] = (moe.normalize_top_k, 1.0)
    elif moe.normalize_top_k not in (None, 1.0):
        problems["moe.normalize_top_k"] = (moe.normalize_top_k, "None or 1.0")
    if not arch.has_head_dim:
        problems["head_dim"] = (config.head_size, config.d_model // config.num_heads)
    for name, (value, expected) in problems.items():
        if value != expected:
            raise ValueError(
                f"{name} must be {expected!r} to save as {arch.model_type}, got {value!r}"
            )
    hf = {
        "model_type": arch.model_type,
        "architectures": [arch.class_name],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        arch.d_ff_key: moe.d_ff,
        arch.experts_keys[0]: moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.load_balancing_loss_weight,
        "dtype": jnp.dtype(moe.param_dtype).name,
    }
    if arch.has_head_dim:
        hf["head_dim"] = config.head_size
    if not arch.always_renormalize:
        hf["norm_topk_prob"] = moe.normalize_top_k is not None
    hf.update(families.hf_options(config, arch))
    return hf
