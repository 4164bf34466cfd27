"""DeepSeek-V3 routing: group-limited top-k, aux-loss-free expert bias, routed
scaling and the sequence-wise balance loss, against the independent NumPy
reference (`numpy_reference.deepseek_moe`, float64): forward and every
gradient (x, router kernel, experts, shared experts); adversarial routings
(all groups equal, one dominating group, ties, one token); the bias update
(direction, magnitude, per layer, global counts under expert parallelism,
skipped by optimizers, kept by Orbax checkpoints); config errors.

Tolerances: float32 vs float64 ``rtol=atol=2e-5`` as in test_layers.py (all
values O(1-10)); losses ``rtol=1e-4``.
"""

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

from experiments.checkpoint import Checkpoints
from experiments.config import TRAINING_EP_BUFFER_FACTOR
from experiments.presets import preset
from experiments.train import (
    TrainConfig,
    _interval_record,
    config_from_args,
    optimizer,
    parse_args,
    train_step,
)
from helpers import numpy_reference as ref
from helpers.expert_parallel import LOGIC_IMPL
from helpers.host_devices import host_cpus
from jmoe import DroplessMoE, ExpertBias, MoEConfig, update_expert_bias
from jmoe.parallel import make_mesh, state_shardings
from jmoe.router import expert_bias_update, select_experts, sequence_aux_loss
from jmoe.transformer import MoETransformer, TransformerConfig

D = 8
TOL = dict(rtol=2e-5, atol=2e-5)


def _config(**kw):
    base = dict(
        d_model=D,
        d_ff=16,
        num_experts=8,
        top_k=2,
        expert_type="glu",
        block_size=32,
        impl=LOGIC_IMPL,
        score_function="sigmoid",
        load_balancing_loss_weight=0.0,
    )
    return MoEConfig(**{**base, **kw})


def _build(config, seed, bias=None):
    """A `DroplessMoE` with fan-in scaled NumPy parameters and ``bias`` (if the
    config has one). Built by ``nnx.eval_shape`` (initialisers not compiled)."""
    model = nnx.eval_shape(lambda: DroplessMoE(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(
        params,
        jax.tree.map(
            lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]), a.dtype),
            nnx.to_pure_dict(params),
        ),
    )
    nnx.update(model, params)
    if config.expert_bias:
        model.router.expert_bias.set_value(
            jnp.asarray(np.zeros(config.num_experts) if bias is None else bias, jnp.float32)
        )
    return model


LOSSES = ("load_balancing_loss", "router_z_loss", "sequence_aux_loss")


