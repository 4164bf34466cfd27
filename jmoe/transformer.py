"""A decoder-only MoE transformer language model (pre-norm, RoPE).

``logits, aux = MoETransformer(config, rngs=rngs)(tokens)``. Every block is
``x + attn(norm(x))`` then ``x + ffn(norm(x))``; the FFN of a block is a
`DroplessMoE`, a `CapacityMoE` or a `DenseMLP` (`TransformerConfig.ffn`),
either in every block or, GLaM style (``moe_every=2``), in every other block
with dense MLPs in between. Dense MLPs have hidden width ``top_k * d_ff`` so
that a dense model spends the same FLOPs per token in its FFNs as a routed one
of the same ``moe`` config. The experiments' model sizes are in
``experiments/presets.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.attention import QK_NORMS, CausalSelfAttention, KVCache
from jmoe.config import MoEConfig, require
from jmoe.dense import DenseMLP
from jmoe.loss_scope import LOSS_SCOPES, combine_losses
from jmoe.mla import LatentAttention, MLAConfig
from jmoe.moe import CapacityMoE, DroplessMoE
from jmoe.scanned_blocks import ScannedBlocks

FFN_KINDS = ("dmoe", "moe", "dense")
MOE_EVERY = (1, 2)
REMAT_KINDS = ("none", "ffn", "block")


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
      num_kv_heads: key/value heads (grouped-query attention; must divide
        ``num_heads``); None: ``num_heads`` (multi-head).
      head_dim: width of one head (even); None: ``d_model / num_heads``.
      qk_norm: None, ``"projection"`` (RMSNorm over the whole q and k
        projections, OLMoE) or ``"head"`` (RMSNorm per head, Qwen3).
      tie_embeddings: the output projection is the transposed embedding
        (no ``lm_head`` parameter).
      rope_base: RoPE wavelength base.
      norm_eps: RMSNorm epsilon.
      routed_layers: indices of the blocks whose FFN is routed, overriding
        ``moe_every`` (Qwen2-MoE's ``mlp_only_layers``, DeepSeek-V3's
        ``first_k_dense_replace``); None: from ``moe_every``.
      dense_hidden: hidden width of the dense-MLP blocks; None: ``top_k * d_ff``.
      attention_bias: q/k/v projections with biases (Qwen2).
      mla: multi-head latent attention (DeepSeek-V3, `jmoe.mla`) instead of
        `CausalSelfAttention`; ``num_kv_heads``, ``head_dim`` and ``qk_norm``
        do not apply.
      remat: activation memory (``jax.checkpoint``, saving nothing inside):
        ``"none"`` keeps every activation for the backward; ``"ffn"``
        recomputes each FFN's (router, permutation, expert MLP) in the
        backward; ``"block"`` recomputes each whole block, keeping only its
        input.
      load_balancing_loss_scope: how the MoE layers' routing losses combine
        (`jmoe.loss_scope`): ``"layer_mean"`` (MegaBlocks: the mean of the
        layers' own losses) or ``"global"`` (transformers: one balancing loss
        over all layers' tokens pooled; `jmoe.hf.load` sets it).
      scan_layers: stack the blocks' parameters on a leading layer axis and
        run them under ``nnx.scan`` (one compiled group of ``moe_every``
        blocks at any depth; see `jmoe.scanned_blocks`); needs ``num_layers``
        a multiple of ``moe_every``.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    max_seq_len: int
    moe: MoEConfig
    ffn: str = "dmoe"
    moe_every: int = 1
    num_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: str | None = None
    tie_embeddings: bool = False
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    remat: str = "none"
    load_balancing_loss_scope: str = "layer_mean"
    scan_layers: bool = False
    routed_layers: tuple[int, ...] | None = None
    dense_hidden: int | None = None
    attention_bias: bool = False
    mla: MLAConfig | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value >= 1,
                f"{name} must be a positive int, got {value!r}",
            )
        require(
            isinstance(self.moe, MoEConfig),
            f"moe must be a MoEConfig, got {type(self.moe).__name__}",
        )
        require(
            self.moe.d_model == self.d_model,
            f"moe.d_model must equal d_model={self.d_model}, got {self.moe.d_model}",
        )
        if self.head_dim is None:
            require(
                self.d_model % self.num_heads == 0 and (self.d_model // self.num_heads) % 2 == 0,
                f"num_heads must split d_model={self.d_model} into even head dims, "
                f"got {self.num_heads}",
            )
        else:
            require(
                isinstance(self.head_dim, int) and self.head_dim >= 2 and self.head_dim % 2 == 0,
                f"head_dim must be None or an even int >= 2, got {self.head_dim!r}",
            )
        require(
            self.num_kv_heads is None
            or (
                isinstance(self.num_kv_heads, int)
                and self.num_kv_heads >= 1
                and self.num_heads % self.num_kv_heads == 0
            ),
            f"num_kv_heads must be None or divide num_heads={self.num_heads}, "
            f"got {self.num_kv_heads!r}",
        )
        require(
            self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}"
        )
        require(self.ffn in FFN_KINDS, f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        require(
            self.moe_every in MOE_EVERY,
            f"moe_every must be one of {MOE_EVERY}, got {self.moe_every!r}",
        )
        require(
            self.ffn == "dense" or self.num_layers >= self.moe_every,
            f"num_layers={self.num_layers} leaves no MoE block at moe_every={self.moe_every}",
        )
        require(self.rope_base > 0, f"rope_base must be > 0, got {self.rope_base}")
        require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        require(
            self.remat in REMAT_KINDS, f"remat must be one of {REMAT_KINDS}, got {self.remat!r}"
        )
        require(
            self.load_balancing_loss_scope in LOSS_SCOPES,
            f"load_balancing_loss_scope must be one of {LOSS_SCOPES}, "
            f"got {self.load_balancing_loss_scope!r}",
        )
        require(
            isinstance(self.scan_layers, bool),
            f"scan_layers must be a bool, got {self.scan_layers!r}",
        )
        require(
            not self.scan_layers or self.num_layers % self.moe_every == 0,
            f"num_layers={self.num_layers} must be a multiple of moe_every={self.moe_every} "
            "with scan_layers",
        )
        self._check_layer_options()

    def _check_layer_options(self):
        layers = self.routed_layers
        require(
            layers is None
            or (
                isinstance(layers, tuple)
                and list(layers) == sorted(set(layers))
                and all(isinstance(i, int) and 0 <= i < self.num_layers for i in layers)
            ),
            f"routed_layers must be None or a sorted tuple of distinct block indices in "
            f"[0, num_layers={self.num_layers}), got {layers!r}",
        )
        require(
            self.dense_hidden is None
            or (isinstance(self.dense_hidden, int) and self.dense_hidden >= 1),
            f"dense_hidden must be None or a positive int, got {self.dense_hidden!r}",
        )
        require(
            self.mla is None or isinstance(self.mla, MLAConfig),
            f"mla must be None or an MLAConfig, got {type(self.mla).__name__}",
        )
        require(
            self.mla is None or (self.qk_norm is None and not self.attention_bias),
            "qk_norm and attention_bias do not apply to mla attention",
        )
        require(
            not self.scan_layers or (self.routed_layers is None and self.mla is None),
            "scan_layers needs the regular moe_every pattern and standard attention "
            f"(routed_layers=None, mla=None), got routed_layers={self.routed_layers!r}, "
            f"mla={'set' if self.mla is not None else None}",
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose FFN is routed (empty for ``ffn="dense"``)."""
        if self.ffn == "dense":
            return ()
        if self.routed_layers is not None:
            return self.routed_layers
        return tuple(i for i in range(self.num_layers) if i % self.moe_every == self.moe_every - 1)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``num_kv_heads``, or ``num_heads`` when None)."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """Width of one attention head (``head_dim``, or ``d_model / num_heads``)."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def dense_d_ff(self) -> int:
        """Hidden width of the dense MLPs: ``dense_hidden``, else ``top_k * d_ff``
        (same active FLOPs)."""
        return self.dense_hidden or self.moe.top_k * self.moe.d_ff

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)


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
        self.attn = (
            CausalSelfAttention(
                config.d_model,
                config.num_heads,
                rope_base=config.rope_base,
                **dtypes,
                rngs=rngs,
                num_kv_heads=config.kv_heads,
                head_dim=config.head_size,
                qk_norm=config.qk_norm,
                norm_eps=config.norm_eps,
                qkv_bias=config.attention_bias,
            )
            if config.mla is None
            else LatentAttention(
                config.d_model,
                config.num_heads,
                config.mla,
                rope_base=config.rope_base,
                **dtypes,
                rngs=rngs,
            )
        )
        self.ffn_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps, **dtypes, rngs=rngs)
        self.ffn = _ffn(config, routed, rngs)
        self.remat = config.remat

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``segment_ids``, ``positions``: see `MoETransformer.__call__`."""
        if self.remat == "block":
            return _recomputed(Block._forward)(self, x, segment_ids, positions)
        return self._forward(x, segment_ids, positions)

    def _forward(self, x: jax.Array, segment_ids=None, positions=None):
        attended = self.attn(self.attn_norm(x), segment_ids, positions)
        return self._ffn_residual(x + attended, None if segment_ids is None else segment_ids > 0)

    def _ffn_residual(self, x: jax.Array, mask: jax.Array | None = None):
        ffn = _recomputed(_call) if self.remat == "ffn" else _call
        y, aux = ffn(self.ffn, self.ffn_norm(x), mask)
        return x + y.astype(x.dtype), aux

    def cached(
        self, x: jax.Array, cache: KVCache, position: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array], KVCache]:
        """The block at positions ``position ..`` with a KV cache (see
        `CausalSelfAttention.cached`): ``-> (x, ffn aux, updated cache)``."""
        attended, cache = self.attn.cached(self.attn_norm(x), cache, position)
        return *self._ffn_residual(x + attended), cache


def _call(module: nnx.Module, x: jax.Array, mask: jax.Array | None = None):
    """``module(x)``; a MoE layer also gets ``mask`` (a dense MLP is per token)."""
    return module(x) if mask is None or isinstance(module, DenseMLP) else module(x, mask=mask)


def _recomputed(fn):
    """``fn`` under `nnx.remat` saving nothing: the backward recomputes its activations."""
    return nnx.remat(fn, policy=jax.checkpoint_policies.nothing_saveable)


def aggregate_aux(
    layer_aux: list[dict],
    moe_layers: tuple[int, ...],
    num_experts: int,
    *,
    scope: str = "layer_mean",
    balance_weight: float = 0.0,
    mask: jax.Array | None = None,
) -> dict:
    """Combines the per-block aux dicts into the model's aux.

    Returns ``aux_loss`` (``load_balancing_loss + router_z_loss +
    sequence_aux_loss``), those three as ``scope`` combines them
    (`jmoe.loss_scope.combine_losses`: ``"layer_mean"``, the mean over the
    MoE layers, or ``"global"``, transformers' pooled balancing loss weighted
    by ``balance_weight``, over the real tokens of ``mask [batch, seq]`` when
    given), ``tokens_per_expert [len(moe_layers), E] int32`` (routed blocks
    only), ``dropped_tokens`` (int32 sum) and ``dropped_per_layer
    [len(moe_layers)] int32`` (each routed block's); ``ep_rounds`` (the most of
    any block) when the blocks report it.
    """
    losses = combine_losses(layer_aux, moe_layers, scope, balance_weight, mask)
    routed = [layer_aux[i]["tokens_per_expert"] for i in moe_layers]
    rounds = [aux["ep_rounds"] for aux in layer_aux if "ep_rounds" in aux]
    return {
        **({"ep_rounds": jnp.max(jnp.stack(rounds))} if rounds else {}),
        "aux_loss": sum(losses.values()),
        **losses,
        "tokens_per_expert": (
            jnp.stack(routed) if routed else jnp.zeros((0, num_experts), jnp.int32)
        ),
        "dropped_tokens": sum(aux["dropped_tokens"] for aux in layer_aux),
        "dropped_per_layer": (
            jnp.stack([layer_aux[i]["dropped_tokens"] for i in moe_layers])
            if moe_layers
            else jnp.zeros((0,), jnp.int32)
        ),
    }


class MoETransformer(nnx.Module):
    """Decoder-only LM: ``tokens [batch, seq] int`` -> ``(logits, aux)``.

    ``logits``: ``[batch, seq, vocab_size]`` float32; ``aux``: see
    `aggregate_aux`. Parameters: ``embed.embedding [vocab, d_model]``,
    ``blocks[i]`` (`Block`), ``final_norm``, ``lm_head.kernel [d_model, vocab]``
    (initialised small so an untrained model predicts ~uniformly; None with
    ``tie_embeddings``, which projects with the embedding instead).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = dict(dtype=config.moe.dtype, param_dtype=config.moe.param_dtype)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, **dtypes, rngs=rngs)
        routed = set(config.moe_layers)
        self.blocks = (
            ScannedBlocks(config, Block, rngs=rngs)
            if config.scan_layers
            else nnx.List([Block(config, i in routed, rngs=rngs) for i in range(config.num_layers)])
        )
        self.final_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps, **dtypes, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=False,
                kernel_init=nnx.initializers.normal(0.02),
                **dtypes,
                rngs=rngs,
            )
        )

    @staticmethod
    def _check_tokens(tokens: jax.Array, limit: int, limit_name: str):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array [batch, seq], got {tokens.dtype}{list(tokens.shape)}"
            )
        if tokens.shape[1] > limit:
            raise ValueError(f"tokens: seq={tokens.shape[1]} exceeds {limit_name}={limit}")

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """Zeroed KV caches of every block, ``[batch, max_len, kv_heads, head_dim]``
        in the compute dtype (with ``scan_layers``: ``moe_every`` caches stacked
        ``[num_layers / moe_every, ...]``, see `ScannedBlocks.stack`;
        with ``mla``, `jmoe.mla.LatentCache`s)."""
        c = self.config
        require(
            1 <= max_len <= c.max_seq_len,
            f"max_len must be in [1, max_seq_len={c.max_seq_len}], got {max_len}",
        )
        if c.mla is not None:
            return [block.attn.init_cache(batch, max_len) for block in self.blocks]
        zeros = lambda: jnp.zeros((batch, max_len, c.kv_heads, c.head_size), c.moe.dtype)
        caches = [KVCache(zeros(), zeros()) for _ in range(c.num_layers)]
        return self.blocks.stack(caches) if c.scan_layers else caches

    def cached(
        self,
        tokens: jax.Array,
        caches: list[KVCache],
        position: jax.Array,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, list[KVCache]]:
        """Logits of ``tokens [batch, seq]`` at positions ``position ..
        position + seq - 1`` given the earlier positions' KV caches (from
        `init_cache`): ``-> (logits [batch, seq, vocab] float32, updated caches)``;
        ``[batch, 1, vocab]``, the last position's, with ``last_only`` (a
        prefill then skips ``seq - 1`` positions' ``[d_model, vocab]`` GEMMs).
        Used by `jmoe.generate` for the prefill (``position`` 0) and each decode step.
        """
        length_axis = 2 if self.config.scan_layers else 1  # stacked: [groups, batch, len, ...]
        self._check_tokens(
            tokens, jax.tree.leaves(caches[0])[0].shape[length_axis], "the cache length"
        )
        x = self.embed(tokens)
        if self.config.scan_layers:
            x, updated = self.blocks.cached(x, caches, position)
        else:
            updated = []
            for block, cache in zip(self.blocks, caches):
                x, _, cache = block.cached(x, cache, position)
                updated.append(cache)
        return self._logits(x[:, -1:] if last_only else x), updated

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``tokens [batch, seq]`` int -> ``(logits [batch, seq, vocab] float32, aux)``.

        Packed documents: ``segment_ids [batch, seq]`` int (1, 2, ... per
        document, 0 for padding) keep attention inside each document and keep
        padding out of the MoE layers (no expert, no count, no aux loss; the
        ``"global"`` balancing loss pools the real tokens only);
        ``positions [batch, seq]`` int restart the RoPE positions in each
        document (default ``0..seq-1``). ``mask [batch, seq]`` (nonzero: real
        tokens, Hugging Face's ``attention_mask``) marks padding the same way
        (segment 0).
        """
        self._check_tokens(tokens, self.config.max_seq_len, "max_seq_len")
        for name, value in (("segment_ids", segment_ids), ("positions", positions), ("mask", mask)):
            if value is not None and value.shape != tokens.shape:
                raise ValueError(
                    f"{name} must have the tokens' shape {tuple(tokens.shape)}, "
                    f"got {tuple(value.shape)}"
                )
        if mask is not None:
            real = jnp.asarray(mask) != 0
            segment_ids = jnp.where(real, 1 if segment_ids is None else segment_ids, 0)
        x = self.embed(tokens)
        if self.config.scan_layers:
            x, layer_aux = self.blocks(x, segment_ids, positions)
        else:
            layer_aux = []
            for block in self.blocks:
                x, aux = block(x, segment_ids, positions)
                layer_aux.append(aux)
        return self._logits(x), aggregate_aux(
            layer_aux,
            self.config.moe_layers,
            self.config.moe.num_experts,
            scope=self.config.load_balancing_loss_scope,
            balance_weight=self.config.moe.load_balancing_loss_weight,
            # the layers leave padding out of their own losses; the pooled loss needs the mask
            mask=(
                segment_ids > 0
                if segment_ids is not None and self.config.load_balancing_loss_scope == "global"
                else None
            ),
        )
