"""`fused_expert_mlp` (the CPU path of the dMoE layer) vs the unfused composition
built on `pallas_kernels.reference`: gather, dense per-row einsums at HIGHEST
precision, weighted scatter-add, and autodiff for the gradients. Compared:
the output and the gradients of ``x``, the per-row router weights and all
three weight tensors, on real routings (random, every token to one expert
with a group of more than 768 rows, a single token, mostly empty experts) in
the unpadded and in padded block layouts, with garbage in the rows that hold
no assignment.

Tolerances: float32 ``rtol=atol=1e-5`` (values are O(1-10), both sides
accumulate in float32 or better; measured errors are below 2e-6). bfloat16
``rtol=atol=5e-2`` on outputs and ``1e-1`` on gradients: the fused path rounds
gate, up and the hidden activation to bfloat16 as the layer does, the
reference keeps float32.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jmoe import permutation
from jmoe.config import MoEConfig
from jmoe.experts import activate
from pallas_kernels import reference
from pallas_kernels.backend import ExpertWeights, RowMap
from pallas_kernels.fused_mlp import fused_expert_mlp, slot_counts
from pallas_kernels.xla_impl import TILE_ROWS, chunk_rows

F32_TOL = dict(rtol=1e-5, atol=1e-5)
D, F = 8, 16
WEIGHTS = ExpertWeights._fields


def _activation(expert_type):
    return functools.partial(activate, MoEConfig(d_model=D, d_ff=F, expert_type=expert_type))


def _case(expert_ids, num_experts, block_size, *, glu=True, dtype=jnp.float32, seed=0):
    """Layout of ``expert_ids [tokens, k]`` and random operands.

    Rows that hold no assignment get a random token and a NaN weight: the op
    must ignore them.
    """
    expert_ids = jnp.asarray(expert_ids, jnp.int32)
    tokens, top_k = expert_ids.shape
    dispatch, topo = permutation.dropless_dispatch(expert_ids, num_experts, block_size)
    rng = np.random.default_rng(seed)
    gates = jnp.asarray(rng.uniform(0.1, 1.0, (tokens, top_k)), jnp.float32)
    valid = np.asarray(topo.row_is_valid())
    row_tokens = np.where(valid, dispatch.row_tokens, rng.integers(0, tokens, valid.shape))
    row_weights = np.where(valid, permutation.row_weights(gates, dispatch), np.nan)
    normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), dtype)
    operands = dict(
        x=normal(tokens, D),
        row_weights=jnp.asarray(row_weights, jnp.float32),
        w1=normal(num_experts, D, F, scale=D**-0.5),
        w3=normal(num_experts, D, F, scale=D**-0.5) if glu else None,
        w2=normal(num_experts, F, D, scale=F**-0.5),
    )
    return topo, jnp.asarray(row_tokens, jnp.int32), operands, normal(tokens, D)


def _reference(x, rows, topo, weights, activation):
    (row_tokens, row_weights, _), (w1, w3, w2) = rows, weights
    valid = topo.row_is_valid()
    tokens = jnp.where(valid, row_tokens, x.shape[0])
    rows = jnp.take(x, tokens, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    f32 = lambda w: None if w is None else w.astype(jnp.float32)
    gate = reference.grouped_matmul(rows, f32(w1), topo)
    up = None if w3 is None else reference.grouped_matmul(rows, f32(w3), topo)
    out = reference.grouped_matmul(activation(gate, up), f32(w2), topo)
    weighted = jnp.where(valid[:, None], out * row_weights[:, None], 0)
    y = jnp.zeros(x.shape, jnp.float32).at[tokens].add(weighted, mode="drop")
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_vjp(fn, activation, topo, row_tokens, operands, dy):
    """``(y, {x, row_weights, w1, w3, w2: gradient})`` of ``sum(y * dy)``."""

    def f(ops):
        rows = RowMap(row_tokens, ops["row_weights"])
        return fn(ops["x"], rows, topo, ExpertWeights(ops["w1"], ops["w3"], ops["w2"]), activation)

    y, vjp = jax.vjp(f, operands)
    return y, vjp(dy)[0]


def _compare(
    topo, row_tokens, operands, dy, activation, *, tol=F32_TOL, grad_tol=None, fn=fused_expert_mlp
):
    valid = np.asarray(topo.row_is_valid())
    got = _value_and_vjp(fn, activation, topo, row_tokens, operands, dy)
    # The reference is differentiated through its masks: give it finite
    # weights in the rows it ignores (its gradient there is exactly zero).
    finite = {**operands, "row_weights": jnp.where(valid, operands["row_weights"], 0.0)}
    want = _value_and_vjp(_reference, activation, topo, row_tokens, finite, dy)
    as_f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
    chex.assert_trees_all_close(as_f32(got[0]), as_f32(want[0]), **tol)
    chex.assert_trees_all_close(as_f32(got[1]), as_f32(want[1]), **(grad_tol or tol))
    # Rows without an assignment get exactly zero weight gradient, even with NaN weights.
    assert not np.any(np.asarray(got[1]["row_weights"])[~valid])
    chex.assert_trees_all_equal_dtypes(got, (operands["x"], operands))
    return got


def _random_indices(tokens, num_experts, top_k, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)])


@pytest.mark.parametrize(
    "block_size,expert_type",
    [
        (1, "glu"),
        (32, "mlp"),
        pytest.param(128, "glu", marks=pytest.mark.slow),
        pytest.param(1, "mlp", marks=pytest.mark.slow),
    ],
)
def test_random_routing_matches_reference(block_size, expert_type):
    """37 tokens x top-2 over 4 experts: groups of ~18 rows, none a multiple of a tile."""
    topo, row_tokens, operands, dy = _case(
        _random_indices(37, 4, 2), 4, block_size, glu=expert_type == "glu"
    )
    _compare(topo, row_tokens, operands, dy, _activation(expert_type))


@pytest.mark.parametrize("expert_type", ["glu", pytest.param("mlp", marks=pytest.mark.slow)])
def test_recompute_hidden_matches_reference(expert_type):
    """``recompute_hidden``: no pre-activations saved, the backward recomputes
    them; against the reference, and equal to the saved path."""
    topo, row_tokens, operands, dy = _case(
        _random_indices(37, 4, 2, seed=5), 4, 32, glu=expert_type == "glu", seed=5
    )
    activation = _activation(expert_type)
    recomputing = functools.partial(fused_expert_mlp, recompute_hidden=True)
    got = _compare(topo, row_tokens, operands, dy, activation, fn=recomputing)
    saved = _value_and_vjp(fused_expert_mlp, activation, topo, row_tokens, operands, dy)
    chex.assert_trees_all_close(got, saved, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_one_expert_takes_a_group_of_several_chunks():
    """900 tokens, top-1, all to expert 2: one 900-row group of 29 32-row tiles,
    covered by a full 512-row chunk (the loop) and a last chunk of 13 tiles (the
    switch); the other experts are empty and get exactly zero weight gradients."""
    expert_ids = np.full((900, 1), 2)
    assert int(chunk_rows(np.array(900), 900)) == 512 + 13 * 32
    topo, row_tokens, operands, dy = _case(expert_ids, 4, 1)
    _, grads = _compare(topo, row_tokens, operands, dy, _activation("glu"))
    for name in ("w1", "w3", "w2"):
        assert not np.any(np.asarray(grads[name])[[0, 1, 3]]), name
        assert np.all(np.any(np.asarray(grads[name])[2] != 0))


def test_many_empty_experts_and_a_single_token():
    for expert_ids, num_experts in (
        (_random_indices(1, 8, 2, seed=1), 8),
        (np.array([[5, 2]] * 13), 8),
    ):
        topo, row_tokens, operands, dy = _case(expert_ids, num_experts, 1, seed=2)
        _, grads = _compare(topo, row_tokens, operands, dy, _activation("glu"))
        used = set(np.unique(expert_ids))
        empty = [e for e in range(num_experts) if e not in used]
        for name in ("w1", "w3", "w2"):
            assert not np.any(np.asarray(grads[name])[empty]), name


def test_bfloat16():
    topo, row_tokens, operands, dy = _case(
        _random_indices(29, 4, 2, seed=3), 4, 1, dtype=jnp.bfloat16, seed=3
    )
    _compare(
        topo,
        row_tokens,
        operands,
        dy,
        _activation("glu"),
        tol=dict(rtol=5e-2, atol=5e-2),
        grad_tol=dict(rtol=1e-1, atol=1e-1),
    )


def test_finite_differences():
    """Reverse-mode gradients vs finite differences (the op is a `custom_vjp`)."""
    topo, row_tokens, operands, _ = _case(_random_indices(11, 3, 2, seed=4), 3, 1, seed=4)
    activation = _activation("glu")

    def f(x, row_weights, w1, w3, w2):
        rows = RowMap(row_tokens, row_weights)
        return fused_expert_mlp(x, rows, topo, ExpertWeights(w1, w3, w2), activation)

    args = tuple(operands[k] for k in ("x", "row_weights", "w1", "w3", "w2"))
    check_grads(f, args, order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=2e-3)


@pytest.mark.parametrize(
    "expert_ids,num_experts,block_size",
    [
        (_random_indices(8, 8, 2, seed=6), 8, 1),  # a decode step: batch 8, top-2 of 8
        (np.array([[3]] * 5 + [[1]] * 2), 4, 1),  # largest group 5: 6 slots
        (np.array([[0, 2]] * 16), 4, 1),  # 32 rows, groups of 16: no slot left over
        (np.array([[1, 3]]), 4, 16),  # a padded layout: two 16-row bins, one row each
    ],
)
def test_few_rows_match_reference(expert_ids, num_experts, block_size):
    """Layouts of at most TILE_ROWS rows take the batched path (`_few_rows`):
    forward and gradients against the reference, also with ``recompute_hidden``."""
    topo, row_tokens, operands, dy = _case(expert_ids, num_experts, block_size, seed=6)
    assert topo.padded_rows <= TILE_ROWS
    activation = _activation("glu")
    _compare(topo, row_tokens, operands, dy, activation)
    recomputing = functools.partial(fused_expert_mlp, recompute_hidden=True)
    _compare(topo, row_tokens, operands, dy, activation, fn=recomputing)


def test_slot_counts():
    assert slot_counts(1) == [1]
    assert slot_counts(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert slot_counts(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]


def test_checks_operands():
    topo, row_tokens, ops, _ = _case(_random_indices(5, 4, 2), 4, 1)
    act = _activation("glu")

    def call(**kw):
        args = dict(
            row_tokens=row_tokens, row_weights=ops["row_weights"], **{k: ops[k] for k in WEIGHTS}
        )
        args.update(kw)
        rows = RowMap(args["row_tokens"], args["row_weights"])
        weights = ExpertWeights(*(args[k] for k in WEIGHTS))
        return fused_expert_mlp(ops["x"], rows, topo, weights, act)

    with pytest.raises(ValueError, match=r"row_tokens and row_weights must be \[padded_rows=10\]"):
        call(row_tokens=row_tokens[:-1])
    with pytest.raises(ValueError, match=r"w2 must be float32\(4, 16, 8\)"):
        call(w2=ops["w2"][:, :, :4])
    with pytest.raises(ValueError, match=r"w3 must be float32"):
        call(w3=ops["w3"].astype(jnp.bfloat16))


def test_gradient_accumulators_start_with_their_layer():
    """Six fused-MLP layers under `jax.checkpoint`: XLA:CPU would start their weight-gradient
    accumulators (zeros) early and keep them live (672 KiB of temporaries here without
    `xla_impl.scheduled_after`); tied to their loop's input, the whole gradient's
    temporaries stay below one layer's weights (512 KiB; 441 KiB measured)."""
    layers, experts, d_model, d_ff, tokens = 6, 4, 64, 256, 40  # > TILE_ROWS: the loop
    expert_ids = jnp.asarray(np.random.default_rng(0).integers(0, experts, (tokens, 1)))
    dispatch, topo = permutation.dropless_dispatch(expert_ids.astype(jnp.int32), experts, 1)
    rows = RowMap(dispatch.row_tokens, jnp.ones(topo.padded_rows), None)
    activation = _activation("mlp")

    @jax.checkpoint
    def layer(x, w1, w2):
        return x + fused_expert_mlp(x, rows, topo, ExpertWeights(w1, None, w2), activation)

    def loss(w1s, w2s, x):
        for w1, w2 in zip(w1s, w2s):
            x = layer(x, w1, w2)
        return jnp.sum(x * x)

    w1s = [jnp.zeros((experts, d_model, d_ff))] * layers
    w2s = [jnp.zeros((experts, d_ff, d_model))] * layers
    compiled = (
        jax.jit(jax.grad(loss, argnums=(0, 1)))
        .lower(w1s, w2s, jnp.zeros((tokens, d_model)))
        .compile()
    )
    one_layer = w1s[0].nbytes + w2s[0].nbytes
    assert compiled.memory_analysis().temp_size_in_bytes < one_layer
