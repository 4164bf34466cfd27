"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a decode cache of the
compressed latents.

Keys and values come from one per-token latent ``c = norm(x @ kv_a)[:kv_lora_rank]``
(expanded per head by ``kv_b``) plus a RoPE key ``k_pe [qk_rope_head_dim]``
shared by all heads; queries from an optional low-rank ``q_a`` -> norm -> ``q``.
The full forward expands ``c`` into per-head keys and values; the cached
forward (generation) keeps only ``(c, k_pe)`` per token and absorbs ``kv_b``
into the queries and the output (``q_nope @ W_uk`` scored against ``c``, the
latent-weighted sum projected by ``W_uv``), so the cache costs
``kv_lora_rank + qk_rope_head_dim`` values per token and layer instead of
``heads * (qk_nope + qk_rope + v_head_dim)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.attention import rotary_embedding, same_segment
from jmoe.config import require
from jmoe.yarn import YarnScaling

# transformers' DeepseekV3RMSNorm default: q_a/kv_a_layernorm ignore rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Dimensions of `LatentAttention` (`TransformerConfig.mla`).

    Attributes:
      kv_lora_rank: width of the cached key/value latent ``c``.
      qk_nope_head_dim, qk_rope_head_dim: per-head query/key widths without
        and with RoPE (the RoPE key is shared by all heads; even).
      v_head_dim: per-head value width.
      q_lora_rank: width of the query latent; None: one ``q`` projection.
      rope_interleave: the RoPE channels are interleaved pairs ``(x0, x1),
        (x2, x3) ...`` (DeepSeek's weights; transformers' default) rather than
        the half-split layout.
      yarn: YaRN RoPE scaling, or None.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = True
    yarn: YarnScaling | None = None

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value >= 1,
                f"mla.{name} must be a positive int, got {value!r}",
            )
        require(
            self.qk_rope_head_dim % 2 == 0,
            f"mla.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}",
        )
        require(
            self.q_lora_rank is None
            or (isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 1),
            f"mla.q_lora_rank must be None or a positive int, got {self.q_lora_rank!r}",
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Cached values per token and layer: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim


class LatentCache(NamedTuple):
    """One MLA layer's decode cache: ``latent [batch, max_len, kv_lora_rank]``
    (normed ``c``) and ``rope_key [batch, max_len, qk_rope_head_dim]`` (rotated
    ``k_pe``); position ``p`` of every sequence lives at index ``p``."""

    latent: jax.Array
    rope_key: jax.Array


def _softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """Masked softmax over the last axis of float32 ``scores``, cast to ``dtype``."""
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(dtype)


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


class LatentAttention(nnx.Module):
    """``x [batch, seq, d_model]`` -> ``[batch, seq, d_model]``, causal MLA.

    Parameters (no biases): with ``q_lora_rank``, ``q_a.kernel [d_model,
    q_lora_rank]``, ``q_a_norm.scale`` and ``q.kernel [q_lora_rank, heads,
    qk_head_dim]`` (else ``q.kernel [d_model, heads, qk_head_dim]``);
    ``kv_a.kernel [d_model, kv_lora_rank + qk_rope_head_dim]``,
    ``kv_a_norm.scale [kv_lora_rank]``, ``kv_b.kernel [kv_lora_rank, heads,
    qk_nope_head_dim + v_head_dim]``, ``out.kernel [heads, v_head_dim, d_model]``.
    A head's query/key is ``[nope, rope]``; the softmax scale is
    ``qk_head_dim**-0.5`` (times YaRN's `softmax_factor`).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        mla: MLAConfig,
        *,
        rope_base: float,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.mla, self.dtype = mla, dtype
        dtypes = dict(dtype=dtype, param_dtype=param_dtype, use_bias=False, rngs=rngs)
        norm = lambda width: nnx.RMSNorm(
            width, epsilon=LATENT_NORM_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        q_in = d_model if mla.q_lora_rank is None else mla.q_lora_rank
        self.q_a = None if mla.q_lora_rank is None else nnx.Linear(d_model, q_in, **dtypes)
        self.q_a_norm = None if mla.q_lora_rank is None else norm(q_in)
        self.q = nnx.LinearGeneral(q_in, (num_heads, mla.qk_head_dim), **dtypes)
        self.kv_a = nnx.Linear(d_model, mla.cache_width, **dtypes)
        self.kv_a_norm = norm(mla.kv_lora_rank)
        self.kv_b = nnx.LinearGeneral(
            mla.kv_lora_rank, (num_heads, mla.qk_nope_head_dim + mla.v_head_dim), **dtypes
        )
        self.out = nnx.LinearGeneral((num_heads, mla.v_head_dim), d_model, axis=(-2, -1), **dtypes)
        yarn = mla.yarn
        self.rope_base = rope_base
        self.scale = mla.qk_head_dim**-0.5 * (1.0 if yarn is None else yarn.softmax_factor)

    def _rope(self, x: jax.Array, positions: jax.Array | None) -> jax.Array:
        """RoPE of ``x [batch, seq, heads, qk_rope_head_dim]`` (output half-split)."""
        mla = self.mla
        if mla.rope_interleave:  # pairs (x0, x1), (x2, x3) -> halves (x0, x2, ..), (x1, x3, ..)
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        inv_freq = None if mla.yarn is None else mla.yarn.inv_freq(x.shape[-1], self.rope_base)
        rotated = rotary_embedding(x, self.rope_base, positions, inv_freq)
        if mla.yarn is not None and mla.yarn.rope_factor != 1.0:
            rotated = (rotated.astype(jnp.float32) * mla.yarn.rope_factor).astype(x.dtype)
        return rotated

    def _project(self, x: jax.Array, positions: jax.Array | None):
        """``-> (q_nope [b, s, heads, nope], q_pe [b, s, heads, rope],
        latent [b, s, kv_lora_rank], rope_key [b, s, rope])``, RoPE applied."""
        nope, lora = self.mla.qk_nope_head_dim, self.mla.kv_lora_rank
        q = self.q(x if self.q_a is None else self.q_a_norm(self.q_a(x)))
        compressed = self.kv_a(x)
        latent = self.kv_a_norm(compressed[..., :lora])
        rope_key = self._rope(compressed[..., None, lora:], positions)[..., 0, :]
        return q[..., :nope], self._rope(q[..., nope:], positions), latent, rope_key

    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Full causal forward with per-head keys and values expanded from the
        latents; ``segment_ids``, ``positions``: as `CausalSelfAttention`."""
        seq = x.shape[1]
        q_nope, q_pe, latent, rope_key = self._project(x, positions)
        kv = self.kv_b(latent)  # [b, s, heads, nope + v]
        k_nope, v = kv[..., : self.mla.qk_nope_head_dim], kv[..., self.mla.qk_nope_head_dim :]
        scores = _einsum("bqhn,bkhn->bhqk", q_nope, k_nope) + _einsum(
            "bqhr,bkr->bhqk", q_pe, rope_key
        )
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        if segment_ids is not None:
            causal = causal & same_segment(segment_ids)  # [batch, 1, seq, seq]
        probs = _softmax(scores * self.scale, causal, v.dtype)
        return self.out(_einsum("bhqk,bkhv->bqhv", probs, v).astype(v.dtype))

    def init_cache(self, batch: int, max_len: int) -> LatentCache:
        """Zeroed `LatentCache` in the compute dtype."""
        zeros = lambda width: jnp.zeros((batch, max_len, width), self.dtype)
        return LatentCache(zeros(self.mla.kv_lora_rank), zeros(self.mla.qk_rope_head_dim))

    def cached(self, x: jax.Array, cache: LatentCache, position: jax.Array):
        """Attention of ``x [batch, seq, d_model]`` at positions ``position ..
        position + seq - 1`` over the latent cache (same contract as
        `CausalSelfAttention.cached`), ``kv_b`` absorbed: scores are
        ``(q_nope @ W_uk) . latent + q_pe . rope_key``, the output
        ``(probs @ latent) @ W_uv``. Returns ``(y, updated cache)``."""
        seq, max_len = x.shape[1], cache.latent.shape[1]
        positions = position + jnp.arange(seq, dtype=jnp.int32)
        q_nope, q_pe, latent, rope_key = self._project(x, positions)
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), position, axis=1
        )
        cache = LatentCache(write(cache.latent, latent), write(cache.rope_key, rope_key))
        w = self.kv_b.kernel.get_value().astype(q_nope.dtype)  # [lora, heads, nope + v]
        w_uk, w_uv = w[..., : self.mla.qk_nope_head_dim], w[..., self.mla.qk_nope_head_dim :]
        q_latent = _einsum("bshn,chn->bshc", q_nope, w_uk).astype(q_nope.dtype)
        cached_latent = cache.latent.astype(q_nope.dtype)
        scores = _einsum("bshc,btc->bhst", q_latent, cached_latent) + _einsum(
            "bshr,btr->bhst", q_pe, cache.rope_key.astype(q_pe.dtype)
        )
        mask = jnp.arange(max_len)[None, :] <= positions[:, None]  # [seq, max_len]
        probs = _softmax(scores * self.scale, mask, q_nope.dtype)
        mixed = _einsum("bhst,btc->bshc", probs, cached_latent).astype(q_nope.dtype)
        return self.out(_einsum("bshc,chv->bshv", mixed, w_uv).astype(q_nope.dtype)), cache
