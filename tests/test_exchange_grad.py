"""The expert-parallel exchange's gradient (`jmoe.parallel.exchange`): XLA's
one-shot ``ragged_all_to_all`` has had wrong gradients in some versions, so the
gradients of `dispatch` and `combine` are checked explicitly.

On CPU (which cannot run ``ragged_all_to_all``) three computations of
``grad(sum(dispatch(x) * ct_sent) + sum(combine(layout, gates) * ct_back))``
with respect to ``x``, ``layout`` and the router ``gates`` must agree, with
their forward values:

* ``padded``: the all_to_all + gather method's autodiff;
* ``ragged, emulated``: the ragged method with ``lax.ragged_all_to_all``
  replaced by its documented semantics (helpers/expert_parallel.py), autodiffed;
* ``ragged, JAX's transpose``: the ragged method differentiated by JAX itself
  (the transpose rule of the ``ragged_all_to_all`` primitive, whose backward
  is another ``ragged_all_to_all`` with swapped offsets), with each
  ``ragged_all_to_all`` of the resulting program evaluated by the emulation.

On a GPU the real collective's gradient is compared with the padded method on
one device. Routings: random, every row on one expert, most experts empty,
and a capacity that drops rows. 4 ranks on the ``"expert"`` axis.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex_core
from jax.sharding import PartitionSpec as P

from helpers.expert_parallel import emulated_ragged_all_to_all
from helpers.host_devices import host_cpus
from jmoe.parallel import EXPERT, make_mesh
from jmoe.parallel.exchange import combine, dispatch
from jmoe.parallel.plan import make_plan
from jmoe.permutation import dropless_dispatch

ROWS, D, E, BLOCK = 12, 4, 8, 8  # rows per rank, width, experts, layout block


def _group_sizes(kind: str, ranks: int, seed: int = 0) -> np.ndarray:
    """``[ranks, E]`` rows each rank routes to each expert (each row sums to ROWS)."""
    rng = np.random.default_rng(seed)
    if kind == "one_expert":
        return np.tile(np.eye(E, dtype=np.int32)[E - 1] * ROWS, (ranks, 1))
    pool = E if kind == "random" else 2  # "sparse": experts 0 and 1 only
    picks = rng.integers(0, pool, (ranks, ROWS))
    return np.stack([np.bincount(p, minlength=E) for p in picks]).astype(np.int32)


def _interpret(closed: jex_core.ClosedJaxpr, *args):
    """Evaluates ``closed``, running each ``ragged_all_to_all`` by the emulation
    (inlining nested ``jit`` calls so none is missed)."""
    env = {}
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
    jaxpr = closed.jaxpr
    for var, value in zip((*jaxpr.constvars, *jaxpr.invars), (*closed.consts, *args)):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive.name == "ragged_all_to_all":
            outvals = [emulated_ragged_all_to_all(*invals, **eqn.params)]
        elif eqn.primitive.name in ("jit", "pjit"):
            outvals = _interpret(eqn.params["jaxpr"], *invals)
        else:
            outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outvals = outvals if eqn.primitive.multiple_results else [outvals]
        env.update(zip(eqn.outvars, outvals))
    return [read(v) for v in jaxpr.outvars]


def _exchange_grads(mesh, sizes: np.ndarray, capacity: int, method: str, run=None):
    """``(sent, back, d_x, d_layout, d_gates)`` gathered over the ranks (see module doc).

    Every rank has ``ROWS`` tokens of one assignment each, already in expert
    order (token ``i`` is sorted row ``i``), with router gates. ``run(fn,
    *args)`` evaluates the per-rank ``fn`` (default: calls it).
    """
    ranks = mesh.shape[EXPERT]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((ranks * ROWS, D)), jnp.float32)
    gates = jnp.asarray(rng.random((ranks * ROWS, 1)) + 0.1, jnp.float32)
    run = run or (lambda fn, *args: fn(*args))

    def body(x, sizes, gates):
        rank = lax.axis_index(EXPERT)
        plan = make_plan(lax.all_gather(sizes[0], EXPERT), rank, E // ranks, capacity, BLOCK)
        expert_ids = jnp.repeat(jnp.arange(E), sizes[0], total_repeat_length=ROWS)
        assignments, _ = dropless_dispatch(expert_ids[:, None], E, 1)
        rows = plan.topology.padded_rows
        keys = jax.random.split(jax.random.fold_in(jax.random.key(2), rank), 3)
        layout = jax.random.normal(keys[0], (rows, D))
        ct_sent = jax.random.normal(keys[1], (rows, D))
        ct_back = jax.random.normal(keys[2], (ROWS, D))

        def loss(x, layout, gates):
            sent = dispatch(x, assignments, plan, method)
            back = combine(layout, plan, method, assignments, gates)
            return jnp.sum(sent * ct_sent) + jnp.sum(back * ct_back), (sent, back)

        grad = lambda *args: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*args)
        (d_x, d_layout, d_gates), (sent, back) = run(grad, x, layout, gates)
        return sent, back, d_x, d_layout, d_gates

    spec = P(EXPERT)
    return jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 5, check_vma=False)
    )(x, jnp.asarray(sizes), gates)


def _via_jax_transpose(fn, *args):
    """``fn(*args)`` as JAX traces it (its own VJP rules), ragged ops emulated."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    return jax.tree.unflatten(jax.tree.structure(shapes), _interpret(closed, *args))


_slow = pytest.mark.slow
CASES = [
    ("random", None),
    ("sparse", None),
    pytest.param("one_expert", ROWS, marks=_slow),
    pytest.param("one_expert", None, marks=_slow),
    pytest.param("random", ROWS // 2, marks=_slow),
]


@pytest.mark.parametrize("kind,capacity", CASES)
def test_ragged_exchange_gradient_matches_padded(monkeypatch, kind, capacity):
    mesh = make_mesh(1, 4, devices=host_cpus())
    sizes = _group_sizes(kind, 4)
    capacity = capacity or 4 * ROWS  # None: the worst case, nothing dropped
    padded = _exchange_grads(mesh, sizes, capacity, "padded")
    assert all(float(jnp.abs(padded[i]).sum()) > 0 for i in (2, 3, 4))
    transposed = _exchange_grads(mesh, sizes, capacity, "ragged", run=_via_jax_transpose)
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    emulated = _exchange_grads(mesh, sizes, capacity, "ragged")
    # Pure data movement: every value is copied, so all three agree exactly.
    chex.assert_trees_all_equal(transposed, padded)
    chex.assert_trees_all_equal(emulated, padded)
    if capacity < ROWS * 4 and kind == "random":  # some rows dropped: their gradient is 0
        kept = int(jnp.any(padded[0] != 0, axis=1).sum())
        assert kept < 4 * ROWS and int(jnp.all(padded[2] == 0, axis=1).sum()) > 0


def _gpu_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_devices(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("kind", ("random", "one_expert"))
def test_real_ragged_all_to_all_gradient_on_one_gpu(kind):
    """The real collective (one rank: every chunk stays on the device) against
    the padded method, forward and gradients."""
    mesh = make_mesh(1, 1, devices=_gpu_devices()[:1])
    sizes = _group_sizes(kind, 1)
    for capacity in (ROWS, ROWS // 2):
        ragged = _exchange_grads(mesh, sizes, capacity, "ragged")
        padded = _exchange_grads(mesh, sizes, capacity, "padded")
        chex.assert_trees_all_equal(ragged, padded)