@nnx.jit
def _run(model, x, dy):
    """``(y, aux, grads)``: gradients (``nnx.Param``s and ``"x"``) of
    ``sum(y * dy)`` plus every aux loss."""

    def loss(model, x):
        y, aux = model(x)
        return jnp.sum(y * dy) + sum(aux[key] for key in LOSSES), (y, aux)

    (_, (y, aux)), (grads, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, aux, {**nnx.to_pure_dict(grads), "x": dx}


def _bias(config, seed):
    """A bias large enough to change the selection of some tokens."""
    if not config.expert_bias:
        return None
    return np.random.default_rng(seed + 100).uniform(-0.3, 0.3, config.num_experts)


CASES = {
    # DeepSeek-V3: sigmoid, 4 groups of 2, best 2 groups, bias, renormalised, x2.5,
    # shared expert, sequence-wise loss over 3 sequences, plus LBL and z-loss.
    "deepseek_v3": (
        dict(
            num_expert_groups=4,
            top_k_groups=2,
            top_k=3,
            expert_bias=True,
            normalize_top_k=1.0,
            routed_scaling_factor=2.5,
            num_shared_experts=1,
            sequence_aux_loss_weight=0.1,
            load_balancing_loss_weight=0.05,
            router_z_loss_weight=0.01,
        ),
        (3, 5),
    ),
    # One group (G = 1), no renormalisation, bias; 2-D input is one sequence.
    "one_group_unnormalised": (
        dict(expert_bias=True, routed_scaling_factor=1.5, sequence_aux_loss_weight=0.2),
        7,
    ),
    # Softmax scores with groups, GeLU experts, no bias.
    "softmax_groups": (
        dict(
            score_function="softmax",
            expert_type="mlp",
            num_expert_groups=2,
            top_k_groups=1,
            sequence_aux_loss_weight=0.1,
        ),
        (2, 4),
    ),
    # One token.
    "one_token": (
        dict(
            num_expert_groups=4,
            top_k_groups=1,
            expert_bias=True,
            normalize_top_k=1.0,
            routed_scaling_factor=2.5,
            sequence_aux_loss_weight=0.1,
        ),
        1,
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        "deepseek_v3",
        "one_token",
        pytest.param("one_group_unnormalised", marks=pytest.mark.slow),
        pytest.param("softmax_groups", marks=pytest.mark.slow),
    ],
)
def test_layer_matches_numpy_reference(name):
    kw, lead = CASES[name]
    config = _config(**kw)
    model = _build(config, seed=len(name), bias=_bias(config, len(name)))
    rng = np.random.default_rng(1)
    shape = (*np.atleast_1d(lead), D)
    x, dy = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    y, aux, grads = _run(model, x, dy)

    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    sequences = lead[0] if isinstance(lead, tuple) else 1
    want_y, want_aux, want_grads = ref.deepseek_moe(
        params,
        np.asarray(x).reshape(-1, D),
        config,
        np.asarray(dy).reshape(-1, D),
        _bias(config, len(name)),
        num_sequences=sequences,
    )
    chex.assert_trees_all_equal(
        aux["tokens_per_expert"], want_aux["tokens_per_expert"].astype(np.int32)
    )
    chex.assert_trees_all_close(y.reshape(-1, D), want_y, **TOL)
    chex.assert_trees_all_close(
        [aux[k] for k in LOSSES], [want_aux[k] for k in LOSSES], rtol=1e-4, atol=1e-7
    )
    if config.sequence_aux_loss_weight:
        assert float(aux["sequence_aux_loss"]) > 0
    grads["x"] = grads["x"].reshape(-1, D)
    chex.assert_trees_all_close(grads, want_grads, **TOL)


def _route(logits, config, bias=None):
    """(expert_ids, gates) of the layer's router and of the reference."""
    gates, expert_ids, _ = jax.jit(select_experts, static_argnums=1)(
        jnp.asarray(logits, jnp.float32),
        config,
        None if bias is None else jnp.asarray(bias, jnp.float32),
    )
    want_idx, want_w, *_ = ref.deepseek_route(logits, config, bias)
    chex.assert_trees_all_equal(expert_ids, want_idx.astype(np.int32))
    chex.assert_trees_all_close(gates, want_w, rtol=1e-6, atol=1e-7)
    return np.asarray(expert_ids), np.asarray(gates)


def test_all_groups_equal_take_the_lowest_ids():
    """Equal scores everywhere: the first groups, then the lowest experts, win."""
    config = _config(
        num_expert_groups=4,
        top_k_groups=2,
        top_k=3,
        normalize_top_k=1.0,
        routed_scaling_factor=2.5,
        expert_bias=True,
    )
    expert_ids, gates = _route(np.zeros((5, 8)), config, np.zeros(8))
    chex.assert_trees_all_equal(expert_ids, np.tile([0, 1, 2], (5, 1)))
    chex.assert_trees_all_close(gates, np.full((5, 3), 2.5 / 3), rtol=1e-6)


def test_one_dominating_group_takes_its_experts_first():
    """Group 2 (experts 4, 5) scores far above the rest: with one eligible
    group every token routes to 4 and 5; with two, the third expert comes from
    the best other group."""
    logits = np.random.default_rng(0).standard_normal((6, 8))
    logits[:, 4:6] += 8.0
    _route(logits, _config(num_expert_groups=4, top_k_groups=1, top_k=2), None)
    expert_ids, _ = _route(logits, _config(num_expert_groups=4, top_k_groups=2, top_k=3), None)
    assert all({4, 5} <= set(row) for row in expert_ids)
    expert_ids, _ = _route(logits, _config(num_expert_groups=4, top_k_groups=1, top_k=2), None)
    chex.assert_trees_all_equal(np.sort(expert_ids, -1), np.tile([4, 5], (6, 1)))


def test_group_score_is_the_sum_of_its_top_two():
    """Selection scores 0.5 + bias in 3 groups of 4: group 0 has the single
    best expert (1.1), group 1 the largest total (2.0), group 2 the best top-2
    sum (1.3 > 1.1 > 1.0). Only the top-2 rule picks group 2."""
    bias = np.array([0.6, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.15, 0.15, -0.5, -0.5])
    config = _config(num_experts=12, num_expert_groups=3, top_k_groups=1, top_k=2, expert_bias=True)
    expert_ids, gates = _route(np.zeros((2, 12)), config, bias)
    chex.assert_trees_all_equal(expert_ids, np.tile([8, 9], (2, 1)))
    chex.assert_trees_all_close(gates, np.full((2, 2), 0.5), rtol=1e-6)  # unbiased sigmoid(0)


def test_tied_group_scores_go_to_the_lower_group():
    """Group 0's top two (0.9, 0.1) and group 1's (0.5, 0.5) both sum to 1.0."""
    bias = np.array([0.4, -0.4, 0.0, 0.0, -0.3, -0.3, -0.3, -0.3])
    config = _config(num_expert_groups=4, top_k_groups=1, expert_bias=True)
    expert_ids, _ = _route(np.zeros((3, 8)), config, bias)
    chex.assert_trees_all_equal(expert_ids, np.tile([0, 1], (3, 1)))


def test_bias_changes_selection_not_weights():
    logits = np.random.default_rng(2).standard_normal((10, 8))
    bias = np.zeros(8)
    bias[5] = 10.0
    config = _config(top_k=2, expert_bias=True, routed_scaling_factor=2.0)
    expert_ids, gates = _route(logits, config, bias)
    assert (expert_ids[:, 0] == 5).all()
    chex.assert_trees_all_close(gates[:, 0], 2.0 / (1 + np.exp(-logits[:, 5])), rtol=1e-6)


def test_sequence_loss_is_per_sequence():
    """Sequence 0 sends all its tokens to expert 0 (probability 0.7), sequence
    1 to expert 1: per sequence ``f = 4 * one_hot``, ``sum f P = 4 * 0.7``;
    pooled, ``f = (2, 2, 0, 0)`` and ``P = (0.4, 0.4, 0.1, 0.1)`` give 1.6."""
    probs = jnp.array([[0.7, 0.1, 0.1, 0.1]] * 4 + [[0.1, 0.7, 0.1, 0.1]] * 4)
    expert_ids = jnp.array([[0]] * 4 + [[1]] * 4, jnp.int32)
    assert float(sequence_aux_loss(probs, expert_ids, num_sequences=2)) == pytest.approx(2.8)
    assert float(sequence_aux_loss(probs, expert_ids, num_sequences=1)) == pytest.approx(1.6)


# ------------------------------------------------------------------ expert bias


def test_bias_update_direction_and_magnitude():
    counts = np.array([10, 2, 6, 6, 0, 12, 6, 6])  # mean 6
    bias = np.linspace(-0.1, 0.1, 8)
    got = expert_bias_update(jnp.asarray(bias, jnp.float32), jnp.asarray(counts), 1e-3)
    chex.assert_trees_all_close(got, ref.expert_bias_update(bias, counts, 1e-3), atol=1e-8)
    chex.assert_trees_all_close(got - bias, np.array([-1, 1, 0, 0, 1, -1, 0, 0]) * 1e-3, atol=1e-8)


def test_update_expert_bias_moves_each_layer_by_its_counts():
    """Transformer with MoE in blocks 1 and 3 (moe_every=2): row i of
    ``aux["tokens_per_expert"]`` moves the bias of the i-th routed block."""
    moe = _config(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.01)
    config = TransformerConfig(
        vocab_size=64, d_model=D, num_layers=4, num_heads=2, max_seq_len=8, moe=moe, moe_every=2
    )
    model = nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))
    biases = nnx.state(model, ExpertBias)
    nnx.update(model, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), biases))
    counts = jnp.array([[5, 1, 1, 1], [0, 0, 0, 8]], jnp.int32)
    update_expert_bias(model, {"tokens_per_expert": counts})
    for row, block in zip(counts, (model.blocks[1], model.blocks[3])):
        chex.assert_trees_all_close(
            block.ffn.router.expert_bias[...],
            ref.expert_bias_update(np.zeros(4), row, 0.01),
            atol=1e-8,
        )
    with pytest.raises(ValueError, match="tokens_per_expert"):
        update_expert_bias(model, {"tokens_per_expert": counts[:1]})
    plain = DroplessMoE(_config(), rngs=nnx.Rngs(0))  # no bias: nothing to do
    update_expert_bias(plain, {"tokens_per_expert": counts[0]})


