"""The multi-round expert-parallel exchange (``ep_buffer_factor``) against the
single-device dropless FFN: output and every gradient for balanced, skewed and
all-to-one-expert routings at several buffer factors (one forcing 8+ rounds),
both exchanges, hidden sharding and the `DroplessMoE` layer (router-kernel
gradient, aux keys); the round plan and round counts against a NumPy model of
the documented fill order; the compiled temporary memory against the
worst-case-buffer layer; and the config errors.

8 host CPU devices (tests/conftest.py). Tolerance: float32 ``rtol=atol=1e-5``
(every row is computed by the same kernels; the weight-gradient sums run over
rounds, rows and devices in a different order).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from helpers.expert_parallel import (
    TOL,
    abstract_gpu_mesh,
    emulated_ragged_all_to_all,
    expert_parallel_outputs,
    ffn_config,
    ffn_problem,
    layer_grad_fn,
    single_device_outputs,
)
from helpers.host_devices import host_cpus
from jmoe import DroplessMoE, MoEConfig
from jmoe.parallel import expert_parallel_ffn, make_mesh
from jmoe.parallel.plan import make_plan, num_rounds
from jmoe.transformer import aggregate_aux

TOKENS_PER_DEVICE = 8


# ------------------------------------------------------------------ NumPy model


def _owner_streams(counts: np.ndarray, num_local: int) -> list[list[tuple[int, int, int]]]:
    """Per owner rank, its incoming assignments as ``(source, expert, i)`` in the
    documented fill order: local expert, then source, then position in the chunk."""
    num_ranks = counts.shape[0]
    return [
        [
            (src, e, i)
            for e in range(owner * num_local, (owner + 1) * num_local)
            for src in range(num_ranks)
            for i in range(counts[src, e])
        ]
        for owner in range(num_ranks)
    ]


def _served_by_round(counts: np.ndarray, num_local: int, buffer_rows: int) -> list[np.ndarray]:
    """``kept [ep, E]`` of every round: each owner takes the next ``buffer_rows``
    of its stream until all streams are empty (at least one round)."""
    streams = _owner_streams(counts, num_local)
    rounds = []
    while not rounds or any(streams):
        kept = np.zeros_like(counts)
        for owner, stream in enumerate(streams):
            for src, e, _ in stream[:buffer_rows]:
                kept[src, e] += 1
            streams[owner] = stream[buffer_rows:]
        rounds.append(kept)
    return rounds


def _rounds_by_model(
    expert_ids: np.ndarray, data: int, expert: int, num_experts: int, buffer_factor: float
) -> int:
    """Rounds the layer needs (the most over the data replicas), hidden sharding
    included: with ``s = ep / E`` splits, a token's choice ``e`` goes to every
    virtual expert ``e*s + h``."""
    tokens, top_k = expert_ids.shape
    splits = max(1, expert // num_experts)
    virtual = num_experts * splits
    local_tokens = tokens // (data * expert)
    worst = expert * local_tokens * min(top_k * splits, virtual // expert)
    buffer_rows = min(worst, math.ceil(buffer_factor * local_tokens * top_k * splits))
    most = 0
    for replica in range(data):
        counts = np.zeros((expert, virtual), np.int64)
        for src in range(expert):
            first = (replica * expert + src) * local_tokens
            for e in expert_ids[first : first + local_tokens].reshape(-1):
                counts[src, e * splits : (e + 1) * splits] += 1
        most = max(most, len(_served_by_round(counts, virtual // expert, buffer_rows)))
    return most


def test_plan_rounds_match_numpy_model():
    """`make_plan` round by round (kept, send and receive offsets) and `num_rounds`
    against the model, on count matrices with empty chunks and one hot owner."""
    rng = np.random.default_rng(0)
    num_ranks, num_local, block = 4, 2, 32
    cases = [rng.integers(0, 9, (num_ranks, num_ranks * num_local)) for _ in range(3)]
    cases.append(np.zeros((num_ranks, num_ranks * num_local), np.int64))
    cases[-1][:, 0] = 13  # every source -> expert 0
    plan_of = jax.jit(make_plan, static_argnums=(2, 3, 4))
    for counts in cases:
        for capacity in (5, 16, 100):
            want = _served_by_round(counts, num_local, capacity)
            assert int(num_rounds(jnp.asarray(counts), num_local, capacity)) == len(want)
            chunk_starts = np.cumsum(counts, axis=1) - counts
            for r, kept in enumerate(want):
                sent = sum(want[:r], np.zeros_like(counts))
                for rank in range(num_ranks):
                    plan = plan_of(
                        jnp.asarray(counts), jnp.int32(rank), num_local, capacity, block, r
                    )
                    np.testing.assert_array_equal(plan.kept, kept)
                    np.testing.assert_array_equal(plan.send_offsets, chunk_starts + sent)
                    groups = kept.sum(0).reshape(num_ranks, num_local)[rank]
                    np.testing.assert_array_equal(plan.topology.group_sizes, groups)


# ------------------------------------------------------------------ equality with one device


def _balanced(tokens: int, num_experts: int, top_k: int) -> jnp.ndarray:
    """Assignment ``t*k + j`` -> expert ``(t*k + j) mod E``: every rank gets exactly
    ``T_local * k`` rows, one buffer at factor 1."""
    return jnp.arange(tokens * top_k, dtype=jnp.int32).reshape(tokens, top_k) % num_experts


def _check_rounds(num_experts, top_k, data, expert, kind, factors, expert_type="glu", **kw):
    """EP with each buffer factor == one device (y, every gradient, counts); no
    drop; ``rounds`` as the model says. Returns the rounds per factor."""
    config = ffn_config(num_experts, top_k, expert_type)
    tokens = TOKENS_PER_DEVICE * data * expert
    args, expert_ids, dy = ffn_problem(config, tokens, "random" if kind == "balanced" else kind)
    if kind == "balanced":
        expert_ids = _balanced(tokens, num_experts, top_k)
    want_y, (want_counts,), want_grads = single_device_outputs(config, expert_ids, args, dy)
    got_rounds = []
    for factor in factors:
        y, (counts, dropped, rounds), grads = expert_parallel_outputs(
            config,
            expert_ids,
            args,
            dy,
            data,
            expert,
            buffer_factor=factor,
            return_rounds=True,
            **kw,
        )
        assert int(rounds) == _rounds_by_model(
            np.asarray(expert_ids), data, expert, num_experts, factor
        )
        assert int(dropped) == 0
        chex.assert_trees_all_equal(counts, want_counts)
        chex.assert_trees_all_close(y, want_y, **TOL)
        chex.assert_trees_all_close(grads, want_grads, **TOL)
        got_rounds.append(int(rounds))
    return got_rounds


def test_all_to_one_expert_in_eight_rounds():
    """1 x 8 mesh, every token on experts 7 and 6 (ranks 7 and 6 receive 64 rows
    each); a buffer of ceil(0.5 * 8 * 2) = 8 rows takes 8 rounds."""
    assert _check_rounds(8, 2, 1, 8, "one_expert", (0.5,)) == [8]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,factors,want",
    [
        ("balanced", (1.0, 0.25), [1, 4]),
        ("sparse", (2.0, 0.25), None),
        ("one_expert", (1.25, 0.25), [4, 16]),
    ],
)
def test_rounds_match_single_device(kind, factors, want):
    """2 x 4 mesh, E 8, k 2 (worst case 4x the balanced rows)."""
    rounds = _check_rounds(8, 2, 2, 4, kind, factors)
    if want is not None:
        assert rounds == want
    assert rounds == sorted(rounds)  # a smaller buffer never takes fewer rounds


@pytest.mark.slow
def test_many_experts_top8_skewed():
    """1 x 8 mesh, E 64, k 8 (worst case 8x the balanced rows), skewed routing."""
    _check_rounds(64, 8, 1, 8, "sparse", (0.3,), expert_type="mlp")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("random", "one_expert"))
def test_hidden_sharding_in_rounds(kind):
    """E 4 on 8 ranks: each token's choice is sent to both halves of its expert's d_ff."""
    _check_rounds(4, 2, 1, 8, kind, (0.5,))


@pytest.mark.slow
def test_ragged_exchange_in_rounds(monkeypatch):
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    assert _check_rounds(8, 2, 2, 4, "one_expert", (0.5,), exchange="ragged") == [8]


@pytest.mark.slow
def test_rounds_lower_for_cuda_with_ragged_exchange():
    """On a GPU mesh the rounds use ragged_all_to_all inside the loops (forward:
    dispatch and combine; backward: the recomputed dispatch and the transposes)
    and move no token rows through a padded all_to_all."""
    config = ffn_config(8, 2, "glu").replace(ep_buffer_factor=1.0)
    grad, state = layer_grad_fn(DroplessMoE(config, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((64, config.d_model), jnp.float32)
    with jax.sharding.use_abstract_mesh(abstract_gpu_mesh(2, 4, AxisType.Auto)):
        text = grad.trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.while" in text
    assert text.count("@ragged_all_to_all") >= 5
    assert not [
        line for line in text.splitlines() if "stablehlo.all_to_all" in line and "xf32>" in line
    ]


# ------------------------------------------------------------------ the layer


def _layer_grads(model, x):
    """``(y, aux)`` and the gradients of ``sum(y * cos) + aux losses`` w.r.t. the
    parameters (router kernel included) and x."""

    def loss(model, x):
        y, aux = model(x)
        weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * weights) + aux["load_balancing_loss"], (y, aux)

    grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, aux)), (param_grads, dx) = grad(model, x)
    return y, aux, nnx.to_pure_dict(nnx.state(param_grads)), dx


@pytest.mark.slow
def test_layer_in_rounds_matches_single_device():
    """`DroplessMoE` on a 2 x 4 mesh with a router biased to expert 0: y, every
    gradient (router kernel included); ``ep_rounds`` > 1 on the mesh, 1 without;
    without ``ep_buffer_factor`` the aux keys are unchanged (no ``ep_rounds``)."""
    config = ffn_config(8, 2, "glu").replace(ep_buffer_factor=0.5, num_shared_experts=1)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, config.d_model)), jnp.float32)

    def model():
        layer = DroplessMoE(config, rngs=nnx.Rngs(0))
        layer.router.kernel[...] = layer.router.kernel[...].at[:, 0].add(0.5)
        return layer

    with jax.default_device(host_cpus()[0]):
        want = _layer_grads(model(), x)
    with jax.set_mesh(make_mesh(2, 4, devices=host_cpus())):
        got = _layer_grads(model(), x)
        plain = DroplessMoE(config.replace(ep_buffer_factor=None), rngs=nnx.Rngs(0))
        plain_aux = jax.eval_shape(lambda x: plain(x)[1], x)
    assert int(want[1].pop("ep_rounds")) == 1
    assert int(got[1].pop("ep_rounds")) > 1
    assert set(plain_aux) == set(got[1])
    assert int(got[1]["dropped_tokens"]) == 0
    chex.assert_trees_all_close(got, want, **TOL)


def test_transformer_aux_reports_the_most_rounds():
    """`aggregate_aux`: ``ep_rounds`` is the most of any block, and absent when no
    block reports it (dense blocks never do)."""
    base = {
        "load_balancing_loss": jnp.zeros(()),
        "router_z_loss": jnp.zeros(()),
        "sequence_aux_loss": jnp.zeros(()),
        "tokens_per_expert": jnp.zeros((8,), jnp.int32),
        "dropped_tokens": jnp.zeros((), jnp.int32),
    }
    layers = [{**base, "ep_rounds": jnp.int32(3)}, base, {**base, "ep_rounds": jnp.int32(5)}]
    assert int(aggregate_aux(layers, (0, 2), 8)["ep_rounds"]) == 5
    assert "ep_rounds" not in aggregate_aux([base, base], (0,), 8)


# ------------------------------------------------------------------ memory


@pytest.mark.slow
def test_buffer_factor_bounds_temporary_memory():
    """EP 8, E 16, k 2: the worst case (every token of 8 ranks on one rank's two
    experts) is 8x the balanced rows. With ep_buffer_factor=1.0 the compiled
    forward+backward needs <= 0.4x the worst-case-buffer layer's temp memory."""
    config = MoEConfig(
        d_model=16, d_ff=128, num_experts=16, top_k=2, expert_type="glu", block_size=32, impl="xla"
    )
    mesh = make_mesh(1, 8, devices=host_cpus())
    tokens, (d, f, e) = 32 * 8, (config.d_model, config.d_ff, config.num_experts)
    spec = jax.ShapeDtypeStruct
    args = (
        spec((tokens, d), jnp.float32),
        spec((tokens, 2), jnp.float32),
        spec((tokens, 2), jnp.int32),
        spec((e, d, f), jnp.float32),
        spec((e, d, f), jnp.float32),
        spec((e, f, d), jnp.float32),
    )

    def temp_bytes(buffer_factor):
        def loss(x, gates, expert_ids, w1, w3, w2):
            y = expert_parallel_ffn(
                config, x, gates, expert_ids, w1, w3, w2, mesh=mesh, buffer_factor=buffer_factor
            )[0]
            return jnp.sum(y * y)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5)))
        return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(1.0) <= 0.4 * temp_bytes(None)


