"""Router: scores, top-k, renormalisation, uniform assignment, jitter, aux losses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe.config import MoEConfig
from jmoe.router import Router, load_balancing_loss, router_z_loss, routing_aux, select_experts

T, E = 12, 6


def _config(**kw):
    return MoEConfig(**{"d_model": 8, "d_ff": 16, "num_experts": E, "top_k": 2, **kw})


def _logits(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((T, E)) * 2, jnp.float32)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_top_k(scores, k):
    idx = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, -1), idx


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_scores_and_top_k(score_function, top_k):
    logits = _logits(top_k)
    gates, expert_ids, probs = select_experts(
        logits, _config(score_function=score_function, top_k=top_k)
    )
    x = np.asarray(logits, np.float64)
    scores = _np_softmax(x) if score_function == "softmax" else 1 / (1 + np.exp(-x))
    want_w, want_i = _np_top_k(scores, top_k)
    chex.assert_trees_all_equal(expert_ids, want_i.astype(np.int32))
    chex.assert_trees_all_close(gates, want_w, rtol=1e-6, atol=1e-7)
    # probs (what the balancing loss averages) sum to one per token either way.
    chex.assert_trees_all_close(probs, scores / scores.sum(-1, keepdims=True), rtol=1e-6)
    chex.assert_type([gates, expert_ids, probs], [jnp.float32, jnp.int32, jnp.float32])
    chex.assert_shape([gates, expert_ids, probs], [(T, top_k), (T, top_k), (T, E)])


def test_sigmoid_scores_are_not_softmax():
    logits = _logits()
    w_soft, _, _ = select_experts(logits, _config(score_function="softmax"))
    w_sig, _, _ = select_experts(logits, _config(score_function="sigmoid"))
    assert not np.allclose(w_soft, w_sig)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_p_norm_renormalisation(score_function, p):
    logits = _logits(1)
    gates, _, _ = select_experts(
        logits, _config(score_function=score_function, top_k=3, normalize_top_k=p)
    )
    raw, _, _ = select_experts(logits, _config(score_function=score_function, top_k=3))
    raw = np.asarray(raw, np.float64)
    want = raw / (np.sum(raw**p, -1, keepdims=True) ** (1 / p))
    chex.assert_trees_all_close(gates, want, rtol=1e-6)
    chex.assert_trees_all_close(
        np.sum(np.asarray(gates, np.float64) ** p, -1), np.ones(T), rtol=1e-6
    )


def test_p1_reproduces_mixtral():
    """Mixtral: softmax over all experts, top-2, divide by the sum of the two."""
    logits = _logits(2)
    gates, expert_ids, _ = select_experts(logits, _config(normalize_top_k=1.0))
    x = np.asarray(logits, np.float64)
    top2 = np.argsort(-x, axis=-1)[:, :2]  # top-2 of the logits = top-2 of softmax
    chosen = np.take_along_axis(x, top2, -1)
    want = _np_softmax(chosen)  # renormalised softmax of the two chosen logits
    chex.assert_trees_all_equal(expert_ids, top2.astype(np.int32))
    chex.assert_trees_all_close(gates, want, rtol=1e-6)
    chex.assert_trees_all_close(gates.sum(-1), np.ones(T), rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_uniform_expert_assignment(top_k):
    logits = _logits(3)
    gates, expert_ids, probs = select_experts(
        logits, _config(top_k=top_k, uniform_expert_assignment=True)
    )
    want = (np.arange(T * top_k) % E).reshape(T, top_k)  # flattened [T, k] -> i mod E
    chex.assert_trees_all_equal(expert_ids, want.astype(np.int32))
    scores = _np_softmax(np.asarray(logits, np.float64))
    chex.assert_trees_all_close(gates, np.take_along_axis(scores, want, -1), rtol=1e-6)
    chex.assert_trees_all_close(probs, scores, rtol=1e-6)
    assert np.ptp(np.bincount(np.asarray(expert_ids).ravel(), minlength=E)) <= 1


def _np_lb_loss(probs, expert_ids, num_experts, top_k):
    tokens = probs.shape[0]
    counts = np.bincount(np.asarray(expert_ids).ravel(), minlength=num_experts)
    return num_experts / (tokens * top_k) * np.sum(counts * np.asarray(probs).mean(0))


def test_load_balancing_loss_formula():
    rng = np.random.default_rng(4)
    probs = _np_softmax(rng.standard_normal((T, E)))
    expert_ids = rng.integers(0, E, (T, 2))
    counts = np.bincount(expert_ids.ravel(), minlength=E)
    got = load_balancing_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(counts), 2)
    chex.assert_trees_all_close(got, _np_lb_loss(probs, expert_ids, E, 2), rtol=1e-6)
    # Perfect balance: uniform probabilities and equal counts give exactly 1.
    uniform = load_balancing_loss(jnp.full((T, E), 1 / E), jnp.full((E,), T * 2 // E), 2)
    chex.assert_trees_all_close(uniform, 1.0, rtol=1e-6)
    # Collapse onto one expert with all the probability: E.
    collapsed = load_balancing_loss(
        jax.nn.one_hot(jnp.zeros(T, int), E), jnp.array([T * 2] + [0] * (E - 1)), 2
    )
    chex.assert_trees_all_close(collapsed, float(E), rtol=1e-6)


def test_router_z_loss_formula():
    logits = _logits(5)
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x).sum(-1))
    chex.assert_trees_all_close(router_z_loss(logits), np.mean(lse**2), rtol=1e-6)


def test_routing_aux_weights_the_losses():
    config = _config(load_balancing_loss_weight=0.3, router_z_loss_weight=0.02)
    logits = _logits(6)
    gates, expert_ids, probs = select_experts(logits, config)
    counts = jnp.bincount(expert_ids.ravel(), length=E)
    aux = routing_aux(config, logits, probs, counts, 5)
    x = np.asarray(logits, np.float64)
    chex.assert_trees_all_close(
        (aux["load_balancing_loss"], aux["router_z_loss"]),
        (
            0.3 * _np_lb_loss(_np_softmax(x), expert_ids, E, 2),
            0.02 * np.mean(np.log(np.exp(x).sum(-1)) ** 2),
        ),
        rtol=1e-5,
    )
    chex.assert_trees_all_equal(
        (aux["tokens_per_expert"], aux["dropped_tokens"]),
        (np.asarray(counts, np.int32), np.int32(5)),
    )


def test_uniform_routing_layer_loss_is_one():
    """Zero router kernel (uniform probs) + uniform assignment: loss 1 (unweighted)."""
    config = _config(uniform_expert_assignment=True, load_balancing_loss_weight=1.0)
    router = Router(config, rngs=nnx.Rngs(0))
    router.kernel.set_value(jnp.zeros_like(router.kernel.get_value()))
    x = jnp.ones((T, 8))  # T * k = 24 assignments, 4 per expert
    gates, expert_ids, probs, logits = router(x)
    counts = jnp.bincount(expert_ids.ravel(), length=E)
    aux = routing_aux(config, logits, probs, counts, 0)
    chex.assert_trees_all_close(aux["load_balancing_loss"], 1.0, rtol=1e-6)


def test_router_logits_in_float32_from_bf16():
    config = _config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    router = Router(config, rngs=nnx.Rngs(0))
    assert router.kernel.get_value().shape == (8, E)
    assert router.kernel.get_value().dtype == jnp.bfloat16
    x = jnp.asarray(np.random.default_rng(7).standard_normal((T, 8)), jnp.bfloat16)
    routing = router(x)  # a RouterOutput: the fields by name
    chex.assert_type([routing.gates, routing.probs, routing.logits], jnp.float32)
    chex.assert_type(routing.expert_ids, jnp.int32)
    want = np.asarray(x, np.float64) @ np.asarray(router.kernel.get_value(), np.float64)
    chex.assert_trees_all_close(routing.logits, want, rtol=1e-5, atol=1e-6)


def test_jitter_only_in_training_and_drawn_from_rngs():
    eps = 0.2
    config = _config(router_jitter_eps=eps)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((T, 8)), jnp.float32)

    def make(seed):
        return Router(config, rngs=nnx.Rngs(params=0, jitter=seed))

    router = make(1)
    clean = np.asarray(x, np.float64) @ np.asarray(router.kernel.get_value(), np.float64)
    first, second = router(x)[3], router(x)[3]
    assert not np.allclose(first, clean, atol=1e-4)  # noise applied in training
    assert not np.allclose(first, second, atol=1e-4)  # fresh noise each call
    # |x * u - x| <= eps |x| elementwise, so the logits move by at most eps |x| @ |W|.
    bound = eps * np.abs(np.asarray(x)) @ np.abs(np.asarray(router.kernel.get_value()))
    assert np.all(np.abs(np.asarray(first) - clean) <= bound + 1e-5)
    # Same rng seed -> same noise; different seed -> different noise.
    chex.assert_trees_all_close(make(1)(x)[3], first, rtol=0, atol=0)
    assert not np.allclose(make(2)(x)[3], first, atol=1e-4)
    # Deterministic (eval) mode: no noise at all.
    router.eval()
    chex.assert_trees_all_close(router(x)[3], clean, rtol=1e-5, atol=1e-6)
    # eps = 0: no noise even in training, and no rng stream needed.
    plain = Router(_config(), rngs=nnx.Rngs(0))
    plain_clean = np.asarray(x, np.float64) @ np.asarray(plain.kernel.get_value(), np.float64)
    chex.assert_trees_all_close(plain(x)[3], plain_clean, rtol=1e-5, atol=1e-6)
