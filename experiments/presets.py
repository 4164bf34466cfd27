"""The experiments' model presets: byte-level (vocab 256) MoE transformers sized for a 2-core CPU.

``preset("xs", ffn="moe", capacity_factor=1.5)`` -> a `jmoe.transformer.TransformerConfig`;
`PRESET_TRAINING` holds each preset's default optimizer steps, batch size and peak learning rate
(``python -m experiments.train --preset xs`` uses both). Dense MLPs of a preset's models have
hidden width ``top_k * d_ff``, so all FFN kinds of a preset spend the same FLOPs per token.
"""

from __future__ import annotations

import jax.numpy as jnp

from jmoe.config import MoEConfig, require
from jmoe.transformer import TransformerConfig

# Published shapes (planning, GPUs): (layers, d_model, heads, kv heads, head_dim, experts, top-k,
# d_ff, vocab, qk_norm, normalize_top_k, rope base); seq 4096, SwiGLU experts, untied embeddings.
PUBLISHED = {
    "olmoe-1b-7b": (16, 2048, 16, 16, 128, 64, 8, 1024, 50304, "projection", None, 10_000.0),
    "qwen3-30b-a3b": (48, 2048, 32, 4, 128, 128, 8, 768, 151936, "head", 1.0, 1_000_000.0),
    "mixtral-8x7b": (32, 4096, 32, 8, 128, 8, 2, 14336, 32000, None, 1.0, 1_000_000.0),
}
PRESETS = ("xs", "s", *PUBLISHED)

# Training defaults per model preset (the command line overrides them).
PRESET_TRAINING = {
    "xs": dict(steps=300, batch_size=16, lr=3e-3),
    "s": dict(steps=300, batch_size=16, lr=1.5e-3),
    **{name: dict(steps=1000, batch_size=256, lr=3e-4) for name in PUBLISHED},
}


def preset(name: str, ffn: str = "dmoe", capacity_factor: float = 1.0) -> TransformerConfig:
    """Byte-level (vocab 256) models sized for a 2-core CPU.

    * ``"xs"``: d_model 128, 4 layers, 4 heads, sequences of 128; 8 experts of
      d_ff 512, top-1 (MegaBlocks' routing); ~0.6M active non-embedding parameters.
    * ``"s"``: d_model 256, 6 layers, 8 heads, sequences of 256; 8 experts of
      d_ff 1024, top-1; ~3.9M active non-embedding parameters.

    ``capacity_factor`` only matters for ``ffn="moe"``.
    """
    require(name in PRESETS, f"name must be one of {PRESETS}, got {name!r}")
    if name in PUBLISHED:
        return _published(name, ffn, capacity_factor)
    d_model, num_layers, num_heads, seq, d_ff = {
        "xs": (128, 4, 4, 128, 512),
        "s": (256, 6, 8, 256, 1024),
    }[name]
    moe = MoEConfig(
        d_model=d_model,
        d_ff=d_ff,
        num_experts=8,
        top_k=1,
        block_size=64,
        capacity_factor=capacity_factor,
    )
    return TransformerConfig(
        vocab_size=256,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        max_seq_len=seq,
        moe=moe,
        ffn=ffn,
    )


def _published(name: str, ffn: str, capacity_factor: float) -> TransformerConfig:
    """A `PUBLISHED` model's shapes (bfloat16 compute, float32 parameters)."""
    layers, d_model, heads, kv_heads, head_dim, experts, top_k, d_ff, vocab, qk_norm, norm, rope = (
        PUBLISHED[name]
    )
    moe = MoEConfig(
        d_model=d_model,
        d_ff=d_ff,
        num_experts=experts,
        top_k=top_k,
        expert_type="glu",
        normalize_top_k=norm,
        capacity_factor=capacity_factor,
        load_balancing_loss_weight=0.01,
        dtype=jnp.bfloat16,
    )
    return TransformerConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_seq_len=4096,
        qk_norm=qk_norm,
        rope_base=rope,
        moe=moe,
        ffn=ffn,
    )
