"""Scan over layers (`TransformerConfig.scan_layers`) against the Python loop
of blocks: parameters copied between the two layouts give the same loss, aux
and gradients (float32, tight tolerance), the same training step (optimizer
moments and DeepSeek expert-bias updates included), the same generated tokens,
and the same Hugging Face files; Orbax checkpoints round-trip; the layout
conversions are exact inverses and refuse the wrong layout. On a ``data=2,fsdp=2,expert=2``
mesh of 8 host devices (tests/conftest.py) the scanned model, its stacked expert weights split
``P(None, "expert", ...)``, gives the one-device loss and gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmoe
import jmoe.hf
from experiments.checkpoint import Checkpoints
from experiments.train import lm_loss, train_step
from helpers.expert_parallel import LOGIC_IMPL
from helpers.hf_fixtures import FIXTURES, expected, random_model
from helpers.host_devices import host_cpus
from jmoe import MoEConfig
from jmoe.hf.files import read_tensors
from jmoe.parallel import make_named_mesh, state_shardings
from jmoe.parallel.mesh import token_spec
from jmoe.scanned_blocks import relayout, stack_layers, unstack_layers
from jmoe.transformer import MoETransformer, TransformerConfig

VOCAB, D, SEQ = 64, 16, 8
IMPL = "xla"
TOL = dict(rtol=1e-5, atol=1e-6)


def _config(moe_kw=(), **kw) -> TransformerConfig:
    moe = MoEConfig(
        d_model=D,
        d_ff=32,
        num_experts=4,
        top_k=2,
        block_size=32,
        impl=IMPL,
        router_z_loss_weight=0.01,
        **dict(moe_kw),
    )
    base = dict(vocab_size=VOCAB, d_model=D, num_layers=4, num_heads=2, max_seq_len=SEQ, moe=moe)
    return TransformerConfig(**{**base, **kw})


def _tokens(seed=0, batch=2, seq=SEQ + 1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)


def _pair(config: TransformerConfig):
    """``(loop model, scanned model with the same parameters)``; numpy-random
    parameters (no initialisers to compile) unless the routers hold RNG streams."""
    if config.moe.router_jitter_eps:
        loop = MoETransformer(config, rngs=nnx.Rngs(0))
    else:
        loop = random_model(config)
    return loop, relayout(loop, scan_layers=True)


def _flat(state) -> dict:
    return {path: np.asarray(leaf.get_value()) for path, leaf in nnx.to_flat_state(state)}


def _assert_states_close(got, want, **tol):
    """``got`` and ``want`` (loop layout) hold the same paths and close values."""
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], **tol, err_msg=str(path))


@nnx.jit
def _loss_and_grads(model, tokens):
    return nnx.value_and_grad(lm_loss, has_aux=True)(model, tokens)


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(moe_every=2, remat="ffn"), marks=pytest.mark.slow),
        pytest.param(
            dict(num_layers=2, moe_kw=dict(router_jitter_eps=0.1)), marks=pytest.mark.slow
        ),
        pytest.param(dict(ffn="moe", remat="block", num_kv_heads=1), marks=pytest.mark.slow),
    ],
    ids=["glam-pairs-ffn-remat", "dmoe-jitter", "capacity-block-remat"],
)
def test_same_loss_aux_and_gradients_as_the_loop(kw):
    loop, scan = _pair(_config(**kw))
    tokens = _tokens()
    (loss, (ce, aux)), grads = _loss_and_grads(loop, tokens)
    (scan_loss, (scan_ce, scan_aux)), scan_grads = _loss_and_grads(scan, tokens)
    np.testing.assert_allclose(scan_loss, loss, **TOL)
    np.testing.assert_allclose(scan_ce, ce, **TOL)
    assert scan_aux.keys() == aux.keys()
    for key in aux:
        np.testing.assert_allclose(scan_aux[key], aux[key], **TOL, err_msg=key)
    assert float(aux["aux_loss"]) > 0
    assert len(_flat(grads)) == len(_flat(nnx.state(loop, nnx.Param)))
    _assert_states_close(unstack_layers(scan_grads), grads, **TOL)
    # the leading layer axis really is there (the comparison is not loop vs loop)
    groups = scan.config.num_layers // scan.config.moe_every
    assert scan.blocks.layers[0].attn_norm.scale.shape == (groups, D)


@pytest.mark.slow
def test_on_a_data_fsdp_expert_mesh_matches_one_device():
    """Expert-parallel dMoE layers inside `nnx.scan`: the scanned body sees the ``[E, a, b]``
    slice of each group's ``[groups, E, a, b]`` expert weights, split over ``"expert"``."""
    config = _config(moe_every=2, scan_layers=True)
    scan = random_model(config.replace(moe=config.moe.replace(impl=LOGIC_IMPL)))
    tokens = _tokens(batch=8)
    with jax.default_device(host_cpus()[0]):
        (loss, (ce, aux)), grads = _loss_and_grads(scan, tokens)
    mesh = make_named_mesh({"data": 2, "fsdp": 2, "expert": 2}, devices=host_cpus())
    state = nnx.state(scan)
    placed = nnx.merge(nnx.graphdef(scan), jax.device_put(state, state_shardings(state, mesh)))
    experts = placed.blocks.layers[1].ffn.experts
    assert experts.w1.get_value().sharding.spec == P(None, "expert", None, "fsdp")  # [2, 4, D, 32]
    assert experts.w2.get_value().sharding.spec == P(None, "expert", "fsdp", None)  # [2, 4, 32, D]
    with jax.set_mesh(mesh):
        (got, (got_ce, got_aux)), got_grads = _loss_and_grads(
            placed, jax.device_put(tokens, NamedSharding(mesh, token_spec(mesh)))
        )
    assert int(got_aux["dropped_tokens"]) == 0
    np.testing.assert_array_equal(got_aux["tokens_per_expert"], aux["tokens_per_expert"])
    np.testing.assert_allclose((got, got_ce), (loss, ce), **TOL)
    _assert_states_close(got_grads, grads, **TOL)


