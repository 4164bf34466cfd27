"""The ``config.json`` options of the architectures beyond the Mixtral/Qwen3/OLMoE
core: dense-MLP blocks (Qwen ``mlp_only_layers`` / ``decoder_sparse_step``,
DeepSeek ``first_k_dense_replace``), Qwen2-MoE's attention biases and gated
shared expert, DeepSeek-V3's latent attention, YaRN and sigmoid group routing.
`jmoe.hf.config` calls these in both directions."""

from __future__ import annotations

from jmoe.hf.architectures import Architecture
from jmoe.mla import MLAConfig
from jmoe.transformer import TransformerConfig
from jmoe.yarn import YarnScaling

MLA_KEYS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def refuse_unsupported(hf: dict, arch: Architecture, refuse) -> None:
    """Refuses (``refuse(condition, message)``) options of these families jmoe lacks."""
    required = {
        "qwen2_moe": ("shared_expert_intermediate_size",),
        "deepseek_v3": MLA_KEYS,
    }.get(arch.model_type, ())
    missing = [k for k in required if hf.get(k) is None]
    refuse(bool(missing), f"missing keys {missing}")
    if arch.model_type == "deepseek_v3":
        for key, allowed in (
            ("scoring_func", "sigmoid"),
            ("topk_method", "noaux_tc"),
            ("moe_layer_freq", 1),
        ):
            refuse(
                hf.get(key, allowed) != allowed,
                f"{key} must be {allowed!r} (DeepSeek-V3 routing), got {hf.get(key)!r}",
            )


def routed_layers(hf: dict, arch: Architecture) -> tuple[int, ...] | None:
    """Indices of the MoE blocks, or None when every block is one."""
    layers = range(hf["num_hidden_layers"])
    if arch.dense_layers == "qwen":
        dense = set(hf.get("mlp_only_layers") or ())
        step = hf.get("decoder_sparse_step") or 1
        routed = tuple(i for i in layers if i not in dense and (i + 1) % step == 0)
    elif arch.dense_layers == "deepseek":
        routed = tuple(layers[hf.get("first_k_dense_replace") or 0 :])
    else:
        return None
    return None if routed == tuple(layers) else routed


def yarn_of(hf: dict) -> YarnScaling | None:
    """The YaRN scaling of ``rope_parameters`` or (older files) ``rope_scaling``."""
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key) or {}
        if params.get("rope_type", params.get("type")) == "yarn":
            if params.get("factor") is None:
                raise ValueError(f"config.json: {key}.factor is required for yarn")
            return YarnScaling(
                factor=float(params["factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", hf["max_position_embeddings"])
                ),
                beta_fast=float(params.get("beta_fast") or 32),
                beta_slow=float(params.get("beta_slow") or 1),
                mscale=params.get("mscale"),
                mscale_all_dim=params.get("mscale_all_dim"),
                attention_factor=params.get("attention_factor"),
                truncate=bool(params.get("truncate", True)),
            )
    return None


def moe_options(hf: dict, arch: Architecture) -> dict:
    """`MoEConfig` fields of the family's shared experts and routing."""
    if arch.model_type == "qwen2_moe":
        return dict(
            num_shared_experts=1,
            shared_d_ff=hf["shared_expert_intermediate_size"],
            shared_expert_gate=True,
        )
    if arch.model_type == "deepseek_v3":
        return dict(
            score_function="sigmoid",
            num_shared_experts=hf.get("n_shared_experts") or 0,
            num_expert_groups=hf.get("n_group") or 1,
            top_k_groups=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            expert_bias=True,
            # transformers' DeepSeek-V3 balances by the bias alone ("noaux_tc"): no aux loss,
            # whatever router_aux_loss_coef says
            load_balancing_loss_weight=0.0,
        )
    return {}


