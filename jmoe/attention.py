"""Causal self-attention with rotary position embeddings (RoPE): multi-head or
grouped-query, optional QK-norm, and a static-size KV cache for decoding."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

QK_NORMS = (None, "projection", "head")


def rotary_embedding(
    x: jax.Array, base: float, positions: jax.Array | None = None, inv_freq=None
) -> jax.Array:
    """Rotates ``x [batch, seq, heads, head_dim]`` by its positions.

    Half-split RoPE (GPT-NeoX layout, Hugging Face's ``rotate_half``): channel
    ``i`` and ``i + head_dim/2`` form a pair rotated by
    ``position * base**(-2i/head_dim)``, or by ``position * inv_freq[i]`` when
    ``inv_freq [head_dim/2]`` is given (scaled RoPE, `jmoe.yarn`).
    ``positions [seq]`` or ``[batch, seq]`` int defaults to ``0..seq-1``.
    Computed in float32, returned in ``x.dtype``.
    """
    seq, head_dim = x.shape[1], x.shape[-1]
    if positions is None:
        positions = jnp.arange(seq)
    if inv_freq is None:
        inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(batch,) seq, head_dim/2]
    sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def same_segment(segment_ids: jax.Array) -> jax.Array:
    """``[batch, seq]`` -> ``[batch, 1, seq, seq]`` bool: query and key share a segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _cudnn_applies(q: jax.Array) -> bool:
    """cuDNN's fused attention takes ``q``: an NVIDIA GPU, 16-bit, ``head_dim`` a
    multiple of 8 up to 128."""
    head_dim = q.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and "NVIDIA" in jax.devices()[0].device_kind.upper()
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *, is_causal=False
) -> jax.Array:
    """`jax.nn.dot_product_attention` of ``q [batch, seq, heads, head_dim]`` over ``k, v
    [batch, keys, kv_heads, head_dim]``, on cuDNN's fused kernel where it applies (an
    NVIDIA GPU, bfloat16/float16) and XLA's elsewhere. ``mask [batch, 1, seq, keys]``
    bool (`same_segment` for packed documents) reaches both; cuDNN adds it as a bias."""
    implementation = "cudnn" if _cudnn_applies(q) else None
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
    )


class KVCache(NamedTuple):
    """One layer's keys and values, ``[batch, max_len, kv_heads, head_dim]`` each;
    position ``p`` of every sequence lives at index ``p``."""

    k: jax.Array
    v: jax.Array


class CausalSelfAttention(nnx.Module):
    """``x [batch, seq, d_model]`` -> ``[batch, seq, d_model]``, each position
    attending to itself and earlier positions.

    Parameters: with as many key/value heads as query heads (multi-head),
    ``qkv.kernel [d_model, 3, heads, head_dim]``; with fewer (grouped-query),
    ``q.kernel [d_model, heads, head_dim]`` and
    ``kv.kernel [d_model, 2, kv_heads, head_dim]``; then
    ``out.kernel [heads, head_dim, d_model]``; ``qkv_bias`` adds a ``bias``
    of each projection's output shape to ``qkv``, ``q`` and ``kv`` (Qwen2),
    ``out`` never has one. ``qk_norm``:
    ``"projection"`` adds ``q_norm.scale [heads * head_dim]`` and
    ``k_norm.scale [kv_heads * head_dim]`` (RMSNorm over the whole projection,
    OLMoE); ``"head"`` adds ``q_norm.scale`` and ``k_norm.scale [head_dim]``
    (RMSNorm per head, Qwen3).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        rope_base: float,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
    ):
        kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or d_model // num_heads
        self.rope_base, self.qk_norm = rope_base, qk_norm
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        linear = lambda shape: nnx.LinearGeneral(
            d_model, shape, use_bias=qkv_bias, **dtypes, rngs=rngs
        )
        grouped = kv_heads != num_heads
        self.qkv = None if grouped else linear((3, num_heads, head_dim))
        self.q = linear((num_heads, head_dim)) if grouped else None
        self.kv = linear((2, kv_heads, head_dim)) if grouped else None
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim), d_model, axis=(-2, -1), use_bias=False, **dtypes, rngs=rngs
        )
        widths = {
            None: (None, None),
            "head": (head_dim, head_dim),
            "projection": (num_heads * head_dim, kv_heads * head_dim),
        }[qk_norm]
        norm = lambda width: (
            None if width is None else nnx.RMSNorm(width, epsilon=norm_eps, **dtypes, rngs=rngs)
        )
        self.q_norm, self.k_norm = norm(widths[0]), norm(widths[1])

    def _normed(self, norm, x):
        if self.qk_norm == "projection":  # over heads * head_dim
            return norm(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)
        return norm(x)

    def project(self, x: jax.Array, positions: jax.Array | None = None):
        """``x [batch, seq, d_model]`` -> ``(q [batch, seq, heads, head_dim],
        k, v [batch, seq, kv_heads, head_dim])``, q and k normed and rotated."""
        if self.qkv is not None:
            q, k, v = jnp.unstack(self.qkv(x), axis=2)
        else:
            q = self.q(x)
            k, v = jnp.unstack(self.kv(x), axis=2)
        if self.qk_norm is not None:
            q, k = self._normed(self.q_norm, q), self._normed(self.k_norm, k)
        return (
            rotary_embedding(q, self.rope_base, positions),
            rotary_embedding(k, self.rope_base, positions),
            v,
        )

    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``segment_ids [batch, seq] int`` (packed documents): a position attends
        only to the positions of its own segment; ``positions [batch, seq] int``:
        the RoPE positions (default ``0..seq-1``)."""
        q, k, v = self.project(x, positions)
        mask = None if segment_ids is None else same_segment(segment_ids)
        return self.out(attention(q, k, v, mask, is_causal=True))

    def cached(self, x: jax.Array, cache: KVCache, position: jax.Array):
        """Attention of ``x [batch, seq, d_model]`` at positions
        ``position .. position + seq - 1`` (``position`` an int32 scalar) over
        the cache: writes this chunk's keys and values at those indices and
        attends to every cached position up to each query's own.

        Returns ``(y [batch, seq, d_model], updated cache)``.
        """
        seq, max_len = x.shape[1], cache.k.shape[1]
        positions = position + jnp.arange(seq, dtype=jnp.int32)
        q, k, v = self.project(x, positions)
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), position, axis=1
        )
        cache = KVCache(write(cache.k, k), write(cache.v, v))
        mask = jnp.arange(max_len)[None, :] <= positions[:, None]  # [seq, max_len]
        y = jax.nn.dot_product_attention(
            q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask=mask[None, None]
        )
        return self.out(y), cache