def test_built_scanned_model_has_the_stacked_layout():
    config = _config(moe_every=2, moe_kw=dict(expert_bias=True))
    abstract = lambda c: nnx.state(nnx.eval_shape(lambda: MoETransformer(c, rngs=nnx.Rngs(0))))
    built = jax.tree.map(jnp.shape, abstract(config.replace(scan_layers=True)))
    converted = jax.eval_shape(lambda s: stack_layers(s, 2), abstract(config))
    assert built == jax.tree.map(jnp.shape, converted)
    ffn = built["blocks"]["layers"][1]["ffn"]
    assert ffn["experts"]["w1"].get_value() == (2, 4, D, 32)
    assert ffn["router"]["expert_bias"].get_value() == (2, 4)


def test_layout_conversions_are_exact_inverses_over_optimizer_state():
    loop = random_model(_config(moe_every=2))
    state = nnx.state((loop, nnx.Optimizer(loop, optax.adam(1e-3), wrt=nnx.Param)))
    stacked = stack_layers(state, 2)
    mu = stacked[1]["opt_state"][0]["mu"]["blocks"]["layers"][0]["attn_norm"]["scale"]
    assert mu.get_value().shape == (2, D)
    _assert_states_close(unstack_layers(stacked), state, rtol=0, atol=0)
    with pytest.raises(ValueError, match="loop layout"):
        stack_layers(stacked, 2)
    with pytest.raises(ValueError, match="scanned layout"):
        unstack_layers(state)