def model_options(hf: dict, arch: Architecture) -> dict:
    """`TransformerConfig` fields of the family's dense blocks and attention."""
    options = {}
    routed = routed_layers(hf, arch)
    if routed is not None:
        if hf.get("intermediate_size") is None:
            raise ValueError("config.json: missing keys ['intermediate_size'] (dense blocks)")
        options.update(routed_layers=routed, dense_hidden=hf["intermediate_size"])
    if arch.model_type == "qwen2_moe":
        options["attention_bias"] = bool(hf.get("qkv_bias", True))  # transformers' default
    if arch.latent_attention:
        options["mla"] = MLAConfig(
            **{k: hf[k] for k in MLA_KEYS},
            q_lora_rank=hf.get("q_lora_rank"),
            rope_interleave=bool(hf.get("rope_interleave", True)),
            yarn=yarn_of(hf),
        )
    return options


def save_problems(config: TransformerConfig, arch: Architecture, problems: dict) -> dict:
    """`jmoe.hf.config.to_hf`'s ``{name: (value, expected)}`` checks adjusted to
    what ``arch`` can express."""
    moe, out = config.moe, dict(problems)
    layers = tuple(range(config.num_layers))
    if arch.dense_layers is None:
        out["routed_layers"] = (config.moe_layers, layers)
    else:
        del out["moe_every"]  # any routed layers are written (DeepSeek: a suffix)
    if arch.dense_layers == "deepseek":
        first = config.num_layers - len(config.moe_layers)
        out["routed_layers"] = (config.moe_layers, layers[first:])
    if arch.model_type == "qwen2_moe":
        out.update(
            {
                "qk_norm": (config.qk_norm, None),
                "moe.num_shared_experts": (moe.num_shared_experts, 1),
            }
        )
    if arch.model_type == "deepseek_v3":
        del out["moe.num_shared_experts"]  # any number
        out.update(
            {
                "moe.score_function": (moe.score_function, "sigmoid"),
                "moe.shared_d_ff": (moe.shared_d_ff or moe.d_ff, moe.d_ff),
                "moe.expert_bias": (moe.expert_bias, True),
            }
        )
    else:
        out.update(
            {
                "moe.num_expert_groups": (moe.num_expert_groups, 1),
                "moe.routed_scaling_factor": (moe.routed_scaling_factor, 1.0),
                "moe.expert_bias": (moe.expert_bias, False),
            }
        )
    if arch.model_type != "qwen2_moe":
        out["attention_bias"] = (config.attention_bias, False)
    return out


def _yarn_json(config: TransformerConfig) -> dict:
    yarn = config.mla.yarn
    params = {"rope_type": "yarn", "rope_theta": config.rope_base, "factor": yarn.factor}
    params["original_max_position_embeddings"] = yarn.original_max_position_embeddings
    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if getattr(yarn, name) is not None:
            params[name] = getattr(yarn, name)
    if not yarn.truncate:
        params["truncate"] = False
    return params


def hf_options(config: TransformerConfig, arch: Architecture) -> dict:
    """``config.json`` keys of the family (`to_hf` adds them to the common ones)."""
    moe, hf = config.moe, {}
    dense = [i for i in range(config.num_layers) if i not in config.moe_layers]
    if arch.dense_layers == "qwen":
        hf.update(decoder_sparse_step=1, mlp_only_layers=dense)
    if dense:
        hf["intermediate_size"] = config.dense_d_ff
    if arch.model_type == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=moe.shared_hidden, qkv_bias=config.attention_bias)
    if arch.model_type == "deepseek_v3":
        mla = config.mla
        hf.update(
            {k: getattr(mla, k) for k in MLA_KEYS},
            q_lora_rank=mla.q_lora_rank,
            rope_interleave=mla.rope_interleave,
            head_dim=mla.qk_rope_head_dim,
            first_k_dense_replace=len(dense),
            n_shared_experts=moe.num_shared_experts,
            n_group=moe.num_expert_groups,
            topk_group=moe.top_k_groups,
            routed_scaling_factor=moe.routed_scaling_factor,
            attention_bias=False,
        )
        if mla.yarn is not None:
            hf["rope_parameters"] = _yarn_json(config)
    return hf
