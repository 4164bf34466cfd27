"""Causal multi-head self-attention with rotary position embeddings (RoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rotary_embedding(x: jax.Array, base: float) -> jax.Array:
    """Rotates ``x [batch, seq, heads, head_dim]`` by its positions ``0..seq-1``.

    Half-split RoPE (GPT-NeoX layout): channel ``i`` and ``i + head_dim/2``
    form a pair rotated by ``position * base**(-2i/head_dim)``. Computed in
    float32, returned in ``x.dtype``.
    """
    seq, head_dim = x.shape[1], x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq  # [seq, head_dim/2]
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """``x [batch, seq, d_model]`` -> ``[batch, seq, d_model]``, each position
    attending to itself and earlier positions.

    Parameters: ``qkv.kernel [d_model, 3, heads, head_dim]`` and
    ``out.kernel [heads, head_dim, d_model]`` (no biases).
    """

    def __init__(self, d_model: int, num_heads: int, *, rope_base: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        head_dim = d_model // num_heads
        self.rope_base = rope_base
        self.qkv = nnx.LinearGeneral(d_model, (3, num_heads, head_dim), use_bias=False,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out = nnx.LinearGeneral((num_heads, head_dim), d_model, axis=(-2, -1),
                                     use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = jnp.unstack(self.qkv(x), axis=2)  # each [batch, seq, heads, head_dim]
        q = rotary_embedding(q, self.rope_base)
        k = rotary_embedding(k, self.rope_base)
        return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True))