def test_expert_bias_is_not_a_param_and_survives_checkpoints(tmp_path):
    """Optimizers on nnx.Param leave the bias alone; Orbax saves and restores it."""
    model = _build(_config(expert_bias=True), seed=0, bias=np.arange(8) / 10)
    assert isinstance(model.router.expert_bias, ExpertBias)
    assert "expert_bias" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))["router"]
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(model)
        optimizer.update(model, grads)

    kernel = model.router.kernel[...]
    step(model, optimizer, jnp.ones((4, D)))
    assert not np.allclose(model.router.kernel[...], kernel)  # the step trained
    chex.assert_trees_all_close(model.router.expert_bias[...], np.arange(8) / 10)

    checkpoints = Checkpoints(tmp_path / "ckpt", every=1)
    checkpoints.save(1, nnx.state(model), {})
    checkpoints.close()
    fresh = _build(_config(expert_bias=True), seed=1)
    state, _ = Checkpoints(tmp_path / "ckpt", every=1).restore(1, nnx.state(fresh))
    nnx.update(fresh, state)
    chex.assert_trees_all_close(fresh.router.expert_bias[...], np.arange(8) / 10)


def test_expert_parallel_matches_single_device_with_groups_and_bias():
    """2 x 4 mesh: outputs, aux, every gradient and the bias update from the
    global counts equal the single-device layer."""
    config = _config(
        num_expert_groups=4,
        top_k_groups=2,
        top_k=2,
        expert_bias=True,
        normalize_top_k=1.0,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        sequence_aux_loss_weight=0.1,
        router_z_loss_weight=0.01,
    )
    rng = np.random.default_rng(3)
    x, dy = (jnp.asarray(rng.standard_normal((4, 8, D)), jnp.float32) for _ in range(2))
    bias = _bias(config, 0)

    def outputs(model, x):
        y, aux, grads = _run(model, x, dy)
        update_expert_bias(model, aux)
        return y, aux, grads, model.router.expert_bias[...]

    with jax.default_device(host_cpus()[0]):
        want = outputs(_build(config, 0, bias), x)
    mesh = make_mesh(2, 4, devices=host_cpus())
    model = _build(config, 0, bias)
    with jax.set_mesh(mesh):
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
        got = outputs(model, jax.device_put(x, NamedSharding(mesh, P("data"))))
    assert int(got[1]["tokens_per_expert"].sum()) == 4 * 8 * 2  # global: all 32 tokens
    chex.assert_trees_all_equal(got[1]["tokens_per_expert"], want[1]["tokens_per_expert"])
    assert not np.allclose(got[3], bias)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(num_expert_groups=3), "num_expert_groups must divide num_experts"),
        (dict(num_expert_groups=0), "num_expert_groups must be a positive int"),
        (dict(num_expert_groups=8), "num_experts / num_expert_groups must be >= 2"),
        (dict(num_expert_groups=4, top_k_groups=5), "top_k_groups must be an int in"),
        (dict(num_expert_groups=4, top_k_groups=0), "top_k_groups must be an int in"),
        (dict(top_k_groups=2), "top_k_groups must be an int in"),
        (dict(num_expert_groups=4, top_k_groups=1, top_k=3), "top_k=3 must be <= top_k_groups"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be > 0"),
        (dict(expert_bias_update_rate=-1e-3), "expert_bias_update_rate must be >= 0"),
        (dict(sequence_aux_loss_weight=-0.1), "sequence_aux_loss_weight must be >= 0"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        _config(**kw)


# ------------------------------------------------------------------ experiments.train


def test_train_flags_set_the_routing_fields():
    flags = [
        "--score-function",
        "sigmoid",
        "--expert-bias",
        "--load-balancing-loss-weight",
        "0",
        "--num-expert-groups",
        "4",
        "--top-k-groups",
        "2",
        "--top-k",
        "2",
        "--routed-scaling-factor",
        "2.5",
        "--expert-bias-update-rate",
        "0.01",
        "--sequence-aux-loss-weight",
        "1e-4",
    ]
    moe = config_from_args(parse_args(flags))[0].model.moe
    want = preset("xs").moe.replace(
        ep_buffer_factor=TRAINING_EP_BUFFER_FACTOR,
        score_function="sigmoid",
        expert_bias=True,
        load_balancing_loss_weight=0.0,
        num_expert_groups=4,
        top_k_groups=2,
        top_k=2,
        routed_scaling_factor=2.5,
        expert_bias_update_rate=0.01,
        sequence_aux_loss_weight=1e-4,
    )
    assert moe == want
    assert config_from_args(parse_args([]))[0].model.moe == preset("xs").moe.replace(
        ep_buffer_factor=TRAINING_EP_BUFFER_FACTOR
    )
    with pytest.raises(ValueError, match="top_k_groups"):
        config_from_args(parse_args(["--num-expert-groups", "4", "--top-k-groups", "5"]))


@pytest.mark.slow
def test_train_step_moves_the_bias_and_logs_imbalance(tmp_path):
    """One jitted training step: the optimizer trains the parameters, the bias
    moves by the step's counts, and the logged record has both."""
    moe = _config(num_experts=4, top_k=1, expert_bias=True, expert_bias_update_rate=0.01)
    model_config = TransformerConfig(
        vocab_size=64, d_model=D, num_layers=2, num_heads=2, max_seq_len=8, moe=moe
    )
    config = TrainConfig(
        model=model_config, out=str(tmp_path), cache_dir=str(tmp_path), batch_size=2
    )
    model = MoETransformer(model_config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
    state, metrics = jax.jit(functools.partial(train_step, graphdef))(state, tokens)
    counts = np.asarray(metrics["tokens_per_expert"])  # [2 layers, 4]
    want = np.stack([ref.expert_bias_update(np.zeros(4), row, 0.01) for row in counts])
    chex.assert_trees_all_close(metrics["expert_bias"], want, atol=1e-8)
    trained, _ = nnx.merge(graphdef, state)
    chex.assert_trees_all_close(trained.blocks[1].ffn.router.expert_bias[...], want[1], atol=1e-8)
    record = _interval_record(config, 1, [jax.device_get(metrics)], 1.0, 1.0, 1e-3)
    chex.assert_trees_all_close(
        np.array(record["load_imbalance"]), counts.max(-1) / counts.mean(-1)
    )
    chex.assert_trees_all_close(np.array(record["expert_bias"]), want, atol=1e-8)
