"""Masks end to end: padding tokens in the MoE layers (one device and expert
parallel) against the float64 NumPy loop, the sequence-wise loss over real
tokens, and packed documents in the transformer (no attention across a
document boundary, RoPE positions restarting per document)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.pipeline import prediction_mask
from helpers import numpy_reference as ref
from helpers.expert_parallel import LOGIC_IMPL, layer_config
from helpers.host_devices import host_cpus
from jmoe import CapacityMoE, DroplessMoE, MoEConfig
from jmoe.parallel import make_mesh
from jmoe.router import sequence_aux_loss
from jmoe.transformer import MoETransformer, TransformerConfig

D = 8
TOL = dict(rtol=2e-5, atol=2e-5)
# [3, 8]: row 0 fully masked, row 1 all but one token masked, row 2 random.
MASK = np.array(
    [[0] * 8, [0, 0, 0, 0, 0, 1, 0, 0], [1, 0, 1, 1, 0, 1, 1, 0]],
    bool,
)


def _config(**kw):
    base = dict(d_ff=16, num_experts=4, shared_expert_gate=True, load_balancing_loss_weight=0.1)
    return layer_config(D, **{**base, **kw})


def _layer(layer, config, seed=0):
    """``layer(config)`` with fan-in scaled random parameters."""
    model = layer(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    fresh = lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]), a.dtype)
    nnx.update(model, jax.tree.map(fresh, state))
    return model


@nnx.jit
def _outputs(model, x, mask, dy):
    """``(y, aux, grads)``: grads of ``sum(y * dy) + load balancing + z loss``
    for the parameters (a pure dict) and ``x``."""

    def loss(model, x):
        y, aux = model(x, mask=mask)
        return jnp.sum(y * dy) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)

    (_, (y, aux)), (params, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, aux, {**nnx.to_pure_dict(nnx.state(params, nnx.Param)), "x": dx}


def _inputs(shape, seed=1):
    rng = np.random.default_rng(seed)
    x, dy = (jnp.asarray(rng.standard_normal((*shape, D)), jnp.float32) for _ in range(2))
    return x, dy


@pytest.mark.parametrize("layer", [DroplessMoE, CapacityMoE])
def test_masked_layer_matches_numpy_loop(layer):
    """Output, counts, aux losses and every gradient of a ``[batch, seq]``
    masked layer equal the NumPy loop over the real tokens only (masked
    tokens: output and gradient 0); capacity factor 0 drops nothing."""
    config = _config(capacity_factor=0.0)
    model = _layer(layer, config)
    x, dy = _inputs(MASK.shape)
    y, aux, grads = _outputs(model, x, jnp.asarray(MASK), dy)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    flat = lambda a: np.asarray(a).reshape(-1, D)
    want_y, want_aux, want_grads = ref.moe(params, flat(x), config, flat(dy), MASK.reshape(-1))
    chex.assert_trees_all_equal(aux["tokens_per_expert"], want_aux["tokens_per_expert"])
    assert int(aux["tokens_per_expert"].sum()) == MASK.sum() * config.top_k
    assert int(aux["dropped_tokens"]) == 0
    chex.assert_trees_all_close(y.reshape(-1, D), want_y, **TOL)
    assert not np.any(np.asarray(y)[~MASK])
    chex.assert_trees_all_close(
        (aux["load_balancing_loss"], aux["router_z_loss"]),
        (want_aux["load_balancing_loss"], want_aux["router_z_loss"]),
        rtol=1e-5,
        atol=1e-7,
    )
    grads["x"] = grads["x"].reshape(-1, D)
    chex.assert_trees_all_close(grads, want_grads, **TOL)


def test_masked_tokens_take_no_capacity():
    """Every token routes to expert 1 (capacity 8 of 32 slots): with the first
    8 tokens masked, tokens 8..15 take the slots and 16 are dropped."""
    config = _config(num_experts=4, top_k=1, capacity_factor=1.0, num_shared_experts=0)
    model = _layer(CapacityMoE, config)
    model.router.kernel[...] = jnp.zeros((D, 4)).at[:, 1].set(1.0)
    x = jnp.abs(_inputs((32,))[0]) + 0.5
    mask = jnp.arange(32) >= 8
    y, aux = nnx.jit(lambda m, x, mask: m(x, mask=mask))(model, x, mask)
    assert int(aux["dropped_tokens"]) == 24 - 8
    chex.assert_trees_all_equal(aux["tokens_per_expert"], np.array([0, 24, 0, 0], np.int32))
    kept = np.any(np.asarray(y) != 0, axis=1)
    chex.assert_trees_all_equal(kept, (np.arange(32) >= 8) & (np.arange(32) < 16))


@pytest.mark.slow
def test_masked_layer_under_expert_parallelism_matches_one_device():
    """2 x 4 host mesh: the same output, counts, losses and gradients as one device."""
    config = _config(num_experts=8)
    mask = jnp.asarray(np.concatenate([MASK, MASK[::-1]]))  # [6, 8]: 48 tokens
    x, dy = _inputs(mask.shape)
    with jax.default_device(host_cpus()[0]):
        want = _outputs(_layer(DroplessMoE, config), x, mask, dy)
    model = _layer(DroplessMoE, config)
    mesh = make_mesh(2, 4, devices=host_cpus())
    with jax.set_mesh(mesh):
        tokens = NamedSharding(mesh, P("data"))
        got = _outputs(model, jax.device_put(x, tokens), jax.device_put(mask, tokens), dy)
    chex.assert_trees_all_equal(got[1]["tokens_per_expert"], want[1]["tokens_per_expert"])
    assert int(got[1]["tokens_per_expert"].sum()) == int(mask.sum()) * config.top_k
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_sequence_aux_loss_counts_real_tokens_only():
    """Masked: the mean over the sequences that have real tokens of the loss
    of those tokens alone (a fully masked row is left out)."""
    rng = np.random.default_rng(3)
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((24, 4)), jnp.float32))
    expert_ids = jnp.asarray(np.argsort(-np.asarray(probs), axis=1)[:, :2], jnp.int32)
    mask = MASK.reshape(-1)
    got = sequence_aux_loss(probs, expert_ids, num_sequences=3, mask=jnp.asarray(mask))
    rows = [np.arange(8 * s, 8 * s + 8)[MASK[s]] for s in (1, 2)]
    want = np.mean([float(sequence_aux_loss(probs[r], expert_ids[r])) for r in rows])
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_bad_mask_is_rejected():
    model = _layer(DroplessMoE, _config())
    x = jnp.zeros((3, 8, D))
    with pytest.raises(ValueError, match=r"mask must be None or a bool array of shape \(3, 8\)"):
        model(x, mask=jnp.ones((24,), bool))


@functools.cache
def _transformer():
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, block_size=32, impl=LOGIC_IMPL)
    config = TransformerConfig(
        vocab_size=64, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, moe=moe
    )
    return MoETransformer(config, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_packed_documents_equal_separate_documents():
    """Two documents packed into one row (then padding) give the logits of
    each run alone (at the start of a row, whatever follows: attention is
    causal), and the MoE layers count only their tokens."""
    model = _transformer()
    run = nnx.jit(lambda m, *a: m(*a))
    a, b = np.arange(1, 6), np.arange(20, 27)  # 5 and 7 tokens
    rows = np.full((3, 16), 9, np.int32)
    rows[0, :12], rows[1, :5], rows[2, :7] = np.concatenate([a, b]), a, b
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 4], np.int32)
    positions = np.array([list(range(5)) + list(range(7)) + [0] * 4], np.int32)
    logits, aux = run(model, *(jnp.asarray(v) for v in (rows[:1], segment_ids, positions)))
    alone, _ = run(model, jnp.asarray(rows[1:]))
    chex.assert_trees_all_close(logits[0, :5], alone[0, :5], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(logits[0, 5:12], alone[1, :7], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(aux["tokens_per_expert"].sum(-1), np.array([12 * 2] * 2))


def test_prediction_mask_skips_padding_and_boundaries():
    segment_ids = np.array([[1, 1, 1, 2, 2, 0, 0]])
    want = [[True, True, False, True, False, False]]
    chex.assert_trees_all_equal(prediction_mask(segment_ids), np.array(want))
