"""A decoder-only MoE transformer language model (pre-norm, RoPE).

``logits, aux = MoETransformer(config, rngs=rngs)(tokens)``. Every block is
``x + attn(norm(x))`` then ``x + ffn(norm(x))``; the FFN of a block is a
`DroplessMoE`, a `CapacityMoE` or a `DenseMLP` (`TransformerConfig.ffn`),
either in every block or, GLaM style (``moe_every=2``), in every other block
with dense MLPs in between. Dense MLPs have hidden width ``top_k * d_ff`` so
that every model of a preset spends the same FLOPs per token in its FFNs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.attention import CausalSelfAttention
from jmoe.config import MoEConfig, require
from jmoe.dense import DenseMLP
from jmoe.moe import CapacityMoE, DroplessMoE

FFN_KINDS = ("dmoe", "moe", "dense")
MOE_EVERY = (1, 2)
PRESETS = ("xs", "s")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Configuration of `MoETransformer` (all fields keyword-only).

    Attributes:
      vocab_size: number of token ids.
      d_model: residual width; must equal ``moe.d_model``.
      num_layers: transformer blocks.
      num_heads: attention heads; ``d_model / num_heads`` must be an even int.
      max_seq_len: longest input sequence accepted.
      moe: the FFN configuration (experts, top-k, capacity factor, kernels,
        aux-loss weights, dtypes).
      ffn: ``"dmoe"`` (dropless), ``"moe"`` (token dropping at
        ``moe.capacity_factor``) or ``"dense"`` (no experts).
      moe_every: 1 puts the MoE FFN in every block; 2 only in blocks
        1, 3, 5, ... with dense MLPs in blocks 0, 2, 4, ... (GLaM).
      rope_base: RoPE wavelength base.
      norm_eps: RMSNorm epsilon.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    max_seq_len: int
    moe: MoEConfig
    ffn: str = "dmoe"
    moe_every: int = 1
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1,
                    f"{name} must be a positive int, got {value!r}")
        require(isinstance(self.moe, MoEConfig),
                f"moe must be a MoEConfig, got {type(self.moe).__name__}")
        require(self.moe.d_model == self.d_model,
                f"moe.d_model must equal d_model={self.d_model}, got {self.moe.d_model}")
        require(self.d_model % self.num_heads == 0 and (self.d_model // self.num_heads) % 2 == 0,
                f"num_heads must split d_model={self.d_model} into even head dims, "
                f"got {self.num_heads}")
        require(self.ffn in FFN_KINDS, f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        require(self.moe_every in MOE_EVERY,
                f"moe_every must be one of {MOE_EVERY}, got {self.moe_every!r}")
        require(self.ffn == "dense" or self.num_layers >= self.moe_every,
                f"num_layers={self.num_layers} leaves no MoE block at moe_every={self.moe_every}")
        require(self.rope_base > 0, f"rope_base must be > 0, got {self.rope_base}")
        require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose FFN is routed (empty for ``ffn="dense"``)."""
        if self.ffn == "dense":
            return ()
        return tuple(i for i in range(self.num_layers) if i % self.moe_every == self.moe_every - 1)

    @property
    def dense_d_ff(self) -> int:
        """Hidden width of the dense MLPs: ``top_k * d_ff`` (same active FLOPs)."""
        return self.moe.top_k * self.moe.d_ff

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


def preset(name: str, ffn: str = "dmoe", capacity_factor: float = 1.0) -> TransformerConfig:
    """Byte-level (vocab 256) models sized for a 2-core CPU.

    * ``"xs"``: d_model 128, 4 layers, 4 heads, sequences of 128; 8 experts of
      d_ff 512, top-1 (MegaBlocks' routing); ~0.6M active non-embedding parameters.
    * ``"s"``: d_model 256, 6 layers, 8 heads, sequences of 256; 8 experts of
      d_ff 1024, top-1; ~3.9M active non-embedding parameters.

    ``capacity_factor`` only matters for ``ffn="moe"``.
    """
    require(name in PRESETS, f"name must be one of {PRESETS}, got {name!r}")
    d_model, num_layers, num_heads, seq, d_ff = {
        "xs": (128, 4, 4, 128, 512),
        "s": (256, 6, 8, 256, 1024),
    }[name]
    moe = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=8, top_k=1, block_size=64,
                    capacity_factor=capacity_factor)
    return TransformerConfig(vocab_size=256, d_model=d_model, num_layers=num_layers,
                             num_heads=num_heads, max_seq_len=seq, moe=moe, ffn=ffn)