@pytest.mark.slow
def test_train_step_with_expert_bias_matches_the_loop():
    """`experiments.train.train_step` (grads, Adam moments, `update_expert_bias`
    inside jit) on both layouts: same metrics and same updated state."""
    deepseek = dict(
        score_function="sigmoid",
        expert_bias=True,
        expert_bias_update_rate=0.01,
        load_balancing_loss_weight=0.0,
        sequence_aux_loss_weight=0.1,
    )
    config = _config(moe_every=2, moe_kw=deepseek)
    loop, scan = _pair(config)
    # eps keeps Adam's first step from amplifying float32 rounding of tiny gradients
    tx = optax.adam(1e-2, eps=1e-3)
    graphdef, state = nnx.split((loop, nnx.Optimizer(loop, tx, wrt=nnx.Param)))
    scan_graphdef, _ = nnx.split((scan, nnx.Optimizer(scan, tx, wrt=nnx.Param)))
    scan_state = stack_layers(state, 2)
    tokens = _tokens(batch=4)
    step = jax.jit(functools.partial(train_step, graphdef))
    scan_step = jax.jit(functools.partial(train_step, scan_graphdef))
    for _ in range(2):
        state, metrics = step(state, tokens)
        scan_state, scan_metrics = scan_step(scan_state, tokens)
        assert scan_metrics.keys() == metrics.keys()
        for key in metrics:
            np.testing.assert_allclose(scan_metrics[key], metrics[key], **TOL, err_msg=key)
    chex.assert_shape(metrics["expert_bias"], (2, 4))  # [moe layers, E]
    assert np.abs(metrics["expert_bias"]).max() > 0  # the biases moved
    _assert_states_close(unstack_layers(scan_state), state, rtol=1e-5, atol=1e-5)


def test_update_expert_bias_refuses_wrong_counts():
    _, scan = _pair(_config(moe_kw=dict(expert_bias=True)))
    with pytest.raises(ValueError, match=r"per biased router layer \(4\)"):
        jmoe.update_expert_bias(scan, {"tokens_per_expert": jnp.zeros((2, 4), jnp.int32)})


@pytest.mark.slow
def test_generate_matches_the_loop():
    loop, scan = _pair(_config(moe_every=2, num_kv_heads=1, max_seq_len=12))
    prompt = _tokens(seed=3, seq=4)
    want = jmoe.generate(loop, prompt, 8)
    np.testing.assert_array_equal(jmoe.generate(scan, prompt, 8), want)
    caches = scan.init_cache(2, 12)
    assert len(caches) == 2 and caches[0].k.shape == (2, 2, 12, 1, D // 2)


def test_orbax_checkpoint_round_trip(tmp_path):
    loop, scan = _pair(_config(moe_every=2, moe_kw=dict(expert_bias=True)))
    nnx.update(scan, jax.tree.map(lambda b: b + 0.5, nnx.state(scan, jmoe.ExpertBias)))
    checkpoints = Checkpoints(tmp_path, every=1)
    checkpoints.save(1, nnx.state(scan), {"layout": "scan"}, force=True)
    checkpoints.close()
    fresh = relayout(random_model(loop.config, seed=1), scan_layers=True)
    restored, meta = Checkpoints(tmp_path, every=1).restore(1, nnx.state(fresh))
    assert meta == {"layout": "scan"}
    _assert_states_close(unstack_layers(restored), unstack_layers(nnx.state(scan)), rtol=0, atol=0)


@pytest.mark.slow
def test_hf_load_and_save_with_scan_layers(tmp_path):
    loop = jmoe.hf.load(FIXTURES / "mixtral")
    scan = jmoe.hf.load(FIXTURES / "mixtral", scan_layers=True)
    assert scan.config.scan_layers
    _assert_states_close(unstack_layers(nnx.state(scan)), nnx.state(loop), rtol=0, atol=0)
    want = expected("mixtral")
    logits, _ = nnx.jit(lambda m, t: m(t))(scan, jnp.asarray(want["logits_tokens"]))
    scale = np.abs(want["logits"]).max()
    np.testing.assert_array_less(np.abs(np.asarray(logits) - want["logits"]).max(), 1e-4 * scale)
    jmoe.hf.save(scan, tmp_path / "scan")
    jmoe.hf.save(loop, tmp_path / "loop")
    saved, reference = read_tensors(tmp_path / "scan"), read_tensors(tmp_path / "loop")
    assert saved.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(saved[name], reference[name], err_msg=name)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of moe_every=2"):
        _config(num_layers=3, moe_every=2, scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers must be a bool"):
        _config(scan_layers="yes")
