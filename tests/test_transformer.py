"""The MoE transformer LM: untrained loss ~ log(vocab), causality, RoPE's
relative-position property, the GLaM every-other-layer structure, aux
aggregation (against a block-by-block forward written here), same active
FLOPs in the presets, dMoE == MoE(capacity_factor=0) at model level, and
config/input validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.presets import preset
from jmoe import CapacityMoE, DenseMLP, DroplessMoE, MoEConfig
from jmoe.attention import rotary_embedding
from jmoe.transformer import MoETransformer, TransformerConfig

VOCAB, D, HEADS, SEQ = 256, 16, 2, 8


def _config(**kw) -> TransformerConfig:
    moe = MoEConfig(
        d_model=D,
        d_ff=32,
        num_experts=4,
        top_k=2,
        block_size=32,
        impl="xla",
        router_z_loss_weight=0.01,
        capacity_factor=kw.pop("capacity_factor", 1.0),
    )
    base = dict(
        vocab_size=VOCAB, d_model=D, num_layers=4, num_heads=HEADS, max_seq_len=SEQ, moe=moe
    )
    return TransformerConfig(**{**base, **kw})


def _tokens(seed=0, batch=2, seq=SEQ):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)


@jax.jit
def _forward(model, tokens):
    return model(tokens)


def test_untrained_loss_is_log_vocab():
    model = MoETransformer(_config(), rngs=nnx.Rngs(0))
    tokens = _tokens(batch=4)
    logits, _ = _forward(model, tokens)
    chex.assert_shape(logits, (4, SEQ, VOCAB))
    chex.assert_type(logits, jnp.float32)
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.asarray(_tokens(seed=1, batch=4))
    ce = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    assert abs(ce - np.log(VOCAB)) < 0.05, ce


@pytest.mark.parametrize("ffn", ["dmoe", "dense"])
def test_causal(ffn):
    """Changing token t leaves the logits of positions < t unchanged (dropless
    routing is per token, so this holds for the dMoE too)."""
    model = MoETransformer(_config(ffn=ffn), rngs=nnx.Rngs(1))
    tokens = _tokens()
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % VOCAB)
    before, _ = _forward(model, tokens)
    after, _ = _forward(model, changed)
    chex.assert_trees_all_close(before[:, :5], after[:, :5], atol=1e-6)
    assert np.abs(np.asarray(before[:, 5:] - after[:, 5:])).max() > 1e-4


def test_rope_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(0)
    q = np.broadcast_to(rng.standard_normal((1, 1, 1, 8)), (1, 12, 1, 8)).astype(np.float32)
    k = np.broadcast_to(rng.standard_normal((1, 1, 1, 8)), (1, 12, 1, 8)).astype(np.float32)
    rq, rk = rotary_embedding(jnp.asarray(q), 10_000.0), rotary_embedding(jnp.asarray(k), 10_000.0)
    scores = np.einsum("mh,nh->mn", np.asarray(rq)[0, :, 0], np.asarray(rk)[0, :, 0])
    for offset in (-3, 0, 2):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(rq), axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(rq)[0, 0], q[0, 0], rtol=1e-6)  # position 0: identity


@pytest.mark.parametrize(
    "ffn,moe_every,routed,expected_layer",
    [
        ("dmoe", 2, (1, 3), DroplessMoE),
        ("moe", 2, (1, 3), CapacityMoE),
        ("dmoe", 1, (0, 1, 2, 3), DroplessMoE),
        ("dense", 1, (), None),
    ],
)
def test_layer_structure(ffn, moe_every, routed, expected_layer):
    config = _config(ffn=ffn, moe_every=moe_every)
    assert config.moe_layers == routed
    model = nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))
    for i, block in enumerate(model.blocks):
        if i in routed:
            assert type(block.ffn) is expected_layer
            assert block.ffn.experts.w1.shape == (4, D, 32)
        else:
            assert type(block.ffn) is DenseMLP
            assert block.ffn.mlp.w1.shape == (D, 2 * 32)  # top_k * d_ff: same active FLOPs
    _, aux = jax.eval_shape(lambda m, t: m(t), model, _tokens())
    chex.assert_shape(aux["tokens_per_expert"], (len(routed), 4))
    chex.assert_shape(aux["dropped_per_layer"], (len(routed),))


@pytest.mark.parametrize("ffn,moe_every", [("moe", 2), ("dmoe", 1)])
def test_aux_aggregation(ffn, moe_every):
    """Model aux == the FFN aux of each block combined (losses: the mean over
    the routed blocks, the default "layer_mean" scope; counts: summed), from a
    forward pass written out block by block here."""
    config = _config(ffn=ffn, moe_every=moe_every, capacity_factor=0.5)
    model = MoETransformer(config, rngs=nnx.Rngs(2))
    tokens = _tokens(batch=3)

    @jax.jit
    def by_block(model, tokens):
        x, layer_aux = model.embed(tokens), []
        for block in model.blocks:
            x = x + block.attn(block.attn_norm(x))
            y, aux = block.ffn(block.ffn_norm(x))
            x = x + y
            layer_aux.append(aux)
        return model.lm_head(model.final_norm(x)), layer_aux

    logits, aux = _forward(model, tokens)
    ref_logits, layer_aux = by_block(model, tokens)
    chex.assert_trees_all_close(logits, ref_logits, atol=1e-5)
    routed = [layer_aux[i] for i in config.moe_layers]
    expected_loss = np.mean([float(a["load_balancing_loss"] + a["router_z_loss"]) for a in routed])
    np.testing.assert_allclose(float(aux["aux_loss"]), expected_loss, rtol=1e-5)
    assert float(aux["router_z_loss"]) > 0 and float(aux["load_balancing_loss"]) > 0
    np.testing.assert_array_equal(
        aux["tokens_per_expert"], np.stack([a["tokens_per_expert"] for a in routed])
    )
    # Every routed layer sees all batch * seq tokens top_k times.
    np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]).sum(-1), 3 * SEQ * 2)
    assert int(aux["dropped_tokens"]) == sum(int(a["dropped_tokens"]) for a in routed)
    np.testing.assert_array_equal(
        aux["dropped_per_layer"], [int(a["dropped_tokens"]) for a in routed]
    )
    if ffn == "moe":  # capacity int(0.5 * 2 * 24 / 4) = 6 of 48 per expert: must drop
        assert int(aux["dropped_tokens"]) > 0
    else:
        assert int(aux["dropped_tokens"]) == 0


def test_dropless_equals_capacity_zero_model():
    """Same parameters: the dMoE model and the MoE model that drops nothing agree."""
    dropless = MoETransformer(_config(ffn="dmoe"), rngs=nnx.Rngs(3))
    capacity = MoETransformer(_config(ffn="moe", capacity_factor=0.0), rngs=nnx.Rngs(4))
    nnx.update(capacity, nnx.state(dropless, nnx.Param))
    tokens = _tokens(batch=3)
    (a, aux_a), (b, aux_b) = _forward(dropless, tokens), _forward(capacity, tokens)
    chex.assert_trees_all_close(a, b, atol=1e-5)
    np.testing.assert_array_equal(aux_a["tokens_per_expert"], aux_b["tokens_per_expert"])
    assert int(aux_b["dropped_tokens"]) == 0


@pytest.mark.parametrize("name", ["xs", "s"])
def test_presets_have_equal_active_ffn_flops(name):
    dense, moe = preset(name, ffn="dense"), preset(name, ffn="moe", capacity_factor=1.5)
    assert dense.vocab_size == 256 and moe.moe.capacity_factor == 1.5
    d = nnx.eval_shape(lambda: MoETransformer(dense, rngs=nnx.Rngs(0)))
    m = nnx.eval_shape(lambda: MoETransformer(moe, rngs=nnx.Rngs(0)))
    dense_ffn = d.blocks[0].ffn.mlp.w1.size + d.blocks[0].ffn.mlp.w2.size
    expert = m.blocks[0].ffn.experts
    per_expert = (expert.w1.size + expert.w2.size) // moe.moe.num_experts
    assert dense_ffn == moe.moe.top_k * per_expert


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(ffn="sparse"), "ffn"),
        (dict(moe_every=3), "moe_every"),
        (dict(num_heads=3), "num_heads"),
        (dict(d_model=32), "moe.d_model"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=1, moe_every=2), "num_layers"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(head_dim=5), "head_dim"),
        (dict(qk_norm="layer"), "qk_norm"),
    ],
)
def test_config_validation(change, argument):
    with pytest.raises(ValueError, match=argument):
        _config(**change)
    with pytest.raises(ValueError, match="name"):
        preset("xl")


def test_input_validation():
    model = nnx.eval_shape(lambda: MoETransformer(_config(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="tokens must be an int array"):
        model(jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((2, SEQ + 1), jnp.int32))