# ------------------------------------------------------------------ errors


def test_bad_buffer_factors_raise():
    with pytest.raises(ValueError, match="ep_buffer_factor must be None or > 0"):
        MoEConfig(d_model=8, d_ff=16, ep_buffer_factor=0.0)
    with pytest.raises(
        ValueError, match="ep_buffer_factor=1.0 .* ep_capacity_factor=2.0 .* exclusive"
    ):
        MoEConfig(d_model=8, d_ff=16, ep_buffer_factor=1.0, ep_capacity_factor=2.0)
    config = ffn_config(8, 2).replace(ep_buffer_factor=1.0)
    args, expert_ids, _ = ffn_problem(config, 64, "random")
    x, gates, w1, w3, w2 = args
    mesh = make_mesh(2, 4, devices=host_cpus())
    with pytest.raises(ValueError, match="capacity_factor=0.5 .* buffer_factor=1.0 .* exclusive"):
        expert_parallel_ffn(
            config, x, gates, expert_ids, w1, w3, w2, mesh=mesh, capacity_factor=0.5
        )
    with pytest.raises(ValueError, match="buffer_factor must be None or > 0, got -1"):
        expert_parallel_ffn(config, x, gates, expert_ids, w1, w3, w2, mesh=mesh, buffer_factor=-1)