def _ffn(config: TransformerConfig, routed: bool, rngs: nnx.Rngs) -> nnx.Module:
    if not routed:
        return DenseMLP(config.moe, d_ff=config.dense_d_ff, rngs=rngs)
    layer = DroplessMoE if config.ffn == "dmoe" else CapacityMoE
    return layer(config.moe, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm block: ``x [batch, seq, d_model]`` -> ``(same shape, ffn aux)``."""

    def __init__(self, config: TransformerConfig, routed: bool, *, rngs: nnx.Rngs):
        dtypes = dict(dtype=config.moe.dtype, param_dtype=config.moe.param_dtype)
        self.attn_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps, **dtypes, rngs=rngs)
        self.attn = CausalSelfAttention(config.d_model, config.num_heads,
                                        rope_base=config.rope_base, **dtypes, rngs=rngs)
        self.ffn_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps, **dtypes, rngs=rngs)
        self.ffn = _ffn(config, routed, rngs)

    def __call__(self, x: jax.Array):
        x = x + self.attn(self.attn_norm(x))
        y, aux = self.ffn(self.ffn_norm(x))
        return x + y.astype(x.dtype), aux


def aggregate_aux(layer_aux: list[dict], moe_layers: tuple[int, ...], num_experts: int) -> dict:
    """Sums the per-block aux dicts into the model's aux.

    Returns ``aux_loss`` (sum over blocks of ``load_balancing_loss +
    router_z_loss + sequence_aux_loss``), the three sums separately, ``tokens_per_expert
    [len(moe_layers), E] int32`` (routed blocks only) and ``dropped_tokens``
    (int32 sum).
    """
    balance = sum(aux["load_balancing_loss"] for aux in layer_aux)
    z_loss = sum(aux["router_z_loss"] for aux in layer_aux)
    sequence = sum(aux["sequence_aux_loss"] for aux in layer_aux)
    routed = [layer_aux[i]["tokens_per_expert"] for i in moe_layers]
    return {
        "aux_loss": balance + z_loss + sequence,
        "load_balancing_loss": balance,
        "router_z_loss": z_loss,
        "sequence_aux_loss": sequence,
        "tokens_per_expert": (jnp.stack(routed) if routed
                              else jnp.zeros((0, num_experts), jnp.int32)),
        "dropped_tokens": sum(aux["dropped_tokens"] for aux in layer_aux),
    }


class MoETransformer(nnx.Module):
    """Decoder-only LM: ``tokens [batch, seq] int`` -> ``(logits, aux)``.

    ``logits``: ``[batch, seq, vocab_size]`` float32; ``aux``: see
    `aggregate_aux`. Parameters: ``embed.embedding [vocab, d_model]``,
    ``blocks[i]`` (`Block`), ``final_norm``, ``lm_head.kernel [d_model, vocab]``
    (initialised small so an untrained model predicts ~uniformly).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = dict(dtype=config.moe.dtype, param_dtype=config.moe.param_dtype)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, **dtypes, rngs=rngs)
        routed = set(config.moe_layers)
        self.blocks = nnx.List([Block(config, i in routed, rngs=rngs)
                                for i in range(config.num_layers)])
        self.final_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps, **dtypes,
                                      rngs=rngs)
        self.lm_head = nnx.Linear(config.d_model, config.vocab_size, use_bias=False,
                                  kernel_init=nnx.initializers.normal(0.02), **dtypes, rngs=rngs)

    def __call__(self, tokens: jax.Array):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [batch, seq], got "
                             f"{tokens.dtype}{list(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"tokens: seq={tokens.shape[1]} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        x = self.embed(tokens)
        layer_aux = []
        for block in self.blocks:
            x, aux = block(x)
            layer_aux.append(aux)
        logits = self.lm_head(self.final_norm(x)).astype(jnp.float32)
        return logits, aggregate_aux(layer_aux, self.config.moe_layers,
                                     self.config.moe.num_experts)
