"""The experiments' model presets: byte-level MoE transformers and three published MoE shapes.

``preset("xs", ffn="moe", capacity_factor=1.5)`` -> a `jmoe.transformer.TransformerConfig`;
`PRESET_TRAINING` holds each preset's default optimizer steps, batch size and peak learning rate
(``python -m experiments.train --preset xs`` uses both; ``--set KEY=VALUE`` changes any field).
Dense MLPs of a preset's models have hidden width ``top_k * d_ff``, so all FFN kinds of a preset
spend the same FLOPs per token.
"""

from __future__ import annotations

from jmoe.config import MoEConfig, require
from jmoe.transformer import TransformerConfig

PRESETS = ("xs", "s", "m", "olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b")

# Training defaults per model preset (the command line overrides them).
PRESET_TRAINING = {
    "xs": dict(steps=300, batch_size=16, lr=3e-3),
    "s": dict(steps=300, batch_size=16, lr=1.5e-3),
    "m": dict(steps=2000, batch_size=32, lr=1e-3),
    "olmoe-1b-7b": dict(steps=1000, batch_size=8, lr=4e-4),
    "qwen3-30b-a3b": dict(steps=1000, batch_size=8, lr=3e-4),
    "mixtral-8x7b": dict(steps=1000, batch_size=8, lr=3e-4),
}

# Byte-level models: d_model, layers, heads, seq, experts, top_k, d_ff, block size.
_BYTE_LEVEL = {
    "xs": (128, 4, 4, 128, 8, 1, 512, 64),
    "s": (256, 6, 8, 256, 8, 1, 1024, 64),
    "m": (768, 12, 12, 1024, 8, 2, 512, 128),
}

# Published shapes (the models' Hugging Face config.json), trained at sequences of 4096.
_PUBLISHED = {
    # allenai/OLMoE-1B-7B-0924: 6.9B parameters, 1.3B active.
    "olmoe-1b-7b": dict(
        model=dict(
            vocab_size=50304,
            d_model=2048,
            num_layers=16,
            num_heads=16,
            qk_norm="projection",
            rope_base=10_000.0,
            norm_eps=1e-5,
        ),
        moe=dict(
            d_ff=1024,
            num_experts=64,
            top_k=8,
            load_balancing_loss_weight=0.01,
            router_z_loss_weight=0.001,  # the OLMoE paper's z-loss
        ),
    ),
    # Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active.
    "qwen3-30b-a3b": dict(
        model=dict(
            vocab_size=151936,
            d_model=2048,
            num_layers=48,
            num_heads=32,
            num_kv_heads=4,
            head_dim=128,
            qk_norm="head",
            rope_base=1_000_000.0,
            norm_eps=1e-6,
        ),
        moe=dict(
            d_ff=768,
            num_experts=128,
            top_k=8,
            normalize_top_k=1.0,
            load_balancing_loss_weight=0.001,
        ),
    ),
    # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active.
    "mixtral-8x7b": dict(
        model=dict(
            vocab_size=32000,
            d_model=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            rope_base=1_000_000.0,
            norm_eps=1e-5,
        ),
        moe=dict(
            d_ff=14336,
            num_experts=8,
            top_k=2,
            normalize_top_k=1.0,
            load_balancing_loss_weight=0.02,
        ),
    ),
}


def preset(name: str, ffn: str = "dmoe", capacity_factor: float = 1.0) -> TransformerConfig:
    """The model of preset ``name``.

    Byte-level (vocab 256, GeLU experts, softmax top-k routing, aux-loss weight 0.1):

    * ``"xs"``: d_model 128, 4 layers, 4 heads, sequences of 128; 8 experts of
      d_ff 512, top-1 (MegaBlocks' routing); 4.5M parameters, 0.86M active.
    * ``"s"``: d_model 256, 6 layers, 8 heads, sequences of 256; 8 experts of
      d_ff 1024, top-1; 27M parameters, 4.9M active.
    * ``"m"``: d_model 768, 12 layers, 12 heads, sequences of 1024; 8 experts of
      d_ff 512, top-2; 104M parameters, 48M active (one GPU).

    Published shapes (SwiGLU experts, their vocab sizes, RoPE bases, RMSNorm
    epsilons, QK-norms and router aux-loss coefficients; sequences of 4096):

    * ``"olmoe-1b-7b"``: 16 layers, d_model 2048, 16 heads, QK-norm over the
      projections; 64 experts of d_ff 1024, top-8; vocab 50304.
    * ``"qwen3-30b-a3b"``: 48 layers, d_model 2048, 32 heads of 128, 4 KV heads,
      QK-norm per head; 128 experts of d_ff 768, top-8 renormalised; vocab 151936.
    * ``"mixtral-8x7b"``: 32 layers, d_model 4096, 32 heads, 8 KV heads; 8
      experts of d_ff 14336, top-2 renormalised; vocab 32000.

    ``capacity_factor`` only matters for ``ffn="moe"``.
    """
    require(name in PRESETS, f"name must be one of {PRESETS}, got {name!r}")
    if name in _BYTE_LEVEL:
        d_model, num_layers, num_heads, seq, experts, top_k, d_ff, block = _BYTE_LEVEL[name]
        model = dict(vocab_size=256, d_model=d_model, num_layers=num_layers, num_heads=num_heads)
        moe = dict(d_ff=d_ff, num_experts=experts, top_k=top_k, block_size=block)
    else:
        model, seq = _PUBLISHED[name]["model"], 4096
        moe = dict(_PUBLISHED[name]["moe"], expert_type="glu", block_size=128)
    return TransformerConfig(
        **model,
        max_seq_len=seq,
        moe=MoEConfig(d_model=model["d_model"], capacity_factor=capacity_factor, **moe),
        ffn=ffn,
    )
