"""Expert parallelism (`jmoe.parallel.expert_parallel_ffn`) against the
single-device dropless FFN (`jmoe.moe.dropless_ffn`, itself checked against
the NumPy loop in test_layers.py): output, tokens per expert and the gradients
of x, the router gates and every expert weight, for balanced and skewed
routings, hidden sharding, the capacity bound (against a NumPy model of its
drop policy), the ragged exchange (with ``ragged_all_to_all`` emulated from its
documented semantics, since XLA:CPU lacks it; random, skewed and
hidden-sharded routings and the capacity bound), ``impl="triton"`` on its
32-row block layout, and bad meshes/configs.

Runs on 8 host CPU devices (tests/conftest.py sets the XLA flag). Meshes are
``data x expert`` with data 2 for expert sizes 2 and 4, and 1 x 8 for expert
size 8 (16 devices would be needed for 2 x 8). Tolerance: float32,
``rtol=atol=1e-5`` (the EP path computes every row with the same kernels; only
the order of the weight-gradient sums over rows and devices differs).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers.expert_parallel import (
    LOGIC_IMPL,
    TOL,
    emulated_ragged_all_to_all,
    expert_parallel_outputs,
    ffn_config,
    ffn_problem,
    single_device_outputs,
)
from helpers.host_devices import host_cpus
from jmoe import MoEConfig
from jmoe.parallel import context_mesh, expert_parallel_ffn, make_mesh

TOKENS_PER_DEVICE = 8


def _check_matches_single_device(
    num_experts, top_k, expert, kind, expert_type="mlp", impl=LOGIC_IMPL, data=None, **kw
):
    data = data or (2 if expert < 8 else 1)
    config = ffn_config(num_experts, top_k, expert_type, impl=impl)
    tokens = TOKENS_PER_DEVICE * data * expert
    args, expert_ids, dy = ffn_problem(config, tokens, kind)
    want_y, (want_counts,), want_grads = single_device_outputs(config, expert_ids, args, dy)
    y, (counts, dropped), grads = expert_parallel_outputs(
        config, expert_ids, args, dy, data, expert, **kw
    )
    chex.assert_trees_all_equal(counts, want_counts)
    assert int(dropped) == 0
    chex.assert_trees_all_close(y, want_y, **TOL)
    chex.assert_trees_all_close(grads, want_grads, **TOL)
    return want_counts


# ------------------------------------------------------------------ equality sweep

ROUTINGS = ("random", "one_expert", "sparse")
FAST_CASES = [  # (E, k, expert-axis size, routing, expert type, products)
    (8, 2, 4, "random", "glu", "xla"),
    (16, 1, 2, "one_expert", "mlp", "ragged_dot"),
    (64, 8, 8, "sparse", "mlp", "ragged_dot"),
    (8, 8, 8, "one_expert", "glu", "ragged_dot"),
]


@pytest.mark.parametrize(
    "num_experts,top_k,expert,kind,expert_type,impl",
    FAST_CASES,
    ids=["-".join(map(str, c)) for c in FAST_CASES],
)
def test_matches_single_device(num_experts, top_k, expert, kind, expert_type, impl):
    counts = _check_matches_single_device(num_experts, top_k, expert, kind, expert_type, impl)
    if kind == "one_expert":  # the case the worst-case buffers exist for
        assert int(jnp.max(counts)) == int(jnp.sum(counts)) // top_k


# The sweep over num_experts x top_k x expert-axis size x routing (3 levels each) as an
# L9 orthogonal array: every pair of levels of any two factors appears exactly once, in 9
# cases instead of 81 (each case compiles two sharded programs, ~25 s on 2 cores).
_L9 = ((0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1),
       (2, 0, 2, 1), (2, 1, 0, 2), (2, 2, 1, 0))  # fmt: skip
_LEVELS = ((8, 16, 64), (1, 2, 8), (2, 4, 8), ROUTINGS)
SWEEP_CASES = [tuple(levels[i] for levels, i in zip(_LEVELS, row)) for row in _L9]


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_experts,top_k,expert,kind", SWEEP_CASES, ids=["-".join(map(str, c)) for c in SWEEP_CASES]
)
def test_matches_single_device_sweep(num_experts, top_k, expert, kind):
    _check_matches_single_device(num_experts, top_k, expert, kind)


@pytest.mark.parametrize(
    "num_experts,data,expert", [(4, 1, 8), pytest.param(2, 2, 4, marks=pytest.mark.slow)]
)
def test_hidden_sharding_matches_single_device(num_experts, data, expert):
    """Fewer experts than ranks: each expert's d_ff is split over ep / E ranks."""
    _check_matches_single_device(num_experts, 2, expert, "random", "glu", data=data)


