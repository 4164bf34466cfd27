"""Permutation: dispatch plans, permute/unpermute and their gradients, dropping,
and the absence of any [tokens, experts] one-hot (and of host syncs) in the
dropless layer, for every impl and under expert parallelism."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from helpers import numpy_reference as ref
from helpers.host_devices import host_cpus
from helpers.jaxpr_tools import host_primitives, layer_jaxpr, token_expert_shapes
from jmoe import CapacityMoE, DroplessMoE, MoEConfig, permutation
from jmoe.parallel import make_mesh
from jmoe.router import Router, routing_aux

T, K, E, D = 37, 2, 5, 6


def _indices(seed=0, tokens=T, top_k=K, num_experts=E):
    """Random top-k choices: distinct experts per token."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_experts)[:top_k] for _ in range(tokens)]).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dropless(expert_ids, num_experts, block_size):
    return permutation.dropless_dispatch(expert_ids, num_experts, block_size)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_dropless_dispatch_permute_unpermute_vs_numpy(block_size):
    expert_ids = _indices(block_size)
    dispatch, topo = _dropless(jnp.asarray(expert_ids), E, block_size)
    rows = ref.dropless_rows(expert_ids, E, block_size)
    chex.assert_trees_all_equal(dispatch.assignment_rows, rows.astype(np.int32))
    chex.assert_trees_all_equal(
        topo.group_sizes, np.bincount(expert_ids.ravel(), minlength=E).astype(np.int32)
    )
    row_tokens = np.full(topo.padded_rows, T)
    row_tokens[rows] = np.arange(T * K) // K
    chex.assert_trees_all_equal(dispatch.row_tokens, row_tokens.astype(np.int32))

    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, D)).astype(np.float32)
    want = np.zeros((topo.padded_rows, D), np.float32)
    want[rows] = np.repeat(x, K, axis=0)
    chex.assert_trees_all_equal(permutation.permute(jnp.asarray(x), dispatch), want)

    y = rng.standard_normal((topo.padded_rows, D)).astype(np.float32)
    gates = rng.uniform(size=(T, K)).astype(np.float32)
    want = np.zeros((T, D))
    for a, row in enumerate(rows):
        want[a // K] += gates[a // K, a % K] * y[row]
    got = permutation.unpermute(jnp.asarray(y), dispatch, jnp.asarray(gates))
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_unpermute_bf16_accumulates_in_float32():
    expert_ids = _indices(2)
    dispatch, topo = _dropless(jnp.asarray(expert_ids), E, 8)
    rng = np.random.default_rng(2)
    y = jnp.asarray(rng.standard_normal((topo.padded_rows, D)), jnp.bfloat16)
    gates = jnp.asarray(rng.uniform(size=(T, K)), jnp.float32)
    got = permutation.unpermute(y, dispatch, gates)
    assert got.dtype == jnp.bfloat16
    rows = ref.dropless_rows(expert_ids, E, 8)
    y64, w64 = np.asarray(y, np.float64), np.asarray(gates, np.float64)
    want = np.einsum("tk,tkd->td", w64, y64[rows].reshape(T, K, D))
    chex.assert_trees_all_close(got.astype(jnp.float32), want, rtol=1e-2, atol=1e-2)


def test_gradients_vs_numpy_and_finite_differences():
    expert_ids = _indices(3)
    block_size = 8
    dispatch, topo = _dropless(jnp.asarray(expert_ids), E, block_size)
    rows = ref.dropless_rows(expert_ids, E, block_size)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, D)).astype(np.float32)
    y = rng.standard_normal((topo.padded_rows, D)).astype(np.float32)
    gates = rng.uniform(size=(T, K)).astype(np.float32)
    g_rows = rng.standard_normal((topo.padded_rows, D)).astype(np.float32)
    g_out = rng.standard_normal((T, D)).astype(np.float32)

    _, vjp = jax.vjp(lambda x: permutation.permute(x, dispatch), x)
    want_dx = np.zeros((T, D))
    for a, row in enumerate(rows):
        want_dx[a // K] += g_rows[row]
    chex.assert_trees_all_close(vjp(g_rows)[0], want_dx, rtol=1e-6, atol=1e-6)

    _, vjp = jax.vjp(lambda y, w: permutation.unpermute(y, dispatch, w), y, gates)
    dy, dw = vjp(g_out)
    want_dy = np.zeros_like(y, np.float64)
    want_dw = np.zeros((T, K))
    for a, row in enumerate(rows):
        t, j = divmod(a, K)
        want_dy[row] += gates[t, j] * g_out[t]
        want_dw[t, j] = g_out[t] @ y[row]
    chex.assert_trees_all_close((dy, dw), (want_dy, want_dw), rtol=1e-5, atol=1e-5)

    # Finite differences through both, with a per-row nonlinearity in between.
    scale = jnp.asarray(rng.standard_normal((topo.padded_rows, 1)), jnp.float32)
    f = jax.jit(
        lambda x, w: permutation.unpermute(
            jnp.tanh(permutation.permute(x, dispatch) * scale), dispatch, w
        )
    )
    check_grads(f, (x, gates), order=1, modes=["fwd", "rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("block_size", [1, 32])
def test_dropless_never_drops_even_all_to_one_expert(block_size):
    for expert_ids in (
        np.zeros((T, 1), np.int32),
        _indices(4, top_k=E),
        np.stack([np.full(T, 3), np.arange(T) % 3], 1).astype(np.int32),
    ):
        dispatch, topo = _dropless(jnp.asarray(expert_ids), E, block_size)
        rows = np.asarray(dispatch.assignment_rows)
        assert len(set(rows.tolist())) == expert_ids.size and rows.max() < topo.padded_rows
        counts = np.bincount(np.asarray(dispatch.row_tokens), minlength=T + 1)
        chex.assert_trees_all_equal(counts[:T], np.full(T, expert_ids.shape[1]))
        assert counts[T] == topo.padded_rows - expert_ids.size  # every other row is empty


def test_capacity_dispatch_drops_later_tokens_first_and_counts():
    expert_ids = _indices(5)
    capacity = 9  # < the busiest expert's count, so some assignments drop
    dispatch, group_sizes, dropped = jax.jit(permutation.capacity_dispatch, static_argnums=(1, 2))(
        jnp.asarray(expert_ids), E, capacity
    )
    kept = ref.capacity_kept(expert_ids, E, capacity)
    assert 0 < (~kept).sum()
    assert int(dropped) == (~kept).sum()
    chex.assert_trees_all_equal(
        group_sizes, np.bincount(expert_ids.ravel(), minlength=E).astype(np.int32)
    )
    flat = expert_ids.ravel()
    rows = np.asarray(dispatch.assignment_rows)
    assert np.all(rows[~kept] == E * capacity)  # dropped: out of range
    for e in range(E):  # kept ones fill expert e's slots in token order
        mine = np.flatnonzero((flat == e) & kept)
        chex.assert_trees_all_equal(rows[mine], (e * capacity + np.arange(len(mine))))
        # dropping is by token order: every kept one precedes every dropped one
        dropped_e = np.flatnonzero((flat == e) & ~kept)
        assert len(dropped_e) == 0 or mine.max() < dropped_e.min()
    # Dropped assignments contribute nothing when un-permuting.
    y = jnp.ones((E * capacity, D))
    out = permutation.unpermute(y, dispatch, jnp.ones((T, K)))
    chex.assert_trees_all_close(out[:, 0], kept.reshape(T, K).sum(1).astype(np.float32))


def test_capacity_all_to_one_expert_keeps_first_tokens():
    expert_ids = np.zeros((10, 1), np.int32)
    dispatch, group_sizes, dropped = permutation.capacity_dispatch(jnp.asarray(expert_ids), 3, 4)
    chex.assert_trees_all_equal(
        (dispatch.assignment_rows, group_sizes, dropped),
        (np.array([0, 1, 2, 3] + [12] * 6, np.int32), np.array([10, 0, 0], np.int32), np.int32(6)),
    )
    chex.assert_trees_all_equal(dispatch.row_tokens, np.array([0, 1, 2, 3] + [10] * 8, np.int32))


# ----------------------------------------------------------------- no one-hot dispatch

# Distinct sizes so a shape reveals what it is built from: tokens, assignments,
# experts; none equals d_model, d_ff, top_k, padded rows or block rows.
OH_T, OH_K, OH_E = 40, 2, 6
OH_CONFIG = MoEConfig(
    d_model=20,
    d_ff=36,
    num_experts=OH_E,
    top_k=OH_K,
    block_size=32,
    impl="xla",
    expert_type="glu",
    router_z_loss_weight=1e-3,
)
# Layer variants: impl -> config changes (triton: widths a multiple of its
# block; mosaic: bf16, since float32 falls back to the xla kernels), and the
# expert-parallel path on a 2 x 4 mesh (8 experts over 4 ranks, 48 tokens:
# 6 per device, 12 assignments per device).
OH_LAYERS = {
    "xla": (OH_CONFIG, OH_T, None),
    "ragged_dot": (OH_CONFIG.replace(impl="ragged_dot"), OH_T, None),
    "triton": (OH_CONFIG.replace(impl="triton", d_model=64, d_ff=96), OH_T, None),
    "mosaic": (
        OH_CONFIG.replace(impl="mosaic", d_model=64, d_ff=128, dtype=jnp.bfloat16),
        OH_T,
        None,
    ),
    "expert_parallel": (OH_CONFIG.replace(num_experts=8), 48, (2, 4)),
}


def _token_counts(tokens, mesh_shape):
    """Token and assignment counts, global and (under a mesh) per device."""
    counts = {tokens, tokens * OH_K}
    if mesh_shape:
        local = tokens // (mesh_shape[0] * mesh_shape[1])
        counts |= {local, local * OH_K}
    return counts


def _router_only_shapes(config, tokens, *, grad=False):
    """[T, E] intermediates of the router and the aux losses alone; with
    ``grad``, of their gradient too, with the top-k weights in the loss (the
    path through which the experts' output reaches the router)."""
    router = nnx.eval_shape(lambda: Router(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(router, nnx.Param, ...)
    e = config.num_experts

    def router_and_losses(params, x):
        gates, expert_ids, probs, logits = nnx.merge(graphdef, params, rest)(x)
        aux = routing_aux(config, logits, probs, jnp.zeros((e,), jnp.int32), 0)
        if not grad:
            return aux
        return jnp.sum(gates) + aux["load_balancing_loss"] + aux["router_z_loss"]

    fn = jax.grad(router_and_losses, argnums=(0, 1)) if grad else router_and_losses
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    x = jax.ShapeDtypeStruct((tokens, config.d_model), jnp.float32)
    return token_expert_shapes(jax.make_jaxpr(fn)(abstract, x), e, {tokens, tokens * OH_K})


def _layer_jaxprs(config, tokens, mesh_shape):
    """Forward and gradient jaxprs of a `DroplessMoE` (under a mesh if given)."""
    model = nnx.eval_shape(lambda: DroplessMoE(config, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((tokens, config.d_model), jnp.float32)
    if mesh_shape is None:
        return layer_jaxpr(model, x), layer_jaxpr(model, x, grad=True)
    with jax.set_mesh(make_mesh(*mesh_shape, devices=host_cpus())):
        return layer_jaxpr(model, x), layer_jaxpr(model, x, grad=True)


@pytest.mark.parametrize("variant", list(OH_LAYERS))
def test_no_token_by_expert_intermediates_or_host_sync(variant):
    """Traced on abstract shapes (a host read would fail the trace), forward
    and backward, for every impl and the expert-parallel path: no callback or
    other host primitive; forward: exactly the router's [T, E] ops; backward:
    only [T, E] shapes and no more of them than the router's own gradient
    needs. Catches a one-hot dispatch or combine ([T*k, E], [T, k, E],
    [T, E, d]; see the next test), and with the count bound a dense [T, E]
    routing matrix built for the backward (planted by hand: a custom_vjp on
    the router weights whose backward goes through a [T, E] scatter fails it).
    Mosaic and Triton kernels are traced, not run (interpret mode is not needed)."""
    config, tokens, mesh_shape = OH_LAYERS[variant]
    forward_jaxpr, backward_jaxpr = _layer_jaxprs(config, tokens, mesh_shape)
    assert not host_primitives(forward_jaxpr) and not host_primitives(backward_jaxpr)
    counts, e = _token_counts(tokens, mesh_shape), config.num_experts
    router_shapes = _router_only_shapes(config, tokens)
    assert router_shapes and {s for _, s, _ in router_shapes} == {(tokens, e)}
    forward = token_expert_shapes(forward_jaxpr, e, counts)
    # Forward: exactly the router's [T, E] ops (logits, probs, top-k input), no more.
    assert sorted(forward) == sorted(router_shapes), set(forward) - set(router_shapes)
    # Backward: nothing but [T, E]; no [T*k, E], [T, k, E], [T, E, d], and at
    # most as many [T, E] ops as the router's forward and backward alone.
    backward = token_expert_shapes(backward_jaxpr, e, counts)
    assert backward and {s for _, s, _ in backward} == {(tokens, e)}, set(backward)
    assert len(backward) <= len(_router_only_shapes(config, tokens, grad=True)), backward


def test_token_expert_check_catches_dense_dispatch():
    """The check above can fail: a one-hot dispatch and the capacity layer
    (``[E, capacity=T, d]`` slots at capacity_factor 0) are both flagged."""
    shapes = lambda jaxpr: token_expert_shapes(jaxpr, OH_E, {OH_T, OH_T * OH_K})
    one_hot = jax.make_jaxpr(lambda i: jax.nn.one_hot(i.reshape(-1), OH_E))(
        jax.ShapeDtypeStruct((OH_T, OH_K), jnp.int32)
    )
    assert (OH_T * OH_K, OH_E) in {s for _, s, _ in shapes(one_hot)}
    capacity = nnx.eval_shape(
        lambda: CapacityMoE(OH_CONFIG.replace(capacity_factor=0), rngs=nnx.Rngs(0))
    )
    found = shapes(
        layer_jaxpr(capacity, jax.ShapeDtypeStruct((OH_T, OH_CONFIG.d_model), jnp.float32))
    )
    assert any(len(s) == 3 for _, s, _ in found), found