def test_triton_block_layout_matches_single_device_xla():
    """impl="triton" (interpret mode) under expert parallelism: each rank's
    received rows laid out in 32-row blocks (the other CPU impls use block 1),
    against the single-device impl="xla" path (block 1, checked against NumPy
    in test_layers.py): no Triton code on the reference side.

    Catches an exchange plan whose receive offsets ignore the block padding
    (planted by hand: bin starts of an unpadded layout in `make_plan` fail it)."""
    config = MoEConfig(
        d_model=32, d_ff=32, num_experts=8, top_k=2, expert_type="glu", block_size=32, impl="triton"
    )
    data, expert = 2, 4
    args, expert_ids, dy = ffn_problem(config, TOKENS_PER_DEVICE * data * expert, "random")
    want_y, (want_counts,), want_grads = single_device_outputs(
        config.replace(impl="xla"), expert_ids, args, dy
    )
    y, (counts, dropped), grads = expert_parallel_outputs(
        config, expert_ids, args, dy, data, expert
    )
    chex.assert_trees_all_equal(counts, want_counts)
    assert int(dropped) == 0
    chex.assert_trees_all_close((y, grads), (want_y, want_grads), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ ragged exchange


def _receiving_ranks(expert_ids: np.ndarray, expert: int, num_experts: int) -> set:
    """Expert ranks that receive at least one row (with fewer experts than
    ranks, every rank holds a slice of every expert's d_ff)."""
    if num_experts < expert:
        return set(range(expert))
    return {int(r) for r in np.unique(expert_ids // (num_experts // expert))}


RAGGED_CASES = [  # (E, k, data, expert, routing)
    (8, 2, 2, 4, "sparse"),  # every row to rank 0
    (8, 2, 2, 4, "random"),  # every rank receives from every rank
    (8, 2, 2, 4, "one_expert"),  # skewed: all rows to the last rank
    (4, 2, 1, 8, "random"),  # hidden sharding: 2 ranks per expert
]


@pytest.mark.parametrize(
    "num_experts,top_k,data,expert,kind",
    RAGGED_CASES,
    ids=["-".join(map(str, c)) for c in RAGGED_CASES],
)
def test_ragged_exchange_matches_single_device(monkeypatch, num_experts, top_k, data, expert, kind):
    """The ragged exchange (emulated) gives the single-device result.

    Catches wrong per-rank send sizes or offsets of the ragged all-to-all: the
    random, skewed and hidden cases send non-empty slices to ranks other than
    0 (planted by hand: zeroing the send sizes of every slice past rank 0's
    experts passes the ``sparse`` case and fails the others)."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    config = ffn_config(num_experts, top_k, "glu" if kind == "random" else "mlp")
    _, expert_ids, _ = ffn_problem(config, TOKENS_PER_DEVICE * data * expert, kind)
    receivers = _receiving_ranks(np.asarray(expert_ids), expert, num_experts)
    assert (receivers == {0}) == (kind == "sparse"), receivers
    _check_matches_single_device(
        num_experts, top_k, expert, kind, config.expert_type, data=data, exchange="ragged"
    )


@pytest.mark.slow
@pytest.mark.parametrize("ep_exchange", ("ragged", "padded"))
@pytest.mark.parametrize("buffer_factor", (None, 0.5))
def test_config_ep_exchange_matches_single_device(monkeypatch, ep_exchange, buffer_factor):
    """``MoEConfig.ep_exchange`` picks the exchange (the ragged one emulated, and
    called only when chosen); both give the single-device result, in one round
    and in rounds (1 x 8 mesh, every token on the last two ranks' experts)."""
    calls = []

    def ragged(*args, **kw):
        calls.append(1)
        return emulated_ragged_all_to_all(*args, **kw)

    monkeypatch.setattr(jax.lax, "ragged_all_to_all", ragged)
    config = ffn_config(8, 2, "glu").replace(ep_exchange=ep_exchange)
    args, expert_ids, dy = ffn_problem(config, TOKENS_PER_DEVICE * 8, "one_expert")
    want_y, _, want_grads = single_device_outputs(config, expert_ids, args, dy)
    y, _, grads = expert_parallel_outputs(
        config, expert_ids, args, dy, 1, 8, buffer_factor=buffer_factor
    )
    assert bool(calls) == (ep_exchange == "ragged")
    chex.assert_trees_all_close(y, want_y, **TOL)
    chex.assert_trees_all_close(grads, want_grads, **TOL)


# ------------------------------------------------------------------ capacity bound


def _kept_by_policy(
    expert_ids: np.ndarray, data: int, expert: int, num_experts: int, capacity: int
) -> np.ndarray:
    """NumPy model of the documented drop policy: each owner rank fills its
    ``capacity`` rows in (local expert, source rank, token, choice) order."""
    tokens, top_k = expert_ids.shape
    local_tokens = tokens // (data * expert)
    num_local = num_experts // expert
    kept = np.zeros(expert_ids.shape, bool)
    for replica in range(data):
        for owner in range(expert):
            room = capacity
            for e in range(owner * num_local, (owner + 1) * num_local):
                for src in range(expert):
                    first = (replica * expert + src) * local_tokens
                    for t in range(first, first + local_tokens):
                        for j in range(top_k):
                            if expert_ids[t, j] == e and room > 0:
                                kept[t, j], room = True, room - 1
    return kept


@pytest.mark.parametrize(
    "capacity_factor,exchange,kind",
    [
        (0.5, "padded", "sparse"),
        (0.5, "ragged", "random"),
        pytest.param(1.25, "padded", "sparse", marks=pytest.mark.slow),
    ],
)
def test_capacity_factor_drops_and_counts(monkeypatch, capacity_factor, exchange, kind):
    """Against a NumPy model of the drop policy. With ``exchange="ragged"``
    (emulated; random routing, so every rank receives and drops) it catches
    ragged send sizes or offsets that are wrong once the bound cuts chunks
    (planted by hand: zeroing the send sizes past rank 0's experts fails it;
    the emulation turns slices whose send and receive sizes disagree into NaN)."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    data, expert, num_experts, top_k = 2, 4, 8, 2
    config = ffn_config(num_experts, top_k)
    tokens = TOKENS_PER_DEVICE * data * expert
    args, expert_ids, dy = ffn_problem(config, tokens, kind, seed=3)
    capacity = math.ceil(capacity_factor * TOKENS_PER_DEVICE * top_k)
    kept = _kept_by_policy(np.asarray(expert_ids), data, expert, num_experts, capacity)
    assert 0 < (~kept).sum() < kept.size  # the case drops some, not all
    masked = (args[0], args[1] * jnp.asarray(kept, jnp.float32), *args[2:])
    want_y, (want_counts,), want_grads = single_device_outputs(config, expert_ids, masked, dy)
    y, (counts, dropped), grads = expert_parallel_outputs(
        config,
        expert_ids,
        args,
        dy,
        data,
        expert,
        capacity_factor=capacity_factor,
        exchange=exchange,
    )
    assert int(dropped) == int((~kept).sum())
    chex.assert_trees_all_equal(counts, want_counts)  # counted before dropping
    chex.assert_trees_all_close(y, want_y, **TOL)
    # A dropped assignment contributes nothing, so its router weight gets no gradient.
    want_grads = (want_grads[0], want_grads[1] * jnp.asarray(kept, jnp.float32), *want_grads[2:])
    chex.assert_trees_all_close(grads, want_grads, **TOL)


@pytest.mark.slow
def test_large_capacity_factor_is_dropless():
    _check_matches_single_device(8, 2, 4, "one_expert", capacity_factor=100.0)


# ------------------------------------------------------------------ errors


def _call(config, tokens=64, data=2, expert=4, mesh=None, **kw):
    args, expert_ids, _ = ffn_problem(config, tokens, "random")
    x, gates, w1, w3, w2 = args
    mesh = mesh or make_mesh(data, expert, devices=host_cpus())
    return expert_parallel_ffn(config, x, gates, expert_ids, w1, w3, w2, mesh=mesh, **kw)


@pytest.mark.parametrize(
    "config,kw,match",
    [
        (ffn_config(6, 2), {}, "num_experts=6 must be a multiple of the 'expert' mesh axis size 4"),
        (ffn_config(4, 2, d_ff=15), dict(data=1, expert=8), "d_ff=15 over 2 ranks"),
        (ffn_config(8, 2), dict(tokens=60), "60 tokens, not divisible by the 8 devices"),
        (ffn_config(8, 2), dict(capacity_factor=0.0), "capacity_factor must be None or > 0"),
        (ffn_config(8, 2), dict(exchange="nccl"), "exchange must be one of"),
    ],
    ids=["experts-not-divisible", "hidden-d_ff", "tokens", "capacity", "exchange"],
)
def test_bad_configs_raise(config, kw, match):
    with pytest.raises(ValueError, match=match):
        _call(config, **kw)


def test_bad_ep_exchange_raises():
    with pytest.raises(ValueError, match="ep_exchange must be one of .*'padded'.*, got 'nccl'"):
        ffn_config(8, 2).replace(ep_exchange="nccl")


def test_bad_meshes_raise():
    config = ffn_config(8, 2)
    no_expert = jax.make_mesh((8,), ("data",), devices=host_cpus())
    with pytest.raises(ValueError, match="mesh must have an axis named 'expert'"):
        _call(config, mesh=no_expert)
    auto, explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
    mixed = jax.make_mesh(
        (2, 4), ("data", "expert"), axis_types=(auto, explicit), devices=host_cpus()
    )
    with pytest.raises(ValueError, match="must have the same AxisType"):
        _call(config, mesh=mixed)
    with pytest.raises(ValueError, match="needs 16 devices, 8 are available"):
        make_mesh(2, 8, devices=host_cpus())
    with pytest.raises(ValueError, match="expert must be a positive int"):
        make_mesh(2, 0)

    def inside_shard_map():
        context_mesh()
        return jnp.zeros(())

    with jax.set_mesh(make_mesh(2, 4, devices=host_cpus())):
        with pytest.raises(ValueError, match="already manual"):
            jax.shard_map(inside_shard_map, in_specs=(), out_specs=P())()
